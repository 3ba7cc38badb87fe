"""Offsets Kafka's retention deleted before a batch read them: the pipeline was stopped for longer
than the topic's retention.ms, or a failed batch is rerun after it.

What is still on the broker must be read and stored once, the deleted offsets recorded as lost
(not a run that fails on every rerun while the rest of its range waits unread), the consumer group
committed past them, and the loss shown as a failed ERROR check. Retention is applied with the
admin API's DeleteRecords, which moves the partition's log start offset as a deleted segment does;
broker, Dagster instance and databases are real.
"""

from __future__ import annotations

import dagster as dg
import pytest

from fraud_dagster.batching import PlannedBatch
from fraud_dagster.definitions import build_definitions
from fraud_dagster.jobs import batch_run_config
from fraud_dagster.producer import synthetic_transactions
from fraud_dagster.resources import resolved_resources
from fraud_dagster.settings import Settings
from fraud_dagster.simulator import to_messages
from fraud_dagster.storage import schema
from fraud_dagster_tests.helpers import (
    RUN_KEY_TAG,
    delete_before,
    produce,
    table_rows,
    tick_and_run,
)
from fraud_dagster_tests.operations_support import reexecute

pytestmark = pytest.mark.services


def stored_offsets(database_url: str) -> list[int]:
    """Every offset stored as scored or rejected, with repeats (there must be none)."""
    return sorted(
        row["source_offset"]
        for table in (schema.scored_transactions, schema.rejected_transactions)
        for row in table_rows(database_url, table)
    )


def lost(database_url: str) -> list[tuple[int, int, str]]:
    return sorted(
        (row["first_offset"], row["last_offset"], row["run_id"])
        for row in table_rows(database_url, schema.lost_ranges)
    )


def offsets_read_check(instance: dg.DagsterInstance, run_id: str) -> dg.AssetCheckEvaluation:
    records = instance.get_records_for_run(
        run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION
    ).records
    (evaluation,) = [
        r.event_log_entry.dagster_event.event_specific_data
        for r in records
        if r.event_log_entry.dagster_event.event_specific_data.check_name == "offsets_read"
    ]
    return evaluation


def test_offsets_deleted_while_stopped_are_recorded_as_lost_and_the_rest_is_stored_once(
    instance: dg.DagsterInstance, database_url: str, settings: Settings
) -> None:
    defs = build_definitions(settings)
    kafka = resolved_resources(settings)["kafka"]
    messages = to_messages(synthetic_transactions(400, seed=41))
    produce(settings, messages[:100])
    cursor, executed, _ = tick_and_run(defs, settings, instance, cursor=None)
    assert len(executed) == 1 and kafka.committed_offsets() == {0: 100}

    # The pipeline stops; 300 more arrive; retention deletes up to offset 250 meanwhile.
    produce(settings, messages[100:])
    delete_before(settings, 250)

    cursor, executed, skipped = tick_and_run(defs, settings, instance, cursor=cursor)
    assert skipped == [] and len(executed) == 1
    (run,) = instance.get_runs(dg.RunsFilter(tags={RUN_KEY_TAG: executed[0]}))
    assert (run.tags["fraud_dagster/first_offset"], run.tags["fraud_dagster/last_offset"]) == (
        "100",
        "399",
    )
    assert stored_offsets(database_url) == [*range(100), *range(250, 400)]
    assert lost(database_url) == [(100, 249, run.run_id)]
    assert kafka.committed_offsets() == {0: 400}
    check = offsets_read_check(instance, run.run_id)
    assert not check.passed and check.severity == dg.AssetCheckSeverity.ERROR
    assert check.metadata["lost_offsets"].value == 150
    assert "100..249" in check.description

    # The operator reruns the batch ("Re-execute all"): nothing is stored or recorded twice.
    rerun = reexecute(instance, run.run_id, from_failure=False)
    assert rerun.success
    assert stored_offsets(database_url) == [*range(100), *range(250, 400)]
    assert lost(database_url) == [(100, 249, run.run_id)]  # the first run's record, once
    assert not offsets_read_check(instance, rerun.run_id).passed  # what is stored says so
    assert kafka.committed_offsets() == {0: 400}


@pytest.mark.backends("sqlite")
def test_batch_runs_whose_range_retention_deleted_in_part_or_whole_store_what_is_left(
    instance: dg.DagsterInstance, database_url: str, settings: Settings
) -> None:
    """As when a failed batch is rerun after the topic's retention time. Before, such a run
    failed with OffsetRangeError on every rerun: offsets 60..99, still on the broker, were never
    read and the group stayed at 0."""
    defs = build_definitions(settings)
    kafka = resolved_resources(settings)["kafka"]
    produce(settings, to_messages(synthetic_transactions(100, seed=42)))
    delete_before(settings, 60)
    job = defs.resolve_job_def("score_transactions")

    def run_range(first: int, last: int) -> dg.ExecuteInProcessResult:
        batch = PlannedBatch(settings.kafka_topic, 0, first, last)
        return job.execute_in_process(run_config=batch_run_config(batch), instance=instance)

    whole_range_gone = run_range(0, 39)
    assert whole_range_gone.success
    assert stored_offsets(database_url) == []
    partly_gone = run_range(40, 99)
    assert partly_gone.success
    assert stored_offsets(database_url) == list(range(60, 100))
    assert lost(database_url) == [
        (0, 39, whole_range_gone.run_id),
        (40, 59, partly_gone.run_id),
    ]
    assert kafka.committed_offsets() == {0: 100}
