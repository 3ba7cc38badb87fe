"""Outages, injected for real: a broker we stop and start again, a PostgreSQL server we stop,
a tampered model file, a dagster-daemon killed with SIGKILL in the middle of the stream.

The broker and the database are this test's own (free ports, temporary directories), so the
session's broker stays up for the other tests.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import sqlalchemy
from dagster._core.scheduler.instigation import (
    InstigatorState,
    InstigatorTick,
    InstigatorType,
    TickStatus,
)

from fraud_dagster.alerts import run_failure_message_id
from fraud_dagster.benchmarks.harness import sensor_ticks
from fraud_dagster.definitions import build_definitions
from fraud_dagster.errors import AlertDeliveryError
from fraud_dagster.kafka_io import ensure_topic
from fraud_dagster.local_services.dagster_processes import start_daemon, stop_dagster_process
from fraud_dagster.local_services.kafka import LocalKafka
from fraud_dagster.local_services.process import free_port
from fraud_dagster.local_services.smtp import LocalSmtpServer, MaildirHandler
from fraud_dagster.producer import synthetic_transactions
from fraud_dagster.resources import resolved_resources
from fraud_dagster.sensors import KAFKA_SENSOR_NAME
from fraud_dagster.settings import PROJECT_ROOT, Settings, load_settings
from fraud_dagster.simulator import to_messages
from fraud_dagster.storage import schema
from fraud_dagster_tests.helpers import MailBox, evaluate_sensor, produce, serving, table_rows
from fraud_dagster_tests.operations_support import (
    accounting,
    local_postgres,
    reexecute,
    retry_alerts_tick,
    run_request,
    sensor_tick,
    tampered_models_dir,
    wait_for,
)

pytestmark = pytest.mark.services


def set_env(monkeypatch: pytest.MonkeyPatch, **values: str) -> Settings:
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return load_settings()


def operators_tick(
    defs: dg.Definitions, instance: dg.DagsterInstance, settings: Settings, cursor: str | None
) -> dg.SensorResult:
    return sensor_tick("email_operators_on_run_failure", defs, instance, settings, cursor)


@contextlib.contextmanager
def own_broker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefix: str
) -> Iterator[tuple[LocalKafka, Settings]]:
    """A broker of this test's own, which it may stop, with a one-partition topic, and the
    project's settings pointed at it (2-s connect timeout)."""
    broker = LocalKafka(
        data_dir=tmp_path / "own-kafka", port=free_port(), controller_port=free_port(), heap="512m"
    )
    broker.start()
    try:
        topic = f"{prefix}-{uuid.uuid4().hex[:6]}"
        ensure_topic({"bootstrap_servers": [broker.bootstrap_servers]}, topic, 1)
        settings = set_env(
            monkeypatch,
            FRAUD_KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap_servers,
            FRAUD_KAFKA_TOPIC=topic,
            FRAUD_KAFKA_CONSUMER_GROUP=f"group-{topic}",
            FRAUD_KAFKA_CONNECT_TIMEOUT_SECONDS="2",
        )
        yield broker, settings
    finally:
        broker.stop()


def stored_ids(database_url: str) -> Counter[str]:
    return Counter(
        row["transaction_id"] for row in table_rows(database_url, schema.scored_transactions)
    )


@pytest.mark.usefixtures("settings")  # the test services; own_broker repoints Kafka
def test_broker_down_sensor_skips_then_catches_up_without_gap_or_duplicate(
    instance: dg.DagsterInstance,
    database_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with own_broker(tmp_path, monkeypatch, "outage") as (broker, settings):
        topic = settings.kafka_topic
        defs = build_definitions(settings)
        first = to_messages(synthetic_transactions(30, seed=21))
        produce(settings, first)
        before = evaluate_sensor(defs, settings, instance, cursor=None)
        (pending,) = before.run_requests  # planned, not yet run when the broker goes down

        broker.stop()
        down = run_request(pending, instance)
        skipped = evaluate_sensor(defs, settings, instance, cursor=before.cursor)

        assert not down.success
        (failure,) = down.get_step_failure_events()
        assert failure.step_key == "transaction_batch.fetch"
        assert "KafkaUnavailableError" in failure.step_failure_data.error.cause.cls_name
        assert skipped.run_requests == []
        assert "Kafka unavailable, cursor unchanged" in skipped.skip_message
        assert f"cannot reach Kafka at {[broker.bootstrap_servers]}" in skipped.skip_message
        assert skipped.cursor is None or skipped.cursor == before.cursor
        assert sum(accounting(database_url, topic).values()) == 0

        broker.start()
        second = to_messages(synthetic_transactions(25, seed=22))
        for message in second:
            message["transaction_id"] = f"second-{message['transaction_id']}"
        produce(settings, second)
        after = evaluate_sensor(defs, settings, instance, cursor=before.cursor)
        (request,) = after.run_requests
        assert request.run_key == f"{topic}/0/30-54"

        assert reexecute(instance, down.run_id, from_failure=True).success
        assert run_request(request, instance).success
        assert accounting(database_url, topic) == {(0, o): 1 for o in range(55)}
        assert stored_ids(database_url) == Counter(m["transaction_id"] for m in [*first, *second])
        assert resolved_resources(settings)["kafka"].committed_offsets() == {0: 55}


@pytest.mark.backends("sqlite")  # Kafka and SMTP only; no application-database work
@pytest.mark.usefixtures("settings")  # the test services; own_broker repoints Kafka
def test_the_operators_hear_when_kafka_has_been_unreachable_and_when_it_is_back(
    instance: dg.DagsterInstance,
    smtp_server: LocalSmtpServer,
    mailbox: MailBox,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FRAUD_KAFKA_DOWN_ALERT_SECONDS", "0")  # tell at the first tick down
    with own_broker(tmp_path, monkeypatch, "watched") as (broker, settings):
        topic = settings.kafka_topic
        defs = build_definitions(settings)

        def watch(cursor: str | None) -> dg.SensorResult:
            name = "email_operators_when_kafka_is_unreachable"
            return sensor_tick(name, defs, instance, settings, cursor)

        readable = watch(None)
        assert mailbox.messages() == []

        broker.stop()
        smtp_server.stop()  # SMTP down too: the notice waits, the cursor with it
        try:
            with pytest.raises(AlertDeliveryError):
                watch(readable.cursor)
        finally:
            smtp_server.start()
        down = watch(readable.cursor)
        (email,) = mailbox.messages()
        assert email["X-Fraud-Kafka-Notice"] == "down"
        assert email["To"] == ", ".join(settings.operator_recipients)
        assert "no transactions are being scored" in email["Subject"]
        body = email.get_content()
        assert f"{topic} on {broker.bootstrap_servers}" in body
        assert "Last error:" in body and "When the broker is down" in body

        still_down = watch(down.cursor)
        assert len(mailbox.messages()) == 1, "one email per outage, not one per tick"

        broker.start()
        back = watch(still_down.cursor)
        notices = [m["X-Fraud-Kafka-Notice"] for m in mailbox.messages()]
        assert sorted(notices) == ["back", "down"]
        assert watch(back.cursor).skip_reason.skip_message == f"{topic} readable"
        assert len(mailbox.messages()) == 2


@pytest.mark.postgres
@pytest.mark.backends()  # its own PostgreSQL server, which it stops
def test_database_down_fails_the_run_clearly_and_a_rerun_succeeds(
    settings: Settings,
    instance: dg.DagsterInstance,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with local_postgres() as server:
        monkeypatch.setenv("FRAUD_DATABASE_URL", server.url())
        settings = load_settings()
        defs = build_definitions(settings)
        messages = to_messages(synthetic_transactions(40, seed=31))
        produce(settings, messages)
        (request,) = evaluate_sensor(defs, settings, instance, cursor=None).run_requests

        server.stop()
        failed = run_request(request, instance)
        tick = retry_alerts_tick(defs, settings, instance)

        assert not failed.success
        (failure,) = failed.get_step_failure_events()
        assert failure.step_key == "transaction_batch.preprocess"
        error = failure.step_failure_data.error.cause
        assert error.cls_name == "StorageError"
        assert "Connection refused" in error.message
        assert "rerun" in error.message
        assert server.password() not in error.message
        assert isinstance(tick, dg.SkipReason)
        assert "database unavailable" in tick.skip_message
        assert server.password() not in tick.skip_message

        server.start()
        url = server.url()
        assert sum(accounting(url, settings.kafka_topic).values()) == 0  # nothing half-written
        rerun = reexecute(instance, failed.run_id, from_failure=True)
        assert rerun.success
        assert accounting(url, settings.kafka_topic) == {(0, o): 1 for o in range(40)}
        assert resolved_resources(settings)["kafka"].committed_offsets() == {0: 40}


def test_tampered_model_is_refused_the_run_says_so_and_the_operators_are_emailed(
    settings: Settings,
    instance: dg.DagsterInstance,
    smtp_server: LocalSmtpServer,
    mailbox: MailBox,
    database_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    models = tampered_models_dir(settings.models_dir, tmp_path / "models")
    settings = set_env(
        monkeypatch,
        FRAUD_MODELS_DIR=str(models),
        FRAUD_ALERT_RECIPIENTS="analysts@bank.example",
        FRAUD_OPERATOR_RECIPIENTS="ops-oncall@bank.example,ops-lead@bank.example",
    )
    defs = build_definitions(settings)
    watching = operators_tick(defs, instance, settings, cursor=None)  # the sensor's first tick
    produce(settings, to_messages(synthetic_transactions(20, seed=41)))
    (request,) = evaluate_sensor(defs, settings, instance, cursor=None).run_requests

    failed = run_request(request, instance)

    assert not failed.success
    (failure,) = failed.get_step_failure_events()
    assert failure.step_key == "transaction_batch.score"
    cause = failure.step_failure_data.error.cause
    assert cause.cls_name == "ModelIntegrityError"
    assert "SHA-256" in cause.message
    assert "refusing to load" in cause.message
    assert sum(accounting(database_url, settings.kafka_topic).values()) == 0

    operators_tick(defs, instance, settings, cursor=watching.cursor)

    (email,) = mailbox.wait_for(1)
    assert email["To"] == "ops-oncall@bank.example, ops-lead@bank.example"
    assert "analysts@bank.example" not in str(email)
    assert email["X-Fraud-Run-Id"] == failed.run_id
    body = email.get_content()
    assert failed.run_id in body
    assert f"{settings.kafka_topic}/0 offsets 0-19" in body
    assert "refusing to load" in body
    assert "attempt 1 of 3; Dagster retries it" in body
    assert f"{settings.dagster_ui_url}/runs/{failed.run_id}" in body
    assert "0-19" in email["Subject"]

    for path in settings.models_dir.glob("*.joblib"):  # the operator restores the file
        shutil.copyfile(PROJECT_ROOT / "models" / path.name, path)
    assert reexecute(instance, failed.run_id, from_failure=True).success
    assert accounting(database_url, settings.kafka_topic) == {(0, o): 1 for o in range(20)}


@pytest.mark.backends("sqlite")  # the run fails before it writes; the sensor reads Dagster
def test_a_run_that_fails_while_smtp_is_down_is_mailed_to_the_operators_once_smtp_is_back(
    settings: Settings,
    instance: dg.DagsterInstance,
    smtp_server: LocalSmtpServer,
    mailbox: MailBox,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    models = tampered_models_dir(settings.models_dir, tmp_path / "models")
    settings = set_env(monkeypatch, FRAUD_MODELS_DIR=str(models))
    defs = build_definitions(settings)
    watching = operators_tick(defs, instance, settings, cursor=None)
    produce(settings, to_messages(synthetic_transactions(20, seed=43)))
    (request,) = evaluate_sensor(defs, settings, instance, cursor=None).run_requests
    failed = run_request(request, instance)
    assert not failed.success

    smtp_server.stop()
    try:
        # The tick fails; the daemon then keeps the sensor's previous cursor (sensor.py).
        with pytest.raises(AlertDeliveryError, match="cannot open an SMTP session"):
            operators_tick(defs, instance, settings, cursor=watching.cursor)
    finally:
        smtp_server.start()
    assert mailbox.messages() == []

    mailed = operators_tick(defs, instance, settings, cursor=watching.cursor)
    (email,) = mailbox.wait_for(1)
    assert email["X-Fraud-Run-Id"] == failed.run_id
    assert email["Message-ID"] == run_failure_message_id(failed.run_id)
    assert "refusing to load" in email.get_content()

    again = operators_tick(defs, instance, settings, cursor=mailed.cursor)
    assert again.cursor == mailed.cursor
    assert again.skip_reason is not None and "no new failed run" in again.skip_reason.skip_message
    assert len(mailbox.messages()) == 1


@dg.op
def _does_nothing() -> None:
    """An op of a job from another code location."""


@pytest.mark.backends("sqlite")  # the sensor reads the Dagster instance only
def test_the_operators_hear_once_about_each_failed_run_of_this_code_location_only(
    settings: Settings,
    instance: dg.DagsterInstance,
    smtp_server: LocalSmtpServer,
    mailbox: MailBox,
) -> None:
    defs = build_definitions(settings)
    watching = operators_tick(defs, instance, settings, cursor=None)
    foreign = dg.GraphDefinition(name="someone_elses_job", node_defs=[_does_nothing]).to_job()
    theirs = instance.create_run_for_job(foreign, status=dg.DagsterRunStatus.STARTED)
    sender = defs.resolve_job_def("send_pending_alerts")  # its tags, as a launched run has them
    ours = instance.create_run_for_job(sender, status=dg.DagsterRunStatus.STARTED, tags=sender.tags)
    for run in (theirs, ours):
        instance.report_run_failed(run, "injected: the run's worker vanished")

    mailed = operators_tick(defs, instance, settings, cursor=watching.cursor)

    (email,) = mailbox.messages()
    assert email["X-Fraud-Run-Id"] == ours.run_id
    body = email.get_content()
    assert "injected: the run's worker vanished" in body  # no step failed: the run's message
    assert "retry_alerts sensor" in body  # its retry: nothing to rerun by hand
    again = operators_tick(defs, instance, settings, cursor=mailed.cursor)
    assert again.cursor == mailed.cursor
    assert len(mailbox.messages()) == 1


@pytest.mark.backends("sqlite")  # the application database is not read
@pytest.mark.dagster_storage("postgresql")
def test_a_failure_committed_after_a_later_one_is_still_mailed(
    settings: Settings,
    instance: dg.DagsterInstance,
    smtp_server: LocalSmtpServer,
    mailbox: MailBox,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """PostgreSQL takes an event's id at insert and shows it at commit. Run A's failure takes
    the lower id but commits after run B's: the tick in between mails B. Before, its cursor (the
    last id read) then stood past A's id, and A was never mailed."""
    defs = build_definitions(settings)
    watching = operators_tick(defs, instance, settings, cursor=None)
    sender = defs.resolve_job_def("send_pending_alerts")
    first, second = (
        instance.create_run_for_job(sender, status=dg.DagsterRunStatus.STARTED, tags=sender.tags)
        for _ in range(2)
    )
    storage = instance.event_log_storage
    engine = sqlalchemy.create_engine(storage.postgres_url)
    with engine.connect() as held:
        late_commit = held.begin()
        # A's failure event is inserted (its id taken) in a transaction that stays open.
        with monkeypatch.context() as patch:
            patch.setattr(
                storage, "store_event", lambda e: held.execute(storage.prepare_insert_event(e))
            )
            instance.report_run_failed(first, "failed first, committed last")
        instance.report_run_failed(second, "failed second, committed first")

        mailed = operators_tick(defs, instance, settings, cursor=watching.cursor)
        assert [email["X-Fraud-Run-Id"] for email in mailbox.wait_for(1)] == [second.run_id]

        late_commit.commit()
    engine.dispose()
    failures = instance.fetch_run_status_changes(dg.DagsterEventType.RUN_FAILURE, limit=10)
    event_id = {record.run_id: record.storage_id for record in failures.records}
    assert event_id[first.run_id] < event_id[second.run_id]  # the race did happen

    again = operators_tick(defs, instance, settings, cursor=mailed.cursor)
    emails = mailbox.wait_for(2)
    assert sorted(email["X-Fraud-Run-Id"] for email in emails) == sorted(
        [first.run_id, second.run_id]
    )
    assert "failed first, committed last" in next(
        email.get_content() for email in emails if email["X-Fraud-Run-Id"] == first.run_id
    )
    operators_tick(defs, instance, settings, cursor=again.cursor)
    assert len(mailbox.messages()) == 2


class ContentFilter(MaildirHandler):
    """Stores messages like the local server, but refuses (554, after DATA) every message that
    holds one of `refused`, as a bank's content filter refuses some texts for good."""

    def __init__(self, mail_dir: Path, refused: set[str], later: set[str] = frozenset()) -> None:
        super().__init__(mail_dir)
        self.refused = refused
        self.later = set(later)  # refused for now (451), as greylisting does

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        text = envelope.content.decode("utf-8", "replace")
        if any(marker in text for marker in self.refused):
            return "554 5.7.1 test filter refuses this content"
        if any(marker in text for marker in self.later):
            return "451 4.7.1 test filter: try again later"
        return await super().handle_DATA(server, session, envelope)


@pytest.mark.backends("sqlite")  # the sensor reads the Dagster instance only
def test_an_operator_email_the_server_refuses_does_not_hold_back_the_later_ones(
    settings: Settings,
    instance: dg.DagsterInstance,
    smtp_server: LocalSmtpServer,
    mailbox: MailBox,
) -> None:
    """Before: the first refused email failed every tick, and no later failure was mailed.
    Now a refused email goes again without its error text; refused again, it is skipped (said
    in the run's event log) and the emails about the runs after it go out."""
    defs = build_definitions(settings)
    watching = operators_tick(defs, instance, settings, cursor=None)
    sender = defs.resolve_job_def("send_pending_alerts")
    runs = [
        instance.create_run_for_job(sender, status=dg.DagsterRunStatus.STARTED, tags=sender.tags)
        for _ in range(4)
    ]
    errors = ["FILTERED-TEXT in the error", "ordinary 1", "ordinary 2", "ordinary 3"]
    for run, error in zip(runs, errors, strict=True):
        instance.report_run_failed(run, error)
    smtp_server.stop()  # replaced, on the same port, by the filtering server
    with serving(
        ContentFilter(smtp_server.mail_dir, {"FILTERED-TEXT", runs[1].run_id}), smtp_server.port
    ):
        mailed = operators_tick(defs, instance, settings, cursor=watching.cursor)
        again = operators_tick(defs, instance, settings, cursor=mailed.cursor)

    by_run = {email["X-Fraud-Run-Id"]: email.get_content() for email in mailbox.messages()}
    assert set(by_run) == {runs[0].run_id, runs[2].run_id, runs[3].run_id}
    assert "FILTERED-TEXT" not in by_run[runs[0].run_id]
    assert "left out: the mail server refused it" in by_run[runs[0].run_id]
    assert "ordinary 2" in by_run[runs[2].run_id]
    assert again.cursor == mailed.cursor and len(mailbox.messages()) == 3
    said = [
        entry.message
        for entry in instance.all_logs(runs[1].run_id, of_type=dg.DagsterEventType.ENGINE_EVENT)
    ]
    assert any("refused the operators' email about this run" in text for text in said)

    # A refusal for now (4xx) is not skipped: the tick fails and the next one sends it.
    late = instance.create_run_for_job(sender, status=dg.DagsterRunStatus.STARTED, tags=sender.tags)
    instance.report_run_failed(late, "ordinary 4")
    greylisting = ContentFilter(smtp_server.mail_dir, set(), later={late.run_id})
    with serving(greylisting, smtp_server.port), pytest.raises(AlertDeliveryError):
        operators_tick(defs, instance, settings, cursor=again.cursor)
    with serving(ContentFilter(smtp_server.mail_dir, set()), smtp_server.port):
        operators_tick(defs, instance, settings, cursor=again.cursor)
    assert late.run_id in {email["X-Fraud-Run-Id"] for email in mailbox.messages()}


def operator_sensor_state(instance: dg.DagsterInstance) -> InstigatorState | None:
    states = instance.all_instigator_state(instigator_type=InstigatorType.SENSOR)
    return next((s for s in states if s.name == "email_operators_on_run_failure"), None)


def operator_sensor_ticks(instance: dg.DagsterInstance) -> list[InstigatorTick]:
    state = operator_sensor_state(instance)
    if state is None:
        return []
    return list(instance.get_ticks(state.instigator_origin_id, state.selector_id))


@pytest.mark.slow
@pytest.mark.backends("sqlite")  # the sensor and the daemon only; no application-database work
def test_through_the_daemon_runs_failed_while_smtp_was_down_are_mailed_once_when_it_is_back(
    env: dict[str, str],
    settings: Settings,
    dagster_home: Path,
    instance: dg.DagsterInstance,
    smtp_server: LocalSmtpServer,
    mailbox: MailBox,
    tmp_path: Path,
) -> None:
    models = tampered_models_dir(settings.models_dir, tmp_path / "models")
    env = {**env, "FRAUD_MODELS_DIR": str(models), "FRAUD_SENSOR_INTERVAL_SECONDS": "1"}
    topic = settings.kafka_topic

    def failed_batch_runs() -> list[dg.DagsterRun]:
        runs = instance.get_runs(filters=dg.RunsFilter(tags={"fraud_dagster/topic": topic}))
        return [run for run in runs if run.status == dg.DagsterRunStatus.FAILURE]

    daemon = start_daemon(dagster_home, env, tmp_path / "daemon.log")
    try:
        wait_for(
            lambda: (
                (state := operator_sensor_state(instance)) is not None
                and state.instigator_data is not None
                and state.instigator_data.cursor is not None
            ),
            120,
            "the operator-email sensor's first tick",
        )
        smtp_server.stop()
        try:
            produce(settings, to_messages(synthetic_transactions(20, seed=47)))
            # The run and its two automatic retries fail on the tampered model.
            wait_for(lambda: len(failed_batch_runs()) == 3, 240, "three failed attempts")
            wait_for(
                lambda: any(
                    t.status == TickStatus.FAILURE for t in operator_sensor_ticks(instance)
                ),
                60,
                "a failed tick of the operator-email sensor (SMTP down)",
            )
            assert mailbox.messages() == []
        finally:
            smtp_server.start()
        failed = {run.run_id for run in failed_batch_runs()}
        wait_for(lambda: len(mailbox.messages()) >= 3, 60, "the three operator emails")
        mailed_at = time.time()
        wait_for(
            lambda: any(
                t.status == TickStatus.SKIPPED and t.timestamp > mailed_at
                for t in operator_sensor_ticks(instance)
            ),
            60,
            "a later tick with nothing to mail",
        )
    finally:
        stop_dagster_process(daemon)
        _kill_group(daemon)

    emails = mailbox.messages()
    assert Counter(m["X-Fraud-Run-Id"] for m in emails) == Counter(failed)
    assert {m["To"] for m in emails} == {", ".join(settings.operator_recipients)}
    for run_id in failed:  # the run's own event log says so
        logs = instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT)
        assert any("emailed the operators" in (entry.message or "") for entry in logs)


@pytest.mark.slow
# SQLite only: what it tests is the daemon's recovery (runs, sensor cursor, retries); the
# idempotent writes it relies on run on both backends in test_operations_rerun.py.
@pytest.mark.backends("sqlite")
def test_daemon_killed_mid_stream_and_restarted_leaves_no_gap_and_no_duplicate(
    env: dict[str, str],
    settings: Settings,
    dagster_home: Path,
    instance: dg.DagsterInstance,
    database_url: str,
    tmp_path: Path,
) -> None:
    env = {**env, "FRAUD_MAX_BATCH_SIZE": "15", "FRAUD_SENSOR_INTERVAL_SECONDS": "1"}
    chunks = [to_messages(synthetic_transactions(30, seed=50 + i)) for i in range(4)]
    for i, chunk in enumerate(chunks):
        for message in chunk:
            message["transaction_id"] = f"c{i}-{message['transaction_id']}"
    total = sum(len(chunk) for chunk in chunks)
    topic = settings.kafka_topic

    def batch_runs() -> list[dg.DagsterRun]:
        return list(instance.get_runs(filters=dg.RunsFilter(tags={"fraud_dagster/topic": topic})))

    def offsets(run: dg.DagsterRun) -> tuple[int, int]:
        first, last = run.tags["fraud_dagster/offset_range"].split("-")
        return int(first), int(last)

    chunk_1 = range(len(chunks[0]), len(chunks[0]) + len(chunks[1]))

    def requests_chunk_1(tick: InstigatorTick) -> bool:
        return any(int(key.rsplit("/", 1)[1].split("-")[0]) in chunk_1 for key in tick.run_keys)

    produce(settings, chunks[0])
    first = start_daemon(dagster_home, env, tmp_path / "daemon-1.log")
    second = None
    try:
        wait_for(lambda: len(batch_runs()) >= 1, 180, "the first batch run")
        produced_chunk_1 = time.time()
        produce(settings, chunks[1])
        # The moment of the kill: just after a tick of the Kafka sensor requested chunk 1's
        # batches, while they are queued or running.
        wait_for(
            lambda: any(
                requests_chunk_1(tick)
                for tick in sensor_ticks(instance, KAFKA_SENSOR_NAME, after=produced_chunk_1)
            ),
            120,
            "a sensor tick requesting the batches of the new messages",
        )
        os.kill(first.pid, signal.SIGKILL)  # the daemon only; what it started may live on
        first.wait()
        at_kill = {run.run_id: run for run in batch_runs()}
        stored_at_kill = sum(accounting(database_url, topic).values())
        unfinished_at_kill = {run_id for run_id, run in at_kill.items() if not run.is_finished}
        assert any(offsets(run)[0] in chunk_1 for run in at_kill.values())
        assert unfinished_at_kill, "the daemon was killed with no batch under way"
        assert stored_at_kill < chunk_1.stop, "the daemon was killed after the stream was stored"
        produce(settings, chunks[2])
        second = start_daemon(dagster_home, env, tmp_path / "daemon-2.log")
        produce(settings, chunks[3])
        wait_for(
            lambda: sum(accounting(database_url, topic).values()) >= total,
            300,
            "every message stored",
        )
        wait_for(lambda: all(run.is_finished for run in batch_runs()), 120, "runs to finish")
    finally:
        if second is not None:
            stop_dagster_process(second)
            _kill_group(second)
        _kill_group(first)

    assert accounting(database_url, topic) == {(0, o): 1 for o in range(total)}
    assert stored_ids(database_url) == Counter(
        m["transaction_id"] for chunk in chunks for m in chunk
    )
    runs = batch_runs()
    statuses = json.dumps({run.run_id: (str(run.status), run.tags) for run in runs})
    success = dg.DagsterRunStatus.SUCCESS
    retries = {
        run.tags["dagster/parent_run_id"]: run
        for run in runs
        if run.tags.get("dagster/parent_run_id")
    }
    for run in runs:
        if run.status != success:
            # The one failure allowed: a run the killed daemon was launching got no worker, so
            # run monitoring failed it at its start timeout and the retry policy ran it again.
            assert run.run_id in unfinished_at_kill, statuses
            assert run.tags.get("dagster/failure_reason") == "START_TIMEOUT", statuses
            assert run.run_id in retries, statuses
            assert retries[run.run_id].status == success, statuses
    # The batches under way (or still queued) when the daemon died were completed, not lost.
    done = {run.run_id for run in runs if run.status == success}
    done |= {parent for parent, retry in retries.items() if retry.status == success}
    assert unfinished_at_kill <= done, statuses
    originals = [run for run in runs if "dagster/parent_run_id" not in run.tags]
    keys = Counter(
        run.tags["dagster/run_key"] for run in originals if "dagster/run_key" in run.tags
    )
    assert all(count == 1 for count in keys.values()), f"a range was launched twice: {keys}"
    covered = sorted(offsets(run) for run in originals)
    assert covered[0][0] == 0
    for (_, last), (first_offset, _) in itertools.pairwise(covered):
        assert first_offset == last + 1, f"gap or overlap between ranges: {covered}"
    assert covered[-1][1] == total - 1
    # The restarted daemon went on exactly where the killed one's requested ranges ended.
    by_first = [offsets(run) for run in originals if run.run_id in at_kill]
    by_second = [offsets(run) for run in originals if run.run_id not in at_kill]
    assert by_second, "the restarted daemon launched nothing"
    assert min(first_offset for first_offset, _ in by_second) == (
        max(last for _, last in by_first) + 1
    ), f"killed daemon's ranges {sorted(by_first)}, restarted daemon's {sorted(by_second)}"


def _kill_group(process: subprocess.Popen) -> None:
    """The daemon runs in its own session: end whatever it started (code server, run workers)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
