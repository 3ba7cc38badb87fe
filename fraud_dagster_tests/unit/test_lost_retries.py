"""Telling a failed run whose automatic retry was lost, and the sensor that reports it again.

A real Dagster test instance with run retries on, and no daemon: a run failed here is exactly
what the daemon's race leaves behind (FAILURE, tagged `dagster/will_retry=true`, no retry).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator

import dagster as dg
import pytest

from fraud_dagster.definitions import build_definitions
from fraud_dagster.lost_retries import (
    AUTO_RETRY_RUN_ID_TAG,
    WILL_RETRY_TAG,
    is_lost_retry_report,
    runs_missing_their_retry,
)
from fraud_dagster.sensors import REPORT_AGAIN_AFTER_SECONDS
from fraud_dagster.settings import load_settings
from fraud_dagster_tests.unit.test_run_health import job_named

JOB = "score_transactions"


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    overrides = {"run_retries": {"enabled": True, "max_retries": 2}}
    with dg.instance_for_test(overrides=overrides) as test_instance:
        yield test_instance


def failed_run(
    instance: dg.DagsterInstance, job: str = JOB, tags: dict[str, str] | None = None, **kwargs
) -> str:
    """A run that started and failed, as its worker reports it (Dagster tags it will_retry)."""
    run = instance.create_run_for_job(
        job_named(job), status=dg.DagsterRunStatus.STARTED, tags=tags, **kwargs
    )
    instance.report_run_failed(run, "step failed")
    return run.run_id


def failures(instance: dg.DagsterInstance, run_id: str) -> list[dg.EventLogEntry]:
    records = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.RUN_FAILURE).records
    return [record.event_log_entry for record in records]


def lost(instance: dg.DagsterInstance, later: float, after: float = 60.0) -> set[str]:
    found = runs_missing_their_retry(instance, {JOB}, time.time() + later, after)
    return {run.run_id for run in found}


def test_only_failed_runs_tagged_to_retry_with_no_retry_for_a_while_are_lost(
    instance: dg.DagsterInstance,
) -> None:
    orphan = failed_run(instance)
    retried = failed_run(instance)
    instance.add_run_tags(retried, {AUTO_RETRY_RUN_ID_TAG: "some-retry"})
    with_a_child = failed_run(instance)
    reexecution = {"dagster/parent_run_id": with_a_child, "dagster/root_run_id": with_a_child}
    instance.create_run_for_job(  # as Dagster creates a re-execution (tags and fields)
        job_named(JOB), parent_run_id=with_a_child, root_run_id=with_a_child, tags=reexecution
    )
    no_retry_left = failed_run(instance, tags={"dagster/max_retries": "0"})
    other_job = failed_run(instance, job="train_model")

    assert instance.get_run_by_id(orphan).tags[WILL_RETRY_TAG] == "true"
    assert instance.get_run_by_id(no_retry_left).tags[WILL_RETRY_TAG] == "false"
    assert instance.get_run_by_id(other_job).tags[WILL_RETRY_TAG] == "true"
    assert lost(instance, later=0) == set(), "just failed: Dagster's daemon may still retry it"
    assert lost(instance, later=61) == {orphan}
    assert {
        r.run_id for r in runs_missing_their_retry(instance, {"train_model"}, time.time() + 61, 60)
    } == {other_job}


def tick(instance: dg.DagsterInstance, cursor: str | None) -> dg.SensorExecutionData:
    settings = dataclasses.replace(load_settings(), lost_retry_after_seconds=0.0)
    sensor = build_definitions(settings).resolve_sensor_def("recover_lost_automatic_retries")
    with dg.build_sensor_context(instance=instance, cursor=cursor) as context:
        return sensor.evaluate_tick(context)


def test_the_sensor_reports_a_lost_retry_once_so_that_the_daemon_sees_a_failed_run(
    instance: dg.DagsterInstance,
) -> None:
    orphan = failed_run(instance)

    first = tick(instance, cursor=None)

    assert orphan in first.skip_message
    original, again = failures(instance, orphan)
    assert not is_lost_retry_report(original), "the real failure is mailed"
    assert is_lost_retry_report(again)
    assert "had not launched its retry" in again.message
    run = instance.get_run_by_id(orphan)
    # What Dagster's daemon reads with the new event: a failed run it should retry.
    assert run.status == dg.DagsterRunStatus.FAILURE
    assert run.tags[WILL_RETRY_TAG] == "true"
    assert set(json.loads(first.cursor)) == {orphan}

    second = tick(instance, cursor=first.cursor)
    assert len(failures(instance, orphan)) == 2, "reported again on the next tick"
    assert "has its retry" in second.skip_message

    # The daemon was down all along: after REPORT_AGAIN_AFTER_SECONDS it is reported again.
    long_ago = json.dumps({orphan: time.time() - REPORT_AGAIN_AFTER_SECONDS - 1})
    tick(instance, cursor=long_ago)
    assert len(failures(instance, orphan)) == 3

    # Retried (by the daemon, once it read the event): nothing more to do.
    instance.add_run_tags(orphan, {AUTO_RETRY_RUN_ID_TAG: "the-retry"})
    tick(instance, cursor=None)
    assert len(failures(instance, orphan)) == 3
