"""Sensors: the Kafka poller that launches batch runs, the alert retrier, the failure mailer,
and the watch for runs whose worker died with its server."""

from __future__ import annotations

import json
import time
from collections.abc import Collection
from datetime import timedelta

import dagster as dg
from sqlalchemy.exc import SQLAlchemyError

from fraud_dagster.alerts import RunFailureNotice, SmtpMailer, render_run_failure
from fraud_dagster.batching import (
    TAG_OFFSET_RANGE,
    TAG_PARTITION,
    TAG_TOPIC,
    SensorCursor,
    plan_batches,
)
from fraud_dagster.errors import FraudDagsterError
from fraud_dagster.jobs import (
    SEND_PENDING_ALERTS_JOB,
    batch_run_config,
    score_transactions_job,
    send_pending_alerts_job,
)
from fraud_dagster.ops import RUNNING_STATUSES
from fraud_dagster.resources import DatabaseResource, KafkaResource, SmtpResource
from fraud_dagster.run_health import dead_worker_message, runs_with_dead_workers
from fraud_dagster.settings import Settings
from fraud_dagster.storage.store import outbox_status

KAFKA_SENSOR_NAME = "kafka_transactions_sensor"
WAITING_STATUSES = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED]
# Runs not finished yet: waiting in the queue or being launched or executed.
IN_FLIGHT_STATUSES = [*WAITING_STATUSES, *RUNNING_STATUSES]


# Dagster's sensor daemon evaluates sensors on a 5-second loop and skips a sensor while less
# than its minimum interval has passed since its previous tick *started*, which is a few
# milliseconds after that loop began. An interval of exactly 5 s is therefore skipped on every
# other loop (measured: ticks 10 s apart, p50, with interval 5).
TICK_SLACK_SECONDS = 1


def dagster_minimum_interval(interval_seconds: int) -> int:
    """The `minimum_interval_seconds` that gives a tick every `interval_seconds` (rounded up to
    the daemon's 5-second loop): one second of slack so the loop that is due does tick."""
    return max(1, interval_seconds - TICK_SLACK_SECONDS)


def _partitions_not_to_batch(instance: dg.DagsterInstance, topic: str) -> set[int]:
    """Partitions of `topic` that get no new batch this tick: one runs query a tick.

    Behind a QueuedRunCoordinator (whose per-partition tag limit, two in dagster.yaml, starts a
    partition's runs in order) a partition may have batches under way and one waiting: the
    waiting one starts as soon as a slot frees, without waiting for a sensor tick, and its
    wait_for_earlier_batches step keeps the order of the features. Any other coordinator would
    start it at once, whatever else runs, so there a running batch also holds its partition
    back.
    """
    pipelined = isinstance(instance.run_coordinator, dg.QueuedRunCoordinator)
    runs = instance.get_runs(
        filters=dg.RunsFilter(
            job_name=score_transactions_job.name,
            statuses=WAITING_STATUSES if pipelined else IN_FLIGHT_STATUSES,
            tags={TAG_TOPIC: topic},
        )
    )
    return {int(run.tags[TAG_PARTITION]) for run in runs if TAG_PARTITION in run.tags}


def build_kafka_transactions_sensor(settings: Settings) -> dg.SensorDefinition:
    """Poll the topic's end offsets and request one run per new offset range of a partition.

    The cursor holds {partition: next offset}; run keys are `<topic>/<partition>/<first>-<last>`,
    so a range is never launched twice. A partition whose next batch is still waiting in the run
    queue gets no other one until it starts; the next one then takes everything that arrived
    meanwhile (see `_partitions_not_to_batch`).
    If the broker cannot be reached the tick is skipped with the reason and the cursor stays
    where it was: nothing is skipped over.
    """

    @dg.sensor(
        name=KAFKA_SENSOR_NAME,
        job=score_transactions_job,
        minimum_interval_seconds=dagster_minimum_interval(settings.sensor_interval_seconds),
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=(
            "Launches a score_transactions run for each new offset range (at most "
            f"{settings.max_batch_size} messages) of each partition of the transaction topic."
        ),
    )
    def kafka_transactions_sensor(
        context: dg.SensorEvaluationContext, kafka: KafkaResource
    ) -> dg.SensorResult | dg.SkipReason:
        cursor = SensorCursor.parse(context.cursor, kafka.topic)
        try:
            beginning, end = kafka.offset_bounds()
            new_partitions = set(end) - set(cursor.next_offsets)
            committed = kafka.committed_offsets() if new_partitions else {}
        except FraudDagsterError as exc:
            return dg.SkipReason(f"Kafka unavailable, cursor unchanged: {exc}")
        plan = plan_batches(
            cursor,
            beginning,
            end,
            committed,
            max_batch_size=settings.max_batch_size,
            max_batches=settings.max_runs_per_tick,
            busy_partitions=_partitions_not_to_batch(context.instance, kafka.topic),
        )
        for note in plan.notes:
            context.log.warning(note)
        if plan.backlog_messages:
            context.log.info(f"{plan.backlog_messages} messages left for the next tick")
        if not plan.batches:
            return dg.SensorResult(
                skip_reason=dg.SkipReason(f"no new messages on {kafka.topic}"),
                cursor=plan.cursor.serialize(),
            )
        return dg.SensorResult(
            run_requests=[
                dg.RunRequest(
                    run_key=batch.run_key,
                    run_config=batch_run_config(batch),
                    tags=batch.tags(),
                )
                for batch in plan.batches
            ],
            cursor=plan.cursor.serialize(),
        )

    return kafka_transactions_sensor


def build_retry_alerts_sensor(settings: Settings) -> dg.SensorDefinition:
    """Launch a `send_pending_alerts` run whenever outbox alerts are due.

    Due: failed alerts whose backoff has passed, pending alerts older than the grace period (a
    batch run died before its alert step), claims abandoned by a dead sender. One retry run at
    a time; claims keep it from sending what a batch run is sending.
    """
    grace = settings.alert_pending_grace_seconds

    @dg.sensor(
        name="retry_alerts",
        job=send_pending_alerts_job,
        minimum_interval_seconds=settings.alert_retry_interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=(
            "Resends alert emails that SMTP refused or never got (outbox rows failed past their "
            "backoff, or pending for more than the grace period)."
        ),
    )
    def retry_alerts(
        context: dg.SensorEvaluationContext, database: DatabaseResource
    ) -> dg.RunRequest | dg.SkipReason:
        running = context.instance.get_runs(
            filters=dg.RunsFilter(job_name=SEND_PENDING_ALERTS_JOB, statuses=IN_FLIGHT_STATUSES),
            limit=1,
        )
        if running:
            return dg.SkipReason(f"run {running[0].run_id} is already sending alerts")
        try:
            status = outbox_status(database.get_engine(), pending_grace=timedelta(seconds=grace))
        except (SQLAlchemyError, FraudDagsterError) as exc:
            return dg.SkipReason(f"database unavailable, alerts not checked: {exc}")
        if not status.due:
            waiting = (
                f"; {status.unsent} unsent, next attempt at {status.next_attempt_at:%H:%M:%S} UTC"
                if status.next_attempt_at
                else ""
            )
            return dg.SkipReason(f"no alert due{waiting}")
        return dg.RunRequest(
            run_config={
                "ops": {
                    "send_due_alerts": {
                        "config": {
                            "pending_grace_seconds": grace,
                            "max_alerts": settings.alert_retry_max_per_run,
                        }
                    }
                }
            },
        )

    return retry_alerts


def _error_chain(error: object) -> str:
    """A step's error and its causes, innermost last, without tracebacks."""
    parts = []
    while error is not None:
        parts.append(getattr(error, "message", str(error)).strip())
        error = getattr(error, "cause", None)
    return "\ncaused by: ".join(parts)


def build_run_failure_sensor(settings: Settings) -> dg.SensorDefinition:
    """Email the operators (not the analysts) when any run of this code location fails."""

    @dg.run_failure_sensor(
        name="email_operators_on_run_failure",
        default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=dagster_minimum_interval(settings.sensor_interval_seconds),
        description=(
            "Emails FRAUD_OPERATOR_RECIPIENTS the run id, offset range and error of every "
            "failed run."
        ),
    )
    def email_operators_on_run_failure(
        context: dg.RunFailureSensorContext, smtp: SmtpResource
    ) -> None:
        run = context.dagster_run
        tags = run.tags
        offset_range = (
            f"{tags[TAG_TOPIC]}/{tags[TAG_PARTITION]} offsets {tags[TAG_OFFSET_RANGE]}"
            if TAG_OFFSET_RANGE in tags
            else None
        )
        errors = [
            _error_chain(event.step_failure_data.error)
            for event in context.get_step_failure_events()
            if event.step_failure_data.error is not None
        ] or [context.failure_event.message or "the run failed (see its event log)"]
        attempt = int(tags.get("dagster/retry_number", "0"))
        max_retries = int(tags.get("dagster/max_retries", context.instance.run_retries_max_retries))
        if context.instance.run_retries_enabled and attempt < max_retries:
            retry_note = f"attempt {attempt + 1} of {max_retries + 1}; Dagster retries it"
        else:
            retry_note = f"attempt {attempt + 1}; no automatic retry left, rerun it by hand"
        notice = RunFailureNotice(run.run_id, run.job_name, offset_range, tuple(errors), retry_note)
        message = render_run_failure(notice, smtp.sender, smtp.operator_recipients)
        with SmtpMailer(smtp.smtp_settings()) as mailer:
            mailer.send(message)
        context.log.info(f"emailed the operators about failed run {run.run_id}")

    return email_operators_on_run_failure


# A run seen with its worker gone is failed only when a tick at least this much later still sees
# it so: if the server that launched it is alive, that server fails it first (within a second).
DEAD_WORKER_CONFIRM_SECONDS = 5.0


def build_dead_worker_sensor(settings: Settings, job_names: Collection[str]) -> dg.SensorDefinition:
    """Mark failed the STARTED runs of `job_names` whose worker process died with its server.

    Failed, not canceled: Dagster then retries them (`run_retries`, same offsets, idempotent
    writes) and `email_operators_on_run_failure` tells the operators, exactly as for any other
    failure; until then such a run holds a run slot for ever (see `run_health`). The cursor
    holds {run id: when it was first seen dead}.
    """

    @dg.sensor(
        name="fail_runs_whose_worker_died",
        minimum_interval_seconds=dagster_minimum_interval(settings.run_health_interval_seconds),
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=(
            "Marks failed (so that Dagster retries them) the runs left STARTED by a worker "
            "process that died together with the server that launched it."
        ),
    )
    def fail_runs_whose_worker_died(context: dg.SensorEvaluationContext) -> dg.SkipReason:
        instance = context.instance
        if not isinstance(instance.run_launcher, dg.DefaultRunLauncher):
            return dg.SkipReason("runs are not local processes of this host: nothing to check")
        first_seen: dict[str, float] = json.loads(context.cursor or "{}")
        now = time.time()
        still_dead: dict[str, float] = {}
        failed = []
        for worker in runs_with_dead_workers(instance, job_names):
            seen = first_seen.get(worker.run_id, now)
            run = instance.get_run_by_id(worker.run_id)
            if run is None or run.status != dg.DagsterRunStatus.STARTED:
                continue  # finished meanwhile (its worker wrote the end, then exited)
            if now - seen < DEAD_WORKER_CONFIRM_SECONDS:
                still_dead[worker.run_id] = seen
                continue
            instance.report_run_failed(run, dead_worker_message(worker))
            context.log.warning(f"run {run.run_id}: worker pid {worker.pid} gone, marked failed")
            failed.append(f"{run.run_id} (pid {worker.pid})")
        context.update_cursor(json.dumps(still_dead))
        if failed:
            return dg.SkipReason(f"marked failed, worker gone: {', '.join(failed)}")
        if still_dead:
            return dg.SkipReason(f"worker gone, confirming next tick: {', '.join(still_dead)}")
        return dg.SkipReason("no started run has lost its worker")

    return fail_runs_whose_worker_died
