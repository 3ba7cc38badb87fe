"""Which runs tried each batch of an unstored range, read from a real Dagster test instance
(runs recorded with the tags the sensor gives them, no daemon), and how the status and the
operators' email word them."""

from __future__ import annotations

import dataclasses
import email
import email.policy
from collections.abc import Iterator
from datetime import datetime

import dagster as dg
import pytest

from fraud_dagster.alerts import batch_run_lines, render_unstored_notice
from fraud_dagster.batching import PlannedBatch
from fraud_dagster.gap_watch import GapNotice
from fraud_dagster.kafka_io import Retention
from fraud_dagster.range_runs import BatchRuns, batches_of_range, with_batch_runs
from fraud_dagster.storage.outbox import OutboxStatus
from fraud_dagster.stream_status import Gap, PartitionStatus, StreamStatus, render_status
from fraud_dagster_tests.unit.test_run_health import job_named

JOB = "score_transactions"
TOPIC_ID = "5pWZ3ZnURDqJ5D3vZ0oXjw"


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as test_instance:
        yield test_instance


def batch_run(
    instance: dg.DagsterInstance,
    first: int,
    last: int,
    status: dg.DagsterRunStatus = dg.DagsterRunStatus.FAILURE,
    partition: int = 0,
    topic_id: str | None = TOPIC_ID,
    job: str = JOB,
    topic: str = "tx",
) -> str:
    """A run of the batch first..last, recorded in `status` with the tags the sensor gives it."""
    tags = PlannedBatch(topic, partition, first, last, topic_id=topic_id).tags()
    run = instance.create_run_for_job(job_named(job), status=status, tags=tags)
    return run.run_id


def test_each_batch_of_a_range_is_named_by_its_newest_run_and_counted(
    instance: dg.DagsterInstance,
) -> None:
    batch_run(instance, 10, 14)  # failed, then retried by Dagster: failed again
    retried = batch_run(instance, 10, 14)
    running = batch_run(instance, 15, 19, dg.DagsterRunStatus.STARTED)
    batch_run(instance, 10, 14, partition=1)  # another partition
    batch_run(instance, 15, 19, job="send_pending_alerts")  # another job

    found = batches_of_range(instance, JOB, "tx", 0, Gap(10, 19), TOPIC_ID)

    assert found == (
        BatchRuns(10, 14, retried, "FAILURE", 2),
        BatchRuns(15, 19, running, "STARTED", 1),
    )


def test_the_walk_stops_where_no_run_starts_and_after_its_limit(
    instance: dg.DagsterInstance,
) -> None:
    first = batch_run(instance, 10, 14)
    batch_run(instance, 20, 24)  # no run starts at 15: 15..24 are left to the tag filter
    assert [b.run_id for b in batches_of_range(instance, JOB, "tx", 0, Gap(10, 24))] == [first]

    for start in range(30, 60, 5):
        batch_run(instance, start, start + 4)
    limited = batches_of_range(instance, JOB, "tx", 0, Gap(30, 59), limit=3)
    assert [(b.first, b.last) for b in limited] == [(30, 34), (35, 39), (40, 44)]
    assert batches_of_range(instance, JOB, "tx", 0, Gap(70, 79)) == ()


def test_runs_of_an_earlier_topic_of_the_same_name_do_not_count(
    instance: dg.DagsterInstance,
) -> None:
    batch_run(instance, 10, 19, topic_id="an-earlier-topic-id")
    assert batches_of_range(instance, JOB, "tx", 0, Gap(10, 19), TOPIC_ID) == ()

    untagged = batch_run(instance, 10, 19, topic_id=None)  # launched without the id: counts
    (batch,) = batches_of_range(instance, JOB, "tx", 0, Gap(10, 19), TOPIC_ID)
    assert batch.run_id == untagged


def outbox() -> OutboxStatus:
    return OutboxStatus({}, 0, None, None, None, None)


def test_the_status_lists_the_runs_under_their_range_with_a_link_and_what_to_do(
    instance: dg.DagsterInstance,
) -> None:
    failed = batch_run(instance, 10, 14, dg.DagsterRunStatus.FAILURE)
    starting = batch_run(instance, 15, 19, dg.DagsterRunStatus.STARTING)
    partition = PartitionStatus(0, 0, 60, 10, 10, 60, gaps=[Gap(10, 29), Gap(40, 49)])
    status = StreamStatus("tx", "g", [partition], outbox(), Retention(604800000), TOPIC_ID)

    lines = render_status(with_batch_runs(status, instance, JOB), "http://ui:3000/")

    assert lines[2].startswith("  NOT STORED: offsets 10-29 (20)") and "its runs below" in lines[2]
    assert lines[3] == (
        f"    batch 10-14: run {failed} FAILURE (1 run(s) of it in all): re-execute it from "
        f"failure, http://ui:3000/runs/{failed}"
    )
    assert lines[4] == (
        f"    batch 15-19: run {starting} STARTING (1 run(s) of it in all): under way, "
        f"http://ui:3000/runs/{starting}"
    )
    assert lines[5] == (
        "    offsets 20-29: their runs: Runs -> filter tags fraud_dagster/partition=0, "
        "fraud_dagster/first_offset=20"
    )
    assert "its run: Runs -> filter tags" in lines[6] and "first_offset=40" in lines[6]
    assert len(lines) == 8  # then the outbox line: no batch found for 40-49, no lines for it


def test_the_operators_email_names_the_run_to_re_execute() -> None:
    gap = Gap(10, 19, 0, datetime(2026, 11, 30, 10), datetime(2026, 12, 7, 10))
    found = dataclasses.replace(gap, batches=(BatchRuns(10, 19, "r-1", "CANCELED", 3),))

    raw = render_unstored_notice(
        [GapNotice(0, found, "unstored")],
        "tx",
        Retention(604800000),
        "from@x",
        ["ops@x"],
        "http://ui",
    ).as_bytes()
    body = email.message_from_bytes(raw, policy=email.policy.default).get_content()

    assert (
        "  batch 10-19: run r-1 CANCELED (3 run(s) of it in all): re-execute it from failure, "
        "http://ui/runs/r-1"
    ) in body
    assert "filter tags" not in body
    assert batch_run_lines(gap, 0, "http://ui") == []  # Dagster not read: the email's tag hint


def test_a_batch_that_succeeded_into_another_database_is_to_be_re_executed_whole(
    instance: dg.DagsterInstance,
) -> None:
    # Its run stored 10-19, but not in the database read now (replaced or restored since):
    # re-executing it from failure would do nothing, every step must run again.
    succeeded = batch_run(instance, 10, 19, dg.DagsterRunStatus.SUCCESS)
    partition = PartitionStatus(0, 0, 60, 10, 10, 60, gaps=[Gap(10, 19)])
    status = StreamStatus("tx", "g", [partition], outbox(), Retention(604800000), TOPIC_ID)

    lines = render_status(with_batch_runs(status, instance, JOB), None)

    assert lines[3] == (
        f"    batch 10-19: run {succeeded} SUCCESS (1 run(s) of it in all): it succeeded, yet "
        "this database has no record of its offsets (a replaced or restored database?): "
        "re-execute it, all steps"
    )
