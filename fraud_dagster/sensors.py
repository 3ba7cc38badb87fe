"""Sensors: the Kafka poller that launches batch runs, the alert retrier, the operators' mailers
(failed runs, canceled batch runs, an unreadable topic, offsets left unstored) and the watches
for runs whose worker died with its server and for failed runs whose automatic retry was lost."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from email.message import Message
from typing import Literal

import dagster as dg
from sqlalchemy.exc import SQLAlchemyError

from fraud_dagster.alert_claims import abandoned_claims
from fraud_dagster.alerts import (
    MessageRefusedError,
    RunFailureNotice,
    SmtpMailer,
    render_kafka_notice,
    render_run_failure,
    render_unstored_notice,
    run_page_url,
)
from fraud_dagster.batching import (
    TAG_OFFSET_RANGE,
    TAG_PARTITION,
    TAG_TOPIC,
    TAG_TOPIC_ID,
    SensorCursor,
    new_key_tag,
    past_launched_ranges,
    plan_batches,
)
from fraud_dagster.errors import AlertDeliveryError, FraudDagsterError
from fraud_dagster.event_cursor import RunEventCursor
from fraud_dagster.gap_watch import GapWatch, gaps_to_mail
from fraud_dagster.jobs import (
    SEND_PENDING_ALERTS_JOB,
    batch_run_config,
    score_transactions_job,
    send_pending_alerts_job,
)
from fraud_dagster.kafka_watch import KafkaWatch, observe
from fraud_dagster.lost_retries import (
    PARENT_RUN_ID_TAG,
    RETRY_NUMBER_TAG,
    WILL_RETRY_TAG,
    is_lost_retry_report,
    lost_retry_message,
    runs_missing_their_retry,
)
from fraud_dagster.ops import RETRY_ON_OP_FAILURE_TAG, RUNNING_STATUSES, batch_runs
from fraud_dagster.range_runs import notices_with_batch_runs
from fraud_dagster.resources import DatabaseResource, KafkaResource, SmtpResource
from fraud_dagster.run_health import dead_worker_message, runs_with_dead_workers
from fraud_dagster.settings import Settings
from fraud_dagster.storage.batches import set_aside_previous_topic
from fraud_dagster.storage.outbox import outbox_status
from fraud_dagster.stream_status import stream_status

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


def _newest_batch_runs(
    instance: dg.DagsterInstance, topic: str, limit: int
) -> Sequence[dg.DagsterRun]:
    """The newest `limit` batch runs of `topic`, newest first."""
    return instance.get_runs(
        filters=dg.RunsFilter(job_name=score_transactions_job.name, tags={TAG_TOPIC: topic}),
        limit=limit,
    )


def _cursor_of_a_reset_sensor(
    instance: dg.DagsterInstance, cursor: SensorCursor, now: float
) -> SensorCursor:
    """The cursor a fresh cursor stands for when earlier runs read the topic (the sensor's
    cursor was reset): their topic id, if they recorded one (so that a topic recreated meanwhile
    is seen as such; without one the committed offsets decide, as for any new cursor), and a new
    run-key tag, as the earlier runs' keys may be the ones this tick would plan."""
    latest = _newest_batch_runs(instance, cursor.topic, 1)
    if not latest:
        return cursor
    earlier_id = latest[0].tags.get(TAG_TOPIC_ID)
    return SensorCursor(cursor.topic, {}, earlier_id, new_key_tag(None, "", now))


def _cursor_past_launched_runs(
    instance: dg.DagsterInstance, cursor: SensorCursor, limit: int
) -> SensorCursor:
    """The cursor moved past the batches the newest `limit` runs of the topic cover: what an
    interrupted tick launched but could not record (`past_launched_ranges`). One runs query a
    tick."""
    runs = _newest_batch_runs(instance, cursor.topic, limit)
    return past_launched_ranges(cursor, (run.tags.get("dagster/run_key", "") for run in runs))


def _unfinished_runs(instance: dg.DagsterInstance, topic: str) -> int:
    """How many batch runs of `topic` are queued or under way."""
    return instance.get_runs_count(
        filters=dg.RunsFilter(
            job_name=score_transactions_job.name,
            tags={TAG_TOPIC: topic},
            statuses=IN_FLIGHT_STATUSES,
        )
    )


def build_kafka_transactions_sensor(settings: Settings) -> dg.SensorDefinition:
    """Poll the topic's end offsets and request one run per new offset range of a partition.

    The cursor holds {partition: next offset}; run keys are `<topic>/<partition>/<first>-<last>`,
    so a range is never launched twice. A partition whose next batch is still waiting in the run
    queue gets no other one until it starts; the next one then takes everything that arrived
    meanwhile (see `_partitions_not_to_batch`).
    If the broker cannot be reached the tick is skipped with the reason and the cursor stays
    where it was: nothing is skipped over.

    A topic deleted and created again (its id changed, see `batching`) is read again from its
    beginning, under run keys tagged `<topic>@<tag>/...` that no earlier run has; once no run
    of the previous topic is left unfinished and before its first batch is requested, the
    stored ranges (and, when its id is new, its rows) of the previous topic are set aside
    (`set_aside_previous_topic`). Until then, or if the database cannot be reached, the tick is
    skipped with the cursor unchanged.
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
        context: dg.SensorEvaluationContext, kafka: KafkaResource, database: DatabaseResource
    ) -> dg.SensorResult | dg.SkipReason:
        now = time.time()
        cursor = SensorCursor.parse(context.cursor, kafka.topic)
        try:
            # The id before the offsets: a topic recreated between the two reads is then seen
            # one tick late (its batches read again), never as the old id with the new offsets.
            offsets = kafka.topic_offsets()
            beginning, end = offsets.beginning, offsets.end
            new_partitions = set(end) - set(cursor.next_offsets)
            committed = kafka.committed_offsets() if new_partitions else {}
        except FraudDagsterError as exc:
            return dg.SkipReason(f"Kafka unavailable, cursor unchanged: {exc}")
        if cursor.is_fresh:
            cursor = _cursor_of_a_reset_sensor(context.instance, cursor, now)
        else:
            # An interrupted tick's runs are among the newest: a tick launches at most
            # max_runs_per_tick, retries and reruns of older batches may come after them.
            cursor = _cursor_past_launched_runs(
                context.instance, cursor, 2 * settings.max_runs_per_tick
            )
        plan = plan_batches(
            cursor,
            beginning,
            end,
            committed,
            max_batch_size=settings.max_batch_size,
            max_batches=settings.max_runs_per_tick,
            busy_partitions=_partitions_not_to_batch(context.instance, kafka.topic),
            topic_id=offsets.topic_id,
            now=now,
        )
        for note in plan.notes:
            context.log.warning(note)
        if plan.recreated:
            # A run of the previous topic that stores after the set-aside would record its
            # range for the new topic: wait until none is left (their retries included).
            unfinished = _unfinished_runs(context.instance, kafka.topic)
            if unfinished:
                return dg.SkipReason(
                    f"{kafka.topic} was recreated; waiting for {unfinished} run(s) of the "
                    "previous topic to finish before reading the new one, cursor unchanged"
                )
            try:
                moved = set_aside_previous_topic(
                    database.get_engine(),
                    kafka.topic,
                    plan.cursor.key_tag,
                    with_rows=plan.new_topic_id,
                )
            except (SQLAlchemyError, FraudDagsterError) as exc:
                return dg.SkipReason(
                    f"{kafka.topic} was recreated, but what is stored of the previous topic "
                    f"could not be set aside (database unavailable), cursor unchanged: {exc}"
                )
            context.log.warning(
                f"set aside what is stored of the previous {kafka.topic} under "
                f"{kafka.topic}@before-{plan.cursor.key_tag}: {moved.ranges} stored range(s), "
                f"{moved.scored} scored and {moved.rejected} rejected row(s); the consumer group "
                "is committed only as far as the new topic is stored"
            )
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
    batch run died before its alert step), claims left by a run that has ended (at once) or by
    another sender (once expired). One retry run at a time; claims keep it from sending what a
    batch run is sending.
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
            engine = database.get_engine()
            status = outbox_status(
                engine,
                pending_grace=timedelta(seconds=grace),
                abandoned=abandoned_claims(context.instance, engine),
            )
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


def run_failure_notice(
    run_id: str,
    job_name: str,
    tags: Mapping[str, str],
    errors: Sequence[str],
    retries_enabled: bool,
    default_max_retries: int,
    ui_url: str | None = None,
) -> RunFailureNotice:
    """What the operators' email says about a failed run: its offsets (batch runs carry them in
    tags), its errors, whether Dagster retries it by itself and what is left to do.

    Dagster's own decision (the run's `dagster/will_retry` tag) is used when it is written; it
    counts re-executions by hand too, which a run's `dagster/retry_number` does not show. A run
    the failed op tagged as one no retry fixes (`ops.final_failure`) and the alert sender (the
    retry_alerts sensor is its retry) say so instead of asking for a rerun."""
    if RETRY_NUMBER_TAG in tags:
        attempt = f"attempt {int(tags[RETRY_NUMBER_TAG]) + 1}"
    elif PARENT_RUN_ID_TAG in tags:
        attempt = "a re-execution"
    else:
        attempt = "attempt 1"
    advice = None
    if job_name == SEND_PENDING_ALERTS_JOB:
        retry_note = "the retry_alerts sensor tries the unsent alerts again, with backoff"
        advice = (
            "Nothing to re-execute: the alerts stay in the outbox until a try succeeds. If the "
            "failures go on, fix the SMTP cause (docs/operations.md)."
        )
    elif tags.get(RETRY_ON_OP_FAILURE_TAG) == "false":
        retry_note = f"{attempt}; not retried: a retry would fail the same way"
        advice = "Do not re-execute it: the error above says why, and what to do instead."
    else:
        max_retries = _int_tag(tags, "dagster/max_retries", default_max_retries)
        will_retry = tags.get(WILL_RETRY_TAG)
        if will_retry is None:  # not written yet: Dagster's rule without the run group
            retrying = retries_enabled and _int_tag(tags, RETRY_NUMBER_TAG, 0) < max_retries
        else:
            retrying = will_retry == "true"
        if retrying:
            retry_note = f"{attempt} of {max_retries + 1}; Dagster retries it"
        else:
            retry_note = f"{attempt}; no automatic retry left, rerun it by hand"
    return RunFailureNotice(
        run_id,
        job_name,
        _offset_range(tags),
        tuple(errors),
        retry_note,
        run_page_url(ui_url, run_id),
        advice=advice,
    )


def _int_tag(tags: Mapping[str, str], name: str, default: int) -> int:
    """A whole-number tag; an unreadable one (a hand-edited launch) counts as `default`."""
    try:
        return int(tags[name])
    except (KeyError, ValueError):
        return default


def _offset_range(tags: Mapping[str, str]) -> str | None:
    """A batch run's offsets as `<topic>/<partition> offsets <first>-<last>` (from its tags)."""
    if TAG_OFFSET_RANGE not in tags:
        return None
    return (
        f"{tags.get(TAG_TOPIC, '?')}/{tags.get(TAG_PARTITION, '?')} "
        f"offsets {tags[TAG_OFFSET_RANGE]}"
    )


def _failed_run_notice(
    instance: dg.DagsterInstance, run: dg.DagsterRun, failure: dg.EventLogEntry, ui_url: str
) -> RunFailureNotice:
    step_failures = instance.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_FAILURE)
    errors = [
        _error_chain(entry.dagster_event.step_failure_data.error)
        for entry in step_failures
        if entry.dagster_event is not None and entry.dagster_event.step_failure_data.error
    ] or [failure.message or "the run failed (see its event log)"]
    return run_failure_notice(
        run.run_id,
        run.job_name,
        run.tags,
        errors,
        instance.run_retries_enabled,
        instance.run_retries_max_retries,
        ui_url,
    )


RUN_FAILURE_EMAIL_SENSOR = "email_operators_on_run_failure"
CANCELED_BATCH_EMAIL_SENSOR = "email_operators_on_canceled_batch"
# Runs mailed per tick at most; a longer backlog (SMTP was down) goes out on later ticks.
FAILURE_EMAILS_PER_TICK = 20


def _canceled_run_notice(
    instance: dg.DagsterInstance, run: dg.DagsterRun, canceled: dg.EventLogEntry, ui_url: str
) -> RunFailureNotice:
    """A canceled batch run: nobody retries it, and its offsets may be unstored. (`instance` for
    the mailer's signature: the cancel event says all there is.)"""
    return RunFailureNotice(
        run.run_id,
        run.job_name,
        _offset_range(run.tags),
        (canceled.message or "the run was canceled",),
        "none: Dagster does not retry a canceled run",
        run_page_url(ui_url, run.run_id),
        outcome="canceled",
    )


def build_run_failure_sensor(settings: Settings, job_names: Collection[str]) -> dg.SensorDefinition:
    """Email the operators (not the analysts) once about every failed run of `job_names`.

    A plain sensor rather than Dagster's `run_failure_sensor`: that one moves its cursor past a
    failed run even when the email could not be sent, so a failure while SMTP is down was never
    mailed. Here the cursor moves past a RUN_FAILURE event only once the server accepted its
    email (`event_cursor`), so such failures are mailed when SMTP is back. A tick that crashes
    between sending and saving its cursor sends again; the email's Message-ID is the run's, so
    mail clients drop the copy.
    """
    return _run_status_email_sensor(
        settings,
        name=RUN_FAILURE_EMAIL_SENSOR,
        event_type=dg.DagsterEventType.RUN_FAILURE,
        job_names=job_names,
        what="failed run",
        notice=_failed_run_notice,
        outcome="failed",
        # A failure re-reported so that Dagster launches a lost retry was mailed when it happened.
        mailable=lambda entry: not is_lost_retry_report(entry),
        description=(
            "Emails FRAUD_OPERATOR_RECIPIENTS the run id, offset range and error of every "
            "failed run; failures while SMTP is down are mailed when it is back."
        ),
    )


def build_canceled_batch_sensor(settings: Settings) -> dg.SensorDefinition:
    """Email the operators once about every canceled batch run.

    Dagster retries failed runs, not canceled ones (an operator's Terminate, a queued run
    canceled, run monitoring ending a run stuck CANCELING), and the failure sensor does not see
    them: without this, a canceled batch would leave its offsets unread with nothing said but
    the consumer group's lag. Same delivery rules as the failure emails.
    """
    return _run_status_email_sensor(
        settings,
        name=CANCELED_BATCH_EMAIL_SENSOR,
        event_type=dg.DagsterEventType.RUN_CANCELED,
        job_names=[score_transactions_job.name],
        what="canceled batch run",
        notice=_canceled_run_notice,
        outcome="canceled",
        description=(
            "Emails FRAUD_OPERATOR_RECIPIENTS the run id and offset range of every canceled "
            "batch run: Dagster does not retry those, and their offsets may be unstored."
        ),
    )


def _run_status_email_sensor(
    settings: Settings,
    *,
    name: str,
    event_type: dg.DagsterEventType,
    job_names: Collection[str],
    what: str,
    notice: Callable[[dg.DagsterInstance, dg.DagsterRun, dg.EventLogEntry, str], RunFailureNotice],
    description: str,
    outcome: Literal["failed", "canceled"],
    mailable: Callable[[dg.EventLogEntry], bool] = lambda entry: True,
) -> dg.SensorDefinition:
    """A sensor that emails the operators once about every `event_type` of a run of `job_names`
    (the events `mailable` accepts). Its cursor (`RunEventCursor`) records the events handled: a
    tick whose first email fails keeps the previous cursor, and an event that becomes visible
    after a later one (PostgreSQL commits out of id order) is still mailed."""
    jobs = frozenset(job_names)  # filtered here: the SQL storages cannot filter by job name

    def changes(after_storage_id: int | None = None) -> dg.RunStatusChangeRecordsFilter:
        return dg.RunStatusChangeRecordsFilter(event_type, after_storage_id=after_storage_id)

    def notice_or_minimal(
        instance: dg.DagsterInstance, run: dg.DagsterRun, entry: dg.EventLogEntry
    ) -> RunFailureNotice:
        """The run's notice; if reading its details fails (odd tags, a missing event), one with
        its id and page, so one run cannot hold back the emails about all later ones."""
        try:
            return notice(instance, run, entry, settings.dagster_ui_url)
        except Exception as exc:  # any cause: the run's page has the details
            return RunFailureNotice(
                run.run_id,
                run.job_name,
                None,
                (f"(its details could not be read for this email: {exc!r}; see the run's page)",),
                "see the run's page",
                run_page_url(settings.dagster_ui_url, run.run_id),
                outcome=outcome,
            )

    @dg.sensor(
        name=name,
        minimum_interval_seconds=dagster_minimum_interval(settings.sensor_interval_seconds),
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=description,
    )
    def email_operators(context: dg.SensorEvaluationContext, smtp: SmtpResource) -> dg.SensorResult:
        instance = context.instance
        cursor = RunEventCursor.parse(context.cursor)
        if cursor is None:
            latest = instance.fetch_run_status_changes(changes(), limit=1).records
            start = latest[0].storage_id if latest else 0
            return dg.SensorResult(
                skip_reason=f"watching {what}s after event {start}",
                cursor=RunEventCursor(start).serialize(),
            )
        limit = cursor.read_limit(FAILURE_EMAILS_PER_TICK)
        records = instance.fetch_run_status_changes(
            changes(after_storage_id=cursor.watermark), limit=limit, ascending=True
        ).records
        new = [record for record in records if cursor.is_new(record.storage_id)]
        mailed: list[dg.DagsterRun] = []
        try:
            if new:
                with SmtpMailer(smtp.smtp_settings()) as mailer:
                    for record in new:
                        run = instance.get_run_by_id(record.run_id)
                        if (
                            run is not None
                            and run.job_name in jobs
                            and mailable(record.event_log_entry)
                        ):
                            told = _told_about_run(
                                mailer,
                                smtp,
                                notice_or_minimal(instance, run, record.event_log_entry),
                            )
                            if told:
                                mailed.append(run)
                            else:
                                context.log.error(
                                    f"operator email about {what} {run.run_id} refused"
                                )
                                instance.report_engine_event(
                                    f"{name}: the SMTP server refused the operators' email "
                                    "about this run (also without its error text); not tried "
                                    "again",
                                    run,
                                )
                        cursor = cursor.with_handled(record.storage_id, time.time())
        except AlertDeliveryError as exc:
            if not mailed:
                raise  # an error tick; the cursor stays, the next tick tries again
            context.log.error(f"operator email not sent, tried again next tick: {exc}")
        for run in mailed:  # said in the run's own event log too
            context.log.info(f"emailed the operators about {what} {run.run_id}")
            instance.report_engine_event(f"{name} emailed the operators", run)
        unsent = sum(1 for record in new if cursor.is_new(record.storage_id))
        settled = cursor.settled(
            (record.storage_id for record in records), len(records) >= limit, time.time()
        )
        if not new:
            return dg.SensorResult(skip_reason=f"no new {what}", cursor=settled.serialize())
        return dg.SensorResult(
            skip_reason=f"emailed the operators about {len(mailed)} {what}(s)"
            + (f"; {unsent} wait for the next tick (SMTP failed)" if unsent else ""),
            cursor=settled.serialize(),
        )

    return email_operators


def _told_about_run(mailer: SmtpMailer, smtp: SmtpResource, notice: RunFailureNotice) -> bool:
    """Send the operators' email about one run; if the server refuses that message for good (a
    5xx: a content filter reading its error text, a size limit), send it once more without the
    error text. False if that is refused for good too: the caller moves on, so one message the
    server will never take does not hold back every later one. A temporary refusal (4xx) or a
    broken session raises, as before: the next tick tries again."""
    attempts = (notice, replace(notice, errors=("(left out: the mail server refused it)",)))
    for attempt in attempts:
        try:
            mailer.send(render_run_failure(attempt, smtp.sender, smtp.operator_recipients))
            return True
        except MessageRefusedError as exc:
            if not exc.permanent:
                raise
    return False


# How often the watch looks at the topic; an outage is noticed at most this much late.
KAFKA_WATCH_INTERVAL_SECONDS = 30


def _mail_operators(
    context: dg.SensorEvaluationContext, smtp: SmtpResource, message: Message, cursor: str
) -> dg.SensorResult:
    """Send a watch's notice, then return the cursor that records it: a failed send raises, so
    the daemon keeps the previous cursor and the next tick sends the notice again."""
    with SmtpMailer(smtp.smtp_settings()) as mailer:
        mailer.send(message)
    context.log.warning(f"emailed the operators: {message['Subject']}")
    return dg.SensorResult(skip_reason=message["Subject"], cursor=cursor)


def build_kafka_watch_sensor(settings: Settings) -> dg.SensorDefinition:
    """Email the operators when the transaction topic has been unreadable for
    FRAUD_KAFKA_DOWN_ALERT_SECONDS, and again when it is readable (see `kafka_watch`).

    The cursor (`KafkaWatch`) is saved only with its notice sent: a tick whose email fails
    raises, the daemon keeps the previous cursor, and the next tick sends it.
    """

    @dg.sensor(
        name="email_operators_when_kafka_is_unreachable",
        minimum_interval_seconds=KAFKA_WATCH_INTERVAL_SECONDS,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=(
            "Emails FRAUD_OPERATOR_RECIPIENTS when the transaction topic has been unreadable "
            f"for {settings.kafka_down_alert_seconds:g} s (no run is launched meanwhile), and "
            "when it is readable again."
        ),
    )
    def email_operators_when_kafka_is_unreachable(
        context: dg.SensorEvaluationContext, kafka: KafkaResource, smtp: SmtpResource
    ) -> dg.SensorResult:
        try:
            kafka.offset_bounds()
            error = None
        except FraudDagsterError as exc:
            error = str(exc)
        watch, notice = observe(
            KafkaWatch.parse(context.cursor), error, time.time(), settings.kafka_down_alert_seconds
        )
        if notice is not None:
            message = render_kafka_notice(
                notice, kafka.topic, kafka.bootstrap_servers, smtp.sender, smtp.operator_recipients
            )
            return _mail_operators(context, smtp, message, watch.serialize())
        status = (
            f"{kafka.topic} readable"
            if watch.down_since is None
            else f"{kafka.topic} unreadable since "
            f"{datetime.fromtimestamp(watch.down_since, UTC):%H:%M:%S} UTC: {error}"
        )
        return dg.SensorResult(skip_reason=status, cursor=watch.serialize())

    return email_operators_when_kafka_is_unreachable


# Unstored ranges matter in hours (retention is days); a look every 5 minutes is plenty.
UNSTORED_WATCH_INTERVAL_SECONDS = 300


def build_unstored_offsets_sensor(settings: Settings) -> dg.SensorDefinition:
    """Email the operators about offset ranges no batch has stored for
    FRAUD_UNSTORED_ALERT_SECONDS, before Kafka's retention deletes them (see `gap_watch`).

    The cursor (`GapWatch`) is saved only with its email sent: a tick whose email fails raises,
    the daemon keeps the previous cursor, and the next tick sends it.
    """

    @dg.sensor(
        name="email_operators_about_unstored_offsets",
        minimum_interval_seconds=UNSTORED_WATCH_INTERVAL_SECONDS,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=(
            "Emails FRAUD_OPERATOR_RECIPIENTS about offset ranges below stored ones that no "
            f"batch has stored for {settings.unstored_alert_seconds:g} s (a failed batch nobody "
            "reran), with when retention may delete them; again a day before (or once the "
            "partition nears retention.bytes), and once deleted."
        ),
    )
    def email_operators_about_unstored_offsets(
        context: dg.SensorEvaluationContext,
        kafka: KafkaResource,
        database: DatabaseResource,
        smtp: SmtpResource,
    ) -> dg.SensorResult | dg.SkipReason:
        try:
            status = stream_status(
                kafka.client_options(), kafka.topic, kafka.consumer_group, database.get_engine()
            )
        except (SQLAlchemyError, FraudDagsterError) as exc:
            return dg.SkipReason(f"cannot read the stream's status, cursor unchanged: {exc}")
        in_flight = batch_runs(
            context.instance, score_transactions_job.name, kafka.topic, IN_FLIGHT_STATUSES
        )
        watch, notices = gaps_to_mail(
            GapWatch.parse(context.cursor),
            status,
            datetime.now(UTC),
            timedelta(seconds=settings.unstored_alert_seconds),
            in_flight,
        )
        if notices:
            # Only the ranges mailed now name their runs: run queries per email, not per tick.
            notices = notices_with_batch_runs(
                notices, status, context.instance, score_transactions_job.name
            )
            message = render_unstored_notice(
                notices,
                kafka.topic,
                status.retention,
                smtp.sender,
                smtp.operator_recipients,
                settings.dagster_ui_url,
            )
            return _mail_operators(context, smtp, message, watch.serialize())
        unstored = sum(len(p.gaps) for p in status.partitions)
        return dg.SensorResult(
            skip_reason=f"{unstored} unstored offset range(s), nothing new to tell",
            cursor=watch.serialize(),
        )

    return email_operators_about_unstored_offsets


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


# A run whose failure was re-reported is not reported again before this (the daemon was down?).
REPORT_AGAIN_AFTER_SECONDS = 600.0


def build_lost_retry_sensor(settings: Settings, job_names: Collection[str]) -> dg.SensorDefinition:
    """Report again the failure of runs whose automatic retry Dagster decided on but never
    launched, so that its daemon launches it (see `lost_retries`).

    The cursor holds {run id: when its failure was re-reported}: a run is re-reported at most
    once per REPORT_AGAIN_AFTER_SECONDS, should the daemon be down meanwhile.
    """

    @dg.sensor(
        name="recover_lost_automatic_retries",
        minimum_interval_seconds=dagster_minimum_interval(settings.run_health_interval_seconds),
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=(
            "Reports again the failure of runs tagged dagster/will_retry=true whose retry "
            f"Dagster has not launched {settings.lost_retry_after_seconds:g} s after they "
            "ended (its daemon read the failure too early), so that the daemon launches it."
        ),
    )
    def recover_lost_automatic_retries(context: dg.SensorEvaluationContext) -> dg.SkipReason:
        instance = context.instance
        now = time.time()
        reported: dict[str, float] = {
            run_id: at
            for run_id, at in json.loads(context.cursor or "{}").items()
            if now - at < REPORT_AGAIN_AFTER_SECONDS
        }
        recovered = []
        for lost in runs_missing_their_retry(
            instance, job_names, now, settings.lost_retry_after_seconds
        ):
            if lost.run_id in reported:
                continue
            run = instance.get_run_by_id(lost.run_id)
            if run is None:
                continue
            instance.report_run_failed(run, lost_retry_message(lost, now - lost.ended_at))
            context.log.warning(
                f"run {lost.run_id}: its automatic retry was never launched; failure reported "
                "again so that Dagster launches it"
            )
            reported[lost.run_id] = now
            recovered.append(lost.run_id)
        context.update_cursor(json.dumps(reported))
        if recovered:
            return dg.SkipReason(f"failure reported again, retry lost: {', '.join(recovered)}")
        return dg.SkipReason("every failed run tagged to be retried has its retry")

    return recover_lost_automatic_retries
