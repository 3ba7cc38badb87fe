"""Partitions through the real dagster-daemon: per-partition order, concurrency across partitions,
and a partition added to the topic while the system runs.

The sensor hands a partition that has more than FRAUD_MAX_BATCH_SIZE waiting several batches in
one tick. The QueuedRunCoordinator's limit of two runs per `fraud_dagster/topic_partition`
(dagster.yaml) lets the next batch start while the previous one works; its
wait_for_earlier_batches step must hold its preprocess (the features read stored history) until
the previous range is stored. Times come from the Dagster instance (run records, step stats)
and from `stored_ranges.stored_at`, written inside the persisting transaction.
"""

from __future__ import annotations

import itertools
import json
import time
from collections import defaultdict
from datetime import UTC
from pathlib import Path

import dagster as dg
import pytest

from fraud_dagster.batching import TAG_FIRST_OFFSET, TAG_LAST_OFFSET, TAG_PARTITION, TAG_TOPIC
from fraud_dagster.benchmarks.harness import sensor_ticks
from fraud_dagster.kafka_io import ensure_topic, offset_bounds
from fraud_dagster.local_services.dagster_processes import running_daemon
from fraud_dagster.producer import synthetic_transactions
from fraud_dagster.sensors import KAFKA_SENSOR_NAME
from fraud_dagster.settings import Settings
from fraud_dagster.simulator import to_messages
from fraud_dagster.storage import schema
from fraud_dagster.storage.database import create_engine, ensure_schema
from fraud_dagster_tests.helpers import produce, table_rows
from fraud_dagster_tests.operations_support import (
    accept_writes,
    accounting,
    batch_records,
    refuse_writes,
    step_events,
    wait_for,
    wait_until_settled,
)

pytestmark = [pytest.mark.services, pytest.mark.slow]


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


def stored_at(database_url: str, topic: str) -> dict[tuple[int, int], float]:
    """When each stored (partition, first offset) range was written, as epoch seconds."""
    return {
        (row["source_partition"], row["first_offset"]): row["stored_at"]
        .replace(tzinfo=UTC)
        .timestamp()
        for row in table_rows(database_url, schema.stored_ranges)
        if row["source_topic"] == topic
    }


def preprocess_started(instance: dg.DagsterInstance, run_id: str) -> float:
    (stats,) = instance.get_run_step_stats(run_id, step_keys=["transaction_batch.preprocess"])
    return stats.start_time


def assert_partition_runs_in_offset_order(
    instance: dg.DagsterInstance,
    database_url: str,
    runs: list[dg.RunRecord],
    end_offset: int,
) -> None:
    """The runs cover 0..end-1 without gap or overlap; each computes its features (preprocess)
    only after the previous range is stored; at most two of them are under way at once."""
    expected_first = 0
    for record in runs:
        first, last = offsets(record)
        assert first == expected_first, f"gap or overlap before offset {first}"
        expected_first = last + 1
    assert expected_first == end_offset
    partition = int(runs[0].dagster_run.tags[TAG_PARTITION])
    topic = runs[0].dagster_run.tags[TAG_TOPIC]
    written = stored_at(database_url, topic)
    for earlier, later in itertools.pairwise(runs):
        earlier_stored = written[(partition, offsets(earlier)[0])]
        assert preprocess_started(instance, later.dagster_run.run_id) >= earlier_stored, (
            f"run {offsets(later)} computed features before {offsets(earlier)} was stored"
        )
    for record in runs:
        under_way = sum(1 for r in runs if r.start_time <= record.start_time < r.end_time)
        assert under_way <= 2, f"more than two runs of partition {partition} at once"


def same_partition_overlaps(runs: list[dg.RunRecord]) -> int:
    """How many consecutive runs of one partition were under way at the same time."""
    return sum(1 for a, b in itertools.pairwise(runs) if b.start_time < a.end_time)


def timeline(runs: list[dg.RunRecord]) -> str:
    """Each run's offsets and its created / started / ended times, relative to the first."""
    zero = min(r.create_timestamp.timestamp() for r in runs)
    return "; ".join(
        f"{offsets(r)} created {r.create_timestamp.timestamp() - zero:.1f} "
        f"started {r.start_time - zero:.1f} ended {r.end_time - zero:.1f}"
        for r in runs
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
def test_partitions_run_side_by_side_and_each_keeps_its_offset_order(
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
        assert_partition_runs_in_offset_order(instance, database_url, runs, end[partition])
    assert overlapping_pairs(records), "runs of different partitions never ran side by side"
    running_at_once = max(
        sum(1 for r in records if r.start_time <= record.start_time < r.end_time)
        for record in records
    )
    assert running_at_once <= 3  # max_concurrent_runs of dagster.yaml


def step_in_progress(instance: dg.DagsterInstance, run_id: str, step: str) -> bool:
    stats = instance.get_run_step_stats(run_id, step_keys=[f"transaction_batch.{step}"])
    return any(st.start_time and not st.end_time for st in stats)


@pytest.mark.backends("sqlite")
def test_the_next_batch_of_a_partition_starts_beside_the_running_one_and_waits_for_its_rows(
    settings: Settings,
    env: dict[str, str],
    dagster_home: Path,
    instance: dg.DagsterInstance,
    database_url: str,
    tmp_path: Path,
) -> None:
    """One partition, two batches requested in one tick, both started at once (tag limit 2).
    The database refuses the first batch's rows for a while (its persist step retries): the
    second batch must wait for them, not compute its features and store its rows first."""
    env = {**env, "FRAUD_MAX_BATCH_SIZE": "40"}
    ensure_schema(create_engine(database_url))
    refuse_writes(
        database_url,
        "scored_transactions",
        "injected fault: first batch refused",
        condition="NEW.source_offset < 40",
    )
    sent = produce(settings, to_messages(synthetic_transactions(80, seed=74)))
    assert sent == 80
    log = tmp_path / "daemon.log"
    with running_daemon(dagster_home, env, log):

        def second_waits_while_first_runs() -> bool:
            runs = by_partition(batch_records(instance, settings.kafka_topic)).get(0, [])
            return (
                len(runs) == 2
                and runs[0].dagster_run.status == dg.DagsterRunStatus.STARTED
                and step_in_progress(
                    instance, runs[1].dagster_run.run_id, "wait_for_earlier_batches"
                )
            )

        wait_for(second_waits_while_first_runs, 60, "the second batch waiting beside the first")
        first, second = (
            r.dagster_run.run_id
            for r in by_partition(batch_records(instance, settings.kafka_topic))[0]
        )
        refused = dg.DagsterEventType.STEP_UP_FOR_RETRY
        wait_for(
            lambda: bool(step_events(instance, first, refused, "persist")),
            60,
            "the database refusing the first batch's rows (its persist step up for retry)",
        )
        assert accounting(database_url, settings.kafka_topic) == {}, "a batch stored too early"
        assert step_in_progress(instance, second, "wait_for_earlier_batches"), (
            "the second batch went on while the first one's rows were refused"
        )
        accept_writes(database_url, "scored_transactions")
        records = wait_until_settled(instance, database_url, settings.kafka_topic, sent, log)

    assert accounting(database_url, settings.kafka_topic) == {(0, o): 1 for o in range(sent)}
    assert {r.dagster_run.status for r in records} == {dg.DagsterRunStatus.SUCCESS}
    (runs,) = by_partition(records).values()
    assert [offsets(r) for r in runs] == [(0, 39), (40, 79)]
    assert same_partition_overlaps(runs) == 1, timeline(runs)
    assert_partition_runs_in_offset_order(instance, database_url, runs, sent)
    (wait,) = instance.get_run_step_stats(
        runs[1].dagster_run.run_id, step_keys=["transaction_batch.wait_for_earlier_batches"]
    )
    first_stored = stored_at(database_url, settings.kafka_topic)[(0, 0)]
    assert wait.start_time < first_stored <= wait.end_time, (
        "the second batch's wait must begin before the first batch's rows are stored and end "
        f"only once they are: {timeline(runs)}; wait {wait.start_time:.2f}..{wait.end_time:.2f}, "
        f"stored {first_stored:.2f}"
    )


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

        grown = time.time()
        ensure_topic(options, settings.kafka_topic, 4)

        def saw_the_new_partitions_empty() -> bool:
            """A tick started after the topic grew, done, whose cursor has 2 and 3 at 0."""
            for tick in sensor_ticks(instance, KAFKA_SENSOR_NAME, after=grown):
                if tick.is_completed and tick.cursor:
                    next_offsets = json.loads(tick.cursor)["next_offsets"]
                    if next_offsets.get("2") == 0 and next_offsets.get("3") == 0:
                        return True
            return False

        wait_for(saw_the_new_partitions_empty, 60, "a tick seeing the new, still empty partitions")
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
        assert_partition_runs_in_offset_order(instance, database_url, runs, end[partition])
    assert {r.dagster_run.status for r in records} == {dg.DagsterRunStatus.SUCCESS}
