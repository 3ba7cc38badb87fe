"""Failed runs whose automatic retry Dagster decided on but never launched.

Dagster (1.13) records a run's failure in three writes: the RUN_FAILURE event, then the run's
FAILURE status, then its `dagster/will_retry` tag. Its daemon retries runs from the RUN_FAILURE
events it reads every few seconds; if it reads the event between the first two writes, it
sees a run that has not failed yet, does not retry it, and moves its cursor past the event for
good. The run then says "will retry" (the UI and the operators' email say so too) but nothing
ever retries it: its batch stays unstored until someone reruns it by hand. Seen in this
project's test suite on a loaded 2-core machine: about 1-2 % of failed runs.

Such a run is recognized from the instance alone: FAILURE, tagged `dagster/will_retry=true`,
no `dagster/auto_retry_run_id` tag and no run re-executing it, a while after it ended. Reporting
its failure again (one more RUN_FAILURE event, with a message saying why) makes the daemon read
it once more, now FAILURE, and launch the retry through its own path (same run group, retry
number, parent): Dagster's retry is idempotent per failed run, so a run whose retry was only
late gets no second one.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime

import dagster as dg

WILL_RETRY_TAG = "dagster/will_retry"
AUTO_RETRY_RUN_ID_TAG = "dagster/auto_retry_run_id"
RETRY_NUMBER_TAG = "dagster/retry_number"  # on automatic retries only
PARENT_RUN_ID_TAG = "dagster/parent_run_id"  # on every re-execution
# The first words of the re-reported failure's message: the operators' failure email skips
# these events (the run's failure was mailed when it happened).
LOST_RETRY_MARK = "Failure reported again"
# How far back failed runs are looked at; older ones were long rerun by hand or given up.
LOOKBACK_SECONDS = 24 * 3600.0
FAILED_RUNS_TO_READ = 200


@dataclass(frozen=True)
class LostRetry:
    """A failed run waiting for a retry nobody launched, and when it ended (epoch seconds)."""

    run_id: str
    job_name: str
    ended_at: float


def runs_missing_their_retry(
    instance: dg.DagsterInstance, job_names: Collection[str], now: float, after_seconds: float
) -> list[LostRetry]:
    """Failed runs of `job_names` that ended at least `after_seconds` before `now`, are tagged
    to be retried, and have no retry (one runs query, then one run-group query per candidate)."""
    records = instance.get_run_records(
        filters=dg.RunsFilter(
            statuses=[dg.DagsterRunStatus.FAILURE],
            tags={WILL_RETRY_TAG: "true"},
            updated_after=datetime.fromtimestamp(now - LOOKBACK_SECONDS, UTC),
        ),
        limit=FAILED_RUNS_TO_READ,
    )
    lost = []
    for record in records:
        run = record.dagster_run
        ended_at = record.end_time or record.update_timestamp.timestamp()
        if (
            run.job_name not in job_names
            or AUTO_RETRY_RUN_ID_TAG in run.tags
            or now - ended_at < after_seconds
            or _has_a_child_run(instance, run.run_id)
        ):
            continue
        lost.append(LostRetry(run.run_id, run.job_name, ended_at))
    return lost


def _has_a_child_run(instance: dg.DagsterInstance, run_id: str) -> bool:
    """Whether a run re-executes this one (a retry created but not yet tagged on its parent, or
    an operator's re-execution: either way the batch is not forgotten)."""
    group = instance.get_run_group(run_id)
    return group is not None and any(run.parent_run_id == run_id for run in group[1])


def lost_retry_message(lost: LostRetry, waited_seconds: float) -> str:
    """The re-reported failure's message: the run's event log and the UI show it."""
    return (
        f"{LOST_RETRY_MARK} by the recover_lost_automatic_retries sensor: this run failed and "
        f"is tagged to be retried, but {waited_seconds:.0f} s later Dagster had not launched "
        "its retry (its daemon read the failure before the run's status was written). "
        "Reporting the failure again lets the daemon launch the retry; the run's writes are "
        "idempotent."
    )


def is_lost_retry_report(entry: dg.EventLogEntry) -> bool:
    """Whether a RUN_FAILURE event is this module's re-report rather than a real failure."""
    return (entry.message or "").startswith(LOST_RETRY_MARK)
