"""Partitions through the real dagster-daemon: per-partition order, concurrency across partitions,
and a partition added to the topic while the system runs.

The sensor hands a partition that has more than FRAUD_MAX_BATCH_SIZE waiting several batches in
one tick, so the QueuedRunCoordinator's limit of one run per `fraud_dagster/topic_partition`
(dagster.yaml) is what keeps them apart; while one of them waits in the queue, later ticks add
no more to that partition. Times come from the Dagster instance's run records (start and end).
"""

from __future__ import annotations

import itertools
import time
from collections import defaultdict
from pathlib import Path

import dagster as dg
import pytest

from fraud_dagster.batching import TAG_FIRST_OFFSET, TAG_LAST_OFFSET, TAG_PARTITION, TAG_TOPIC
from fraud_dagster.kafka_io import ensure_topic, offset_bounds
from fraud_dagster.local_services.dagster_processes import running_daemon
from fraud_dagster.producer import synthetic_transactions
from fraud_dagster.settings import Settings
from fraud_dagster.simulator import to_messages
from fraud_dagster_tests.helpers import produce
from fraud_dagster_tests.operations_support import accounting, wait_for

pytestmark = [pytest.mark.services, pytest.mark.slow]


def batch_records(instance: dg.DagsterInstance, topic: str) -> list[dg.RunRecord]:
    return list(instance.get_run_records(filters=dg.RunsFilter(tags={TAG_TOPIC: topic})))


def wait_until_settled(
    instance: dg.DagsterInstance, database_url: str, topic: str, expected: int, log: Path
) -> list[dg.RunRecord]:
    """Wait until every produced offset is stored and no batch run is queued or running."""

    def settled() -> bool:
        records = batch_records(instance, topic)
        stored = sum(accounting(database_url, topic).values())
        return stored >= expected and all(r.dagster_run.is_finished for r in records)

    try:
        wait_for(settled, 300, f"{expected} messages stored by the daemon's runs")
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}; daemon log:\n{log.read_text(errors='replace')[-3000:]}"
        ) from None
    return batch_records(instance, topic)


def by_partition(records: list[dg.RunRecord]) -> dict[int, list[dg.RunRecord]]:
    """Each partition's runs in offset order."""
    grouped: dict[int, list[dg.RunRecord]] = defaultdict(list)
    for record in records:
        grouped[int(record.dagster_run.tags[TAG_PARTITION])].append(record)
    for runs in grouped.values():
        runs.sort(key=lambda r: int(r.dagster_run.tags[TAG_FIRST_OFFSET]))
    return dict(grouped)


def offsets(record: dg.RunRecord) -> tuple[int, int]:
    tags = record.dagster_run.tags
    return int(tags[TAG_FIRST_OFFSET]), int(tags[TAG_LAST_OFFSET])


def assert_partition_runs_in_offset_order_one_at_a_time(
    runs: list[dg.RunRecord], end_offset: int
) -> None:
    """The runs cover 0..end-1 without gap or overlap, and each starts after the previous ended."""
    expected_first = 0
    for record in runs:
        first, last = offsets(record)
        assert first == expected_first, f"gap or overlap before offset {first}"
        expected_first = last + 1
    assert expected_first == end_offset
    for earlier, later in itertools.pairwise(runs):
        assert later.start_time >= earlier.end_time, (
            f"runs {offsets(earlier)} and {offsets(later)} of one partition overlapped in time"
        )


def overlapping_pairs(records: list[dg.RunRecord]) -> list[tuple[int, int]]:
    """Pairs of partitions that had a run each going at the same time."""
    pairs = []
    for a, b in itertools.combinations(records, 2):
        pa, pb = (int(r.dagster_run.tags[TAG_PARTITION]) for r in (a, b))
        if pa != pb and a.start_time < b.end_time and b.start_time < a.end_time:
            pairs.append((pa, pb))
    return pairs


@pytest.mark.partitions(4)
@pytest.mark.backends("postgresql")
@pytest.mark.dagster_storage("postgresql")
def test_batches_of_a_partition_run_one_at_a_time_in_offset_order_and_partitions_overlap(
    settings: Settings,
    env: dict[str, str],
    dagster_home: Path,
    instance: dg.DagsterInstance,
    database_url: str,
    tmp_path: Path,
) -> None:
    """The production set-up in small: app database and Dagster instance on PostgreSQL, the
    repo's run coordinator, 4 partitions with several batches each waiting at once."""
    env = {**env, "FRAUD_MAX_BATCH_SIZE": "40"}
    sent = produce(settings, to_messages(synthetic_transactions(480, seed=71)))
    _, end = offset_bounds(
        {"bootstrap_servers": [settings.kafka_bootstrap_servers]}, settings.kafka_topic
    )
    assert sorted(end) == [0, 1, 2, 3] and all(count > 40 for count in end.values())
    log = tmp_path / "daemon.log"
    with running_daemon(dagster_home, env, log):
        records = wait_until_settled(instance, database_url, settings.kafka_topic, sent, log)

    assert accounting(database_url, settings.kafka_topic) == {
        (p, o): 1 for p, count in end.items() for o in range(count)
    }
    assert {r.dagster_run.status for r in records} == {dg.DagsterRunStatus.SUCCESS}
    partitions = by_partition(records)
    assert sorted(partitions) == [0, 1, 2, 3]
    for partition, runs in partitions.items():
        assert len(runs) >= 2, f"partition {partition} needed several batches"
        assert_partition_runs_in_offset_order_one_at_a_time(runs, end[partition])
    assert overlapping_pairs(records), "runs of different partitions never ran side by side"
    running_at_once = max(
        sum(1 for r in records if r.start_time <= record.start_time < r.end_time)
        for record in records
    )
    assert running_at_once <= 3  # max_concurrent_runs of dagster.yaml


@pytest.mark.partitions(2)
@pytest.mark.backends("sqlite")
def test_a_partition_added_while_the_daemon_runs_is_picked_up_from_its_beginning(
    settings: Settings,
    env: dict[str, str],
    dagster_home: Path,
    instance: dg.DagsterInstance,
    database_url: str,
    tmp_path: Path,
) -> None:
    options = {"bootstrap_servers": [settings.kafka_bootstrap_servers]}
    log = tmp_path / "daemon.log"
    with running_daemon(dagster_home, env, log):
        sent = produce(settings, to_messages(synthetic_transactions(120, seed=72)))
        wait_until_settled(instance, database_url, settings.kafka_topic, sent, log)

        ensure_topic(options, settings.kafka_topic, 4)
        time.sleep(2)  # a tick or two with the new, still empty partitions
        sent += produce(settings, to_messages(synthetic_transactions(240, seed=73)))
        records = wait_until_settled(instance, database_url, settings.kafka_topic, sent, log)

    _, end = offset_bounds(options, settings.kafka_topic)
    assert sorted(end) == [0, 1, 2, 3] and end[2] > 0 and end[3] > 0
    assert accounting(database_url, settings.kafka_topic) == {
        (p, o): 1 for p, count in end.items() for o in range(count)
    }
    partitions = by_partition(records)
    assert sorted(partitions) == [0, 1, 2, 3]
    for partition, runs in partitions.items():
        assert_partition_runs_in_offset_order_one_at_a_time(runs, end[partition])
    assert {r.dagster_run.status for r in records} == {dg.DagsterRunStatus.SUCCESS}
