"""The alert outbox under SMTP faults: server down, login refused, concurrent senders.

Faults are real: the aiosmtpd server is stopped (connection refused) or started with STARTTLS
and AUTH while the pipeline holds a wrong password. The `retry_alerts` sensor and the
`send_pending_alerts` job are evaluated and executed on a real Dagster instance.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import sqlalchemy as sa

from fraud_dagster import alert_delivery
from fraud_dagster.alert_claims import abandoned_claims, claim_token, claiming_run_id
from fraud_dagster.alerts import SmtpMailer, render_alert
from fraud_dagster.definitions import build_definitions
from fraud_dagster.local_services.smtp import LocalSmtpServer, MaildirHandler
from fraud_dagster.resources import SmtpResource, resolved_resources
from fraud_dagster.settings import Settings, load_settings
from fraud_dagster.storage import schema
from fraud_dagster.storage.database import create_engine, ensure_schema, utcnow
from fraud_dagster.storage.outbox import STALE_CLAIM_AFTER, claim_alerts, outbox_status
from fraud_dagster_tests.helpers import (
    MailBox,
    evaluate_sensor,
    execute_requests,
    interrupts_raised_as,
    produce,
    serving,
    suspicious_ids,
    table_rows,
)
from fraud_dagster_tests.operations_support import (
    accept_writes,
    emails_by_transaction,
    local_postgres,
    materializations,
    reexecute,
    refuse_writes,
    retry_alerts_tick,
    run_request,
    run_retry_job,
    wait_for,
)
from fraud_dagster_tests.test_end_to_end import known_transactions

pytestmark = pytest.mark.services


@pytest.fixture
def fast_retries(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Backoff of 1 s, 2 s, 4 s... and no grace for pending alerts, so the test runs in seconds."""
    monkeypatch.setenv("FRAUD_ALERT_RETRY_BASE_SECONDS", "1")
    monkeypatch.setenv("FRAUD_ALERT_PENDING_GRACE_SECONDS", "0")
    return load_settings()


def outbox(database_url: str) -> dict[str, dict]:
    return {row["transaction_id"]: row for row in table_rows(database_url, schema.fraud_alerts)}


def assert_backoff(row: dict, seconds: float, took: float) -> None:
    """The next attempt is `seconds` after the recorded failure, which came after the alert's
    claim, within the delivery's `took` seconds of wall time."""
    assert row["next_attempt_at"] - row["last_failed_at"] == timedelta(seconds=seconds)
    failed_after = (row["last_failed_at"] - row["claimed_at"]).total_seconds()
    assert 0 <= failed_after <= took, f"failure recorded {failed_after:.3f} s after the claim"


def run_batches(settings: Settings, instance: dg.DagsterInstance) -> list:
    defs = build_definitions(settings)
    produce(settings, known_transactions()[0])
    results = execute_requests(defs, instance, evaluate_sensor(defs, settings, instance, None))
    assert all(result.success for result in results)
    return results


def alerts_failed_while_smtp_was_down(
    settings: Settings,
    instance: dg.DagsterInstance,
    smtp_server: LocalSmtpServer,
    database_url: str,
) -> set[str]:
    """Batches run while SMTP is down: every alert failed. SMTP is back and (with the test's 1 s
    backoff) every alert is due again. Returns the suspicious transaction ids."""
    smtp_server.stop()
    run_batches(settings, instance)
    suspicious = suspicious_ids(database_url)
    smtp_server.start()
    time.sleep(1.1)
    return suspicious


def send_due_alerts(
    engine: sa.Engine, smtp: SmtpResource, token: str, **options: Any
) -> alert_delivery.DeliveryReport:
    return alert_delivery.deliver_alerts(engine, smtp.alert_delivery(), token=token, **options)


def test_smtp_down_keeps_alerts_in_the_outbox_and_retry_alerts_sends_each_once_when_back(
    fast_retries: Settings,
    instance: dg.DagsterInstance,
    smtp_server: LocalSmtpServer,
    mailbox: MailBox,
    database_url: str,
) -> None:
    settings = fast_retries
    defs = build_definitions(settings)
    smtp_server.stop()  # connection refused from now on

    started = time.monotonic()
    (batch,) = run_batches(settings, instance)
    took = time.monotonic() - started

    suspicious = suspicious_ids(database_url)
    assert suspicious
    (alert_meta,) = materializations(instance, batch.run_id, "fraud_alerts")
    assert alert_meta["alerted"] == 0
    assert alert_meta["pending_retry"] == len(suspicious)
    assert "cannot open an SMTP session" in alert_meta["last_error"]
    warnings = [
        record.user_message
        for record in instance.all_logs(batch.run_id)
        if record.level >= 30 and "retry_alerts" in record.user_message
    ]
    assert warnings, "the batch run must show the SMTP failure as a warning"
    rows = outbox(database_url)
    assert set(rows) == suspicious
    for row in rows.values():
        assert (row["status"], row["attempts"], row["sent_at"]) == ("failed", 1, None)
        assert "Connection refused" in row["last_error"]
        assert_backoff(row, 1, took)

    # Still down: the retry run fails (visible to the operator) and the backoff doubles.
    wait_for(
        lambda: isinstance(retry_alerts_tick(defs, settings, instance), dg.RunRequest), 10, "due"
    )
    request = retry_alerts_tick(defs, settings, instance)
    started = time.monotonic()
    failed = run_retry_job(defs, instance, request)
    took = time.monotonic() - started
    assert not failed.success
    (observed,) = materializations(instance, failed.run_id, "fraud_alerts")
    assert observed["alerted"] == 0
    assert observed["outbox_unsent"] == len(suspicious)
    rows = outbox(database_url)
    for row in rows.values():
        assert (row["status"], row["attempts"]) == ("failed", 2)
        assert_backoff(row, 2, took)
    engine = create_engine(database_url)
    status = outbox_status(engine)  # what `fraud-dagster status` shows
    engine.dispose()
    assert status.last_failed_at == max(row["last_failed_at"] for row in rows.values())
    assert status.last_error is not None and "Connection refused" in status.last_error
    skipped = retry_alerts_tick(defs, settings, instance)
    assert isinstance(skipped, dg.SkipReason)
    assert "no alert due" in skipped.skip_message
    assert mailbox.messages() == []

    smtp_server.start()  # back, same port
    wait_for(
        lambda: isinstance(retry_alerts_tick(defs, settings, instance), dg.RunRequest), 10, "due"
    )
    sent = run_retry_job(defs, instance, retry_alerts_tick(defs, settings, instance))

    assert sent.success
    (observed,) = materializations(instance, sent.run_id, "fraud_alerts")
    assert (observed["alerted"], observed["outbox_unsent"]) == (len(suspicious), 0)
    assert emails_by_transaction(mailbox.wait_for(len(suspicious))) == dict.fromkeys(suspicious, 1)
    for row in outbox(database_url).values():
        assert (row["status"], row["attempts"], row["last_error"]) == ("sent", 3, None)
        assert row["last_failed_at"] < row["sent_at"]  # when its last failed attempt was: kept
        assert row["message_id"].startswith("<fraud-alert.")
    assert "no alert due" in retry_alerts_tick(defs, settings, instance).skip_message
    time.sleep(1)
    assert emails_by_transaction(mailbox.messages()) == dict.fromkeys(suspicious, 1)


def test_smtp_refusing_the_login_keeps_alerts_pending_then_sends_them_with_the_right_password(
    fast_retries: Settings,
    instance: dg.DagsterInstance,
    smtp_server: LocalSmtpServer,
    mail_dir,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    smtp_server.stop()  # replaced, on the same port, by a server with STARTTLS and AUTH
    server = LocalSmtpServer(
        mail_dir=mail_dir,
        port=smtp_server.port,
        starttls=True,
        username="fraud-alerts",
        password="the-right-one",
        cert_dir=mail_dir.parent / "tls",
    )
    mailbox = MailBox(mail_dir)
    for name, value in {
        "FRAUD_SMTP_SECURITY": "starttls",
        "FRAUD_SMTP_VERIFY_CERTIFICATE": "false",  # the local server's certificate is self-signed
        "FRAUD_SMTP_USERNAME": "fraud-alerts",
        "FRAUD_SMTP_PASSWORD": "a-wrong-password",
    }.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    server.start()
    try:
        (batch,) = run_batches(settings, instance)
        suspicious = suspicious_ids(database_url)
        (alert_meta,) = materializations(instance, batch.run_id, "fraud_alerts")
        assert alert_meta["alerted"] == 0
        assert "535" in alert_meta["last_error"]  # authentication failed
        assert "a-wrong-password" not in alert_meta["last_error"]
        assert {row["status"] for row in outbox(database_url).values()} == {"failed"}
        assert mailbox.messages() == []

        monkeypatch.setenv("FRAUD_SMTP_PASSWORD", "the-right-one")
        defs = build_definitions(load_settings())
        wait_for(
            lambda: isinstance(retry_alerts_tick(defs, settings, instance), dg.RunRequest),
            10,
            "due",
        )
        sent = run_retry_job(defs, instance, retry_alerts_tick(defs, settings, instance))
        assert sent.success
        assert emails_by_transaction(mailbox.wait_for(len(suspicious))) == dict.fromkeys(
            suspicious, 1
        )
        assert {row["status"] for row in outbox(database_url).values()} == {"sent"}
    finally:
        server.stop()


def test_concurrent_senders_never_send_an_alert_twice(
    fast_retries: Settings,
    instance: dg.DagsterInstance,
    smtp_server: LocalSmtpServer,
    mailbox: MailBox,
    database_url: str,
) -> None:
    settings = fast_retries
    suspicious = alerts_failed_while_smtp_was_down(settings, instance, smtp_server, database_url)
    smtp = resolved_resources(settings)["smtp"]
    engine = create_engine(database_url)
    senders = 6
    start = threading.Barrier(senders)

    def sender(name: str) -> alert_delivery.DeliveryReport:
        start.wait()
        return send_due_alerts(engine, smtp, name, limit=1, pending_grace=timedelta(0))

    with ThreadPoolExecutor(max_workers=senders) as pool:
        futures = [pool.submit(sender, f"sender-{i}") for i in range(senders)]
        reports = [future.result(timeout=60) for future in futures]  # a sender's error fails
    # Each sender claims at most one; on PostgreSQL the ones that lose the race for the same
    # oldest alert claim nothing this round (the due condition is re-checked), never a copy.
    concurrent = [tid for report in reports for tid in report.sent_ids]
    assert 1 <= len(concurrent) == len(set(concurrent)) <= min(senders, len(suspicious))
    assert all(report.claimed <= 1 and report.error is None for report in reports)
    while (report := send_due_alerts(engine, smtp, "sweeper")).claimed:
        reports.append(report)
    engine.dispose()

    sent_ids = [tid for report in reports for tid in report.sent_ids]
    assert sorted(sent_ids) == sorted(suspicious)
    assert emails_by_transaction(mailbox.wait_for(len(suspicious))) == dict.fromkeys(suspicious, 1)


def test_a_dead_senders_claim_expires_and_the_resend_keeps_the_message_id(
    fast_retries: Settings,
    instance: dg.DagsterInstance,
    smtp_server: LocalSmtpServer,
    mailbox: MailBox,
    database_url: str,
) -> None:
    """The one window for a second copy: a sender dies after the server accepted an alert and
    before marking it sent. Its claims hold for STALE_CLAIM_AFTER, then another sender takes
    them over; the copy carries the same Message-ID, which mail clients use to drop it."""
    settings = fast_retries
    suspicious = alerts_failed_while_smtp_was_down(settings, instance, smtp_server, database_url)
    smtp = resolved_resources(settings)["smtp"]
    engine = create_engine(database_url)

    held = claim_alerts(engine, "dead-sender", pending_grace=timedelta(0))
    assert sorted(alert["transaction_id"] for alert in held) == sorted(suspicious)
    accepted = held[0]
    with SmtpMailer(smtp.smtp_settings()) as mailer:
        mailer.send(render_alert(accepted, smtp.sender, smtp.recipients))
    # ... and the sender dies here, holding every claim.

    def send(token: str) -> alert_delivery.DeliveryReport:
        return send_due_alerts(engine, smtp, token, pending_grace=timedelta(0))

    assert send("too-early").claimed == 0  # a fresh claim is never taken over
    expired = utcnow() - STALE_CLAIM_AFTER - timedelta(seconds=1)
    with engine.begin() as conn:
        conn.execute(
            sa.update(schema.fraud_alerts)
            .where(schema.fraud_alerts.c.claimed_by == "dead-sender")
            .values(claimed_at=expired)
        )
    report = send("successor")
    engine.dispose()

    assert (report.claimed, report.sent) == (len(suspicious), len(suspicious))
    emails = mailbox.wait_for(len(suspicious) + 1)
    expected = dict.fromkeys(suspicious, 1) | {accepted["transaction_id"]: 2}
    assert emails_by_transaction(emails) == expected
    copies = [m for m in emails if m["X-Fraud-Transaction-Id"] == accepted["transaction_id"]]
    rows = outbox(database_url)
    assert {m["Message-ID"] for m in copies} == {rows[accepted["transaction_id"]]["message_id"]}
    assert {(row["status"], row["claimed_by"]) for row in rows.values()} == {("sent", "successor")}


@dg.op
def hold_claims() -> None:
    """Stands for a run that is still sending (its run record is all the test needs)."""


@dg.job
def run_in_flight() -> None:
    hold_claims()


def test_a_claim_left_by_a_run_that_ended_is_sent_at_once_and_a_live_runs_claim_waits(
    fast_retries: Settings,
    instance: dg.DagsterInstance,
    smtp_server: LocalSmtpServer,
    mailbox: MailBox,
    database_url: str,
) -> None:
    """A run that ended while holding claims (its worker died with the daemon, the database
    failed under it) sends nothing more: `retry_alerts` asks Dagster and sends those alerts at
    once instead of after STALE_CLAIM_AFTER. A claim of a run still under way is left alone."""
    settings = fast_retries
    defs = build_definitions(settings)
    suspicious = alerts_failed_while_smtp_was_down(settings, instance, smtp_server, database_url)
    assert len(suspicious) >= 2
    (ended,) = instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.SUCCESS]))
    live = instance.create_run_for_job(run_in_flight, status=dg.DagsterRunStatus.STARTED)
    engine = create_engine(database_url)
    try:
        left = claim_alerts(
            engine,
            claim_token(ended.run_id),
            pending_grace=timedelta(0),
            limit=len(suspicious) // 2,
        )
        held = claim_alerts(engine, claim_token(live.run_id), pending_grace=timedelta(0))
        left_ids = {alert["transaction_id"] for alert in left}
        held_ids = {alert["transaction_id"] for alert in held}
        assert left_ids and held_ids and left_ids | held_ids == suspicious
        # The outbox alone cannot tell the dead from the living: nothing due for 10 minutes.
        assert outbox_status(engine, pending_grace=timedelta(0)).due == 0
        tokens = {row["transaction_id"]: row["claimed_by"] for row in outbox(database_url).values()}
        assert abandoned_claims(instance, engine) == {tokens[tid] for tid in left_ids}

        request = retry_alerts_tick(defs, settings, instance)
        assert isinstance(request, dg.RunRequest), request
        first = run_retry_job(defs, instance, request)
        assert first.success
        (observed,) = materializations(instance, first.run_id, "fraud_alerts")
        assert observed["alerted"] == len(left_ids)
        assert emails_by_transaction(mailbox.wait_for(len(left_ids))) == dict.fromkeys(left_ids, 1)
        rows = outbox(database_url)
        assert {rows[tid]["status"] for tid in left_ids} == {"sent"}
        assert {(rows[tid]["status"], rows[tid]["claimed_by"]) for tid in held_ids} == {
            ("sending", tokens[tid]) for tid in held_ids
        }
        assert "no alert due" in retry_alerts_tick(defs, settings, instance).skip_message

        instance.report_run_failed(live)  # ...until that run ends without sending them
        second = run_retry_job(defs, instance, retry_alerts_tick(defs, settings, instance))
        assert second.success
    finally:
        engine.dispose()
    emails = mailbox.wait_for(len(suspicious))
    assert emails_by_transaction(emails) == dict.fromkeys(suspicious, 1)
    assert {row["status"] for row in outbox(database_url).values()} == {"sent"}


def test_a_batch_run_failed_in_its_alert_step_leaves_claims_its_rerun_sends_at_once(
    fast_retries: Settings,
    instance: dg.DagsterInstance,
    smtp_server: LocalSmtpServer,
    mailbox: MailBox,
    database_url: str,
) -> None:
    """The alert step claims the batch's alerts, SMTP is down, and the database refuses to
    record the failure: the run fails with its alerts still `sending` under its claim. The
    operator's "Re-execute from failure" (or Dagster's run retry) takes that claim over at once,
    since the failed run sends nothing more, instead of sending nothing for 10 minutes."""
    settings = fast_retries
    defs = build_definitions(settings)
    produce(settings, known_transactions()[0])
    (request,) = evaluate_sensor(defs, settings, instance, None).run_requests
    smtp_server.stop()
    ensure_schema(create_engine(database_url))
    refuse_writes(
        database_url,
        "fraud_alerts",
        "injected fault: outbox update refused",
        condition="NEW.status = 'failed'",
        statement="UPDATE",
    )
    failed = run_request(request, instance)

    assert not failed.success
    (failure,) = failed.get_step_failure_events()
    assert failure.step_key == "transaction_batch.alert"
    suspicious = suspicious_ids(database_url)
    assert suspicious
    rows = outbox(database_url)
    assert set(rows) == suspicious
    assert {row["status"] for row in rows.values()} == {"sending"}
    assert {claiming_run_id(row["claimed_by"]) for row in rows.values()} == {failed.run_id}

    accept_writes(database_url, "fraud_alerts")
    smtp_server.start()
    rerun = reexecute(instance, failed.run_id, from_failure=True)

    assert rerun.success
    (observed,) = materializations(instance, rerun.run_id, "fraud_alerts")
    assert observed["alerted"] == len(suspicious)
    assert emails_by_transaction(mailbox.wait_for(len(suspicious))) == dict.fromkeys(suspicious, 1)
    rows = outbox(database_url)
    assert {row["status"] for row in rows.values()} == {"sent"}
    assert {claiming_run_id(row["claimed_by"]) for row in rows.values()} == {rerun.run_id}


class OutageHandler(MaildirHandler):
    """Stores messages like the local server; after storing the first one, and before telling
    the client it was accepted, runs `outage` (which stops the database)."""

    def __init__(self, mail_dir: Path, outage: Callable[[], None]) -> None:
        super().__init__(mail_dir)
        self.outage = outage
        self.accepted = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        reply = await super().handle_DATA(server, session, envelope)
        self.accepted += 1
        if self.accepted == 1:
            await asyncio.to_thread(self.outage)
        return reply


@pytest.mark.postgres
@pytest.mark.backends()  # its own PostgreSQL server, which it stops
def test_the_database_down_after_the_server_accepted_an_alert_sends_it_once(
    fast_retries: Settings,
    instance: dg.DagsterInstance,
    smtp_server: LocalSmtpServer,
    mailbox: MailBox,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The SMTP server accepts an alert, and the database is gone before the sender can mark
    it sent (a restart, a failover): the sender starts no new email, retries the mark until
    the database is back (3 s later), and releases what it did not try. Without the retry the
    delivery would fail and the next sender send the accepted alert a second time."""
    with local_postgres() as postgres:
        monkeypatch.setenv("FRAUD_DATABASE_URL", postgres.url())
        settings = load_settings()
        url = postgres.url()
        suspicious = alerts_failed_while_smtp_was_down(settings, instance, smtp_server, url)
        assert len(suspicious) >= 2, "some alerts must be left after the outage"
        smtp_server.stop()
        back = threading.Timer(3.0, postgres.start)

        def outage() -> None:
            postgres.stop()
            back.start()

        handler = OutageHandler(smtp_server.mail_dir, outage)
        try:
            with serving(handler, smtp_server.port):
                report = send_every_due_alert(settings, url, "first")

                # The first accepted alert (and any the session sent before the failed mark
                # stopped it) is marked sent once the database is back; the rest is released.
                assert (report.claimed, report.failed, report.error) == (len(suspicious), 0, None)
                assert report.sent >= 1 and report.sent + report.released == report.claimed
                assert any("the database is unreachable" in r.message for r in caplog.records)
                rows = outbox(url)
                accepted = set(report.sent_ids)
                assert {rows[tid]["status"] for tid in accepted} == {"sent"}
                assert {rows[tid]["status"] for tid in suspicious - accepted} <= {"pending"}

                successor = send_every_due_alert(settings, url, "successor")
        finally:
            back.join()

        assert successor.claimed == successor.sent == len(suspicious - accepted)
        emails = mailbox.wait_for(len(suspicious))
        assert emails_by_transaction(emails) == dict.fromkeys(suspicious, 1)
        assert {row["status"] for row in outbox(url).values()} == {"sent"}


def on_each_mark_sent(engine: sa.Engine, then: Callable[[int], None]) -> list[str]:
    """Call `then(n)` before the n-th statement marking alerts sent runs on `engine` (what it
    raises, the statement raises); returns those statements, as they come."""
    marks: list[str] = []

    @sa.event.listens_for(engine, "before_cursor_execute")
    def before_each_mark(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("UPDATE") and "sent_at" in statement:
            marks.append(statement)
            then(len(marks))

    return marks


class Interrupt(BaseException):
    """Stands in for Dagster's DagsterExecutionInterruptedError (the operator's Terminate)."""


def test_an_interrupt_stays_an_interrupt_when_recording_the_delivery_then_fails(
    fast_retries: Settings,
    instance: dg.DagsterInstance,
    smtp_server: LocalSmtpServer,
    database_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The run is interrupted while marking its first accepted alert sent, and the database
    refuses the marks made after the interrupt too. The delivery must still end with the
    interrupt (Dagster then ends the run CANCELED, as the operator asked, and does not retry
    it), the database's error as its cause and in the log."""
    settings = fast_retries
    suspicious = alerts_failed_while_smtp_was_down(settings, instance, smtp_server, database_url)
    engine = create_engine(database_url)

    def interrupt_then_refuse_marks(mark: int) -> None:
        if mark == 1:
            raise Interrupt()
        raise RuntimeError("injected: the database refuses the mark")

    marks = on_each_mark_sent(engine, interrupt_then_refuse_marks)

    smtp = resolved_resources(settings)["smtp"]
    with pytest.raises(Interrupt) as raised:
        send_due_alerts(engine, smtp, "interrupted", pending_grace=timedelta(0))
    cause = repr(raised.value.__cause__)
    del raised  # its tracebacks hold, in reference cycles, the connections it interrupted:
    gc.collect()  # returned to the pool now, before dispose closes the database under them
    engine.dispose()

    assert len(marks) == 2, "the accepted alerts were marked again after the interrupt"
    assert cause == "RuntimeError('injected: the database refuses the mark')"
    assert any(
        record.levelname == "ERROR" and "recording its outcome failed" in record.message
        for record in caplog.records
    )
    rows = outbox(database_url)
    assert {rows[tid]["status"] for tid in suspicious} == {"sending"}, "claims kept, none marked"


def test_a_second_interrupt_cannot_cut_short_the_recording_of_what_the_server_accepted(
    fast_retries: Settings,
    instance: dg.DagsterInstance,
    smtp_server: LocalSmtpServer,
    mailbox: MailBox,
    database_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A real SIGINT arrives while the first accepted alert is being marked sent, and a SIGTERM
    while the delivery marks, after that interrupt, what the server accepted (Ctrl-C on
    `dagster dev` reaches the run, then its shutdown does; or a second `kill`). The second
    must not cut that recording short: the delivery ends with the first interrupt, every alert
    the server accepted is marked sent, and the next sender sends the rest, each alert once."""
    settings = fast_retries
    suspicious = alerts_failed_while_smtp_was_down(settings, instance, smtp_server, database_url)
    engine = create_engine(database_url)

    def interrupt_twice(mark: int) -> None:
        if mark <= 2:
            os.kill(os.getpid(), (signal.SIGINT, signal.SIGTERM)[mark - 1])

    marks = on_each_mark_sent(engine, interrupt_twice)

    smtp = resolved_resources(settings)["smtp"]
    with interrupts_raised_as(Interrupt) as handled, pytest.raises(Interrupt):
        send_due_alerts(engine, smtp, "interrupted", pending_grace=timedelta(0))
    gc.collect()  # the interrupted UPDATE's connection back to the pool before dispose
    engine.dispose()

    assert len(marks) == 2, "the accepted alerts were marked again after the interrupt"
    assert handled == [signal.SIGINT], "the SIGTERM reached the run's handler"
    assert any(
        "SIGTERM" in record.message and "held" in record.message for record in caplog.records
    )
    accepted = set(emails_by_transaction(mailbox.messages()))
    assert accepted, "the session had an email in flight at the interrupt"
    rows = outbox(database_url)
    assert {rows[tid]["status"] for tid in accepted} == {"sent"}
    assert {rows[tid]["status"] for tid in suspicious - accepted} <= {"pending"}

    successor = send_every_due_alert(settings, database_url, "successor")

    assert successor.claimed == successor.sent == len(suspicious - accepted)
    emails = mailbox.wait_for(len(suspicious))
    assert emails_by_transaction(emails) == dict.fromkeys(suspicious, 1)


@pytest.fixture
def several_sessions(
    fast_retries: Settings, monkeypatch: pytest.MonkeyPatch
) -> tuple[Settings, list[int]]:
    """Up to 3 SMTP sessions per delivery, one per alert (the test has only a few alerts);
    the list records how many alerts each opened session was given."""
    monkeypatch.setenv("FRAUD_SMTP_MAX_SESSIONS", "3")
    monkeypatch.setattr(alert_delivery, "ALERTS_PER_EXTRA_SESSION", 1)
    shares: list[int] = []
    send_share = alert_delivery._send_share

    def counting_send_share(share: list[dict], *args: Any) -> Any:
        shares.append(len(share))
        return send_share(share, *args)

    monkeypatch.setattr(alert_delivery, "_send_share", counting_send_share)
    return load_settings(), shares


def send_every_due_alert(
    settings: Settings, database_url: str, token: str
) -> alert_delivery.DeliveryReport:
    engine = create_engine(database_url)
    try:
        smtp = resolved_resources(settings)["smtp"]
        return send_due_alerts(engine, smtp, token, pending_grace=timedelta(0))
    finally:
        engine.dispose()


def test_alerts_sent_over_several_sessions_arrive_once_each_and_are_all_marked_sent(
    several_sessions: tuple[Settings, list[int]],
    instance: dg.DagsterInstance,
    smtp_server: LocalSmtpServer,
    mailbox: MailBox,
    database_url: str,
) -> None:
    settings, shares = several_sessions
    suspicious = alerts_failed_while_smtp_was_down(settings, instance, smtp_server, database_url)
    assert len(suspicious) >= 3, "the test data must give every session an alert"
    shares.clear()

    report = send_every_due_alert(settings, database_url, "parallel")

    assert sorted(shares) == sorted(len(range(i, len(suspicious), 3)) for i in range(3))
    assert (report.claimed, report.sent, report.failed) == (len(suspicious), len(suspicious), 0)
    assert sorted(report.sent_ids) == sorted(suspicious)
    emails = mailbox.wait_for(len(suspicious))
    assert emails_by_transaction(emails) == dict.fromkeys(suspicious, 1)
    rows = outbox(database_url)
    assert {m["X-Fraud-Transaction-Id"]: m["Message-ID"] for m in emails} == {
        tid: row["message_id"] for tid, row in rows.items()
    }
    assert {(row["status"], row["claimed_by"]) for row in rows.values()} == {("sent", "parallel")}


def test_every_session_failing_leaves_every_alert_for_a_retry_and_none_marked_sent(
    several_sessions: tuple[Settings, list[int]],
    instance: dg.DagsterInstance,
    smtp_server: LocalSmtpServer,
    database_url: str,
) -> None:
    settings, shares = several_sessions
    suspicious = alerts_failed_while_smtp_was_down(settings, instance, smtp_server, database_url)
    smtp_server.stop()
    shares.clear()

    started = time.monotonic()
    report = send_every_due_alert(settings, database_url, "parallel")
    took = time.monotonic() - started

    assert len(shares) == 3
    assert (report.claimed, report.sent, report.failed) == (len(suspicious), 0, len(suspicious))
    assert report.error and "cannot open an SMTP session" in report.error
    rows = outbox(database_url)
    assert {(row["status"], row["claimed_by"]) for row in rows.values()} == {("failed", "parallel")}
    for row in rows.values():
        assert row["attempts"] == 2
        assert_backoff(row, 2, took)


class RefusingHandler(MaildirHandler):
    """Stores messages like the local server, but refuses the `nth` mail transaction while
    `refusing`: its recipient at RCPT (550) or its content after DATA (554). The session stays
    open, as a real server's does for such a refusal."""

    def __init__(self, mail_dir: Path, refuse_at: str, nth: int) -> None:
        super().__init__(mail_dir)
        self.refuse_at, self.nth = refuse_at, nth
        self.refusing = True
        self.transactions = 0  # one recipient per alert: one RCPT per mail transaction

    def _refuses_this_one(self) -> bool:
        return self.refusing and self.transactions == self.nth

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        self.transactions += 1
        if self.refuse_at == "RCPT" and self._refuses_this_one():
            return "550 5.1.1 test server refuses this recipient"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.refuse_at == "DATA" and self._refuses_this_one():
            return "554 5.7.1 test server refuses this message"
        return await super().handle_DATA(server, session, envelope)


@pytest.mark.parametrize("refuse_at", ["RCPT", "DATA"])
def test_a_message_the_server_refuses_fails_alone_and_the_session_sends_the_others(
    refuse_at: str,
    fast_retries: Settings,
    instance: dg.DagsterInstance,
    smtp_server: LocalSmtpServer,
    mailbox: MailBox,
    database_url: str,
) -> None:
    """The server refuses the second alert's email (the connection stays usable): only that
    alert fails, with the server's reply; the session goes on and delivers the others once, and
    the retry sends the refused one alone."""
    settings = fast_retries
    suspicious = alerts_failed_while_smtp_was_down(settings, instance, smtp_server, database_url)
    assert len(suspicious) >= 3, "the refused alert must have alerts before and after it"
    smtp_server.stop()  # replaced, on the same port, by the refusing server
    handler = RefusingHandler(smtp_server.mail_dir, refuse_at, nth=2)
    code, text = {
        "RCPT": ("550", "5.1.1 test server refuses this recipient"),
        "DATA": ("554", "5.7.1 test server refuses this message"),
    }[refuse_at]
    with serving(handler, smtp_server.port):
        started = time.monotonic()
        report = send_every_due_alert(settings, database_url, "first")
        took = time.monotonic() - started

        assert handler.transactions == len(suspicious), "every alert must have been tried"
        assert (report.claimed, report.sent, report.failed) == (
            len(suspicious),
            len(suspicious) - 1,
            1,
        )
        rows = outbox(database_url)
        (refused,) = [tid for tid, row in rows.items() if row["status"] != "sent"]
        delivered = suspicious - {refused}
        assert sorted(report.sent_ids) == sorted(delivered)
        row = rows[refused]
        assert (row["status"], row["attempts"], row["sent_at"]) == ("failed", 2, None)
        assert code in row["last_error"] and text in row["last_error"]  # the server's reply
        assert_backoff(row, 2, took)  # its own backoff after 2 attempts
        assert report.error is not None and str(row["last_error"]) in report.error
        assert emails_by_transaction(mailbox.wait_for(len(delivered))) == dict.fromkeys(
            delivered, 1
        )

        handler.refusing = False
        engine = create_engine(database_url)
        try:
            wait_for(lambda: outbox_status(engine, pending_grace=timedelta(0)).due == 1, 10, "due")
        finally:
            engine.dispose()
        retry = send_every_due_alert(settings, database_url, "retry")

    assert (retry.claimed, retry.sent, retry.sent_ids) == (1, 1, [refused])
    emails = mailbox.wait_for(len(suspicious))
    time.sleep(0.5)  # a resent copy would arrive now
    emails = mailbox.messages()
    assert emails_by_transaction(emails) == dict.fromkeys(suspicious, 1)
    rows = outbox(database_url)
    assert {m["X-Fraud-Transaction-Id"]: m["Message-ID"] for m in emails} == {
        tid: row["message_id"] for tid, row in rows.items()
    }
    assert {row["status"] for row in rows.values()} == {"sent"}
    assert rows[refused]["claimed_by"] == "retry"


class FakeClock:
    """Seconds, moved only by the test (here by the SMTP server, between two messages)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ClockAdvancingHandler(MaildirHandler):
    """Stores messages like the local server; after accepting the `after`-th one it moves
    `clock` on by `seconds`: as if that delivery had been that slow."""

    def __init__(self, mail_dir: Path, clock: FakeClock, after: int, seconds: float) -> None:
        super().__init__(mail_dir)
        self.clock, self.after, self.seconds = clock, after, seconds
        self.accepted = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        reply = await super().handle_DATA(server, session, envelope)
        self.accepted += 1
        if self.accepted == self.after:
            self.clock.now += self.seconds
        return reply


def test_a_sender_stops_at_half_the_claim_time_and_releases_the_untried_alerts_for_the_next(
    fast_retries: Settings,
    instance: dg.DagsterInstance,
    smtp_server: LocalSmtpServer,
    mailbox: MailBox,
    database_url: str,
) -> None:
    """A session so slow that half of STALE_CLAIM_AFTER has passed after its second email: the
    sender sends no more on its claim (another sender could take it over at STALE_CLAIM_AFTER
    and send a copy), releases the rest without counting an attempt, and the next sender
    delivers them at once, each exactly once."""
    settings = fast_retries
    suspicious = alerts_failed_while_smtp_was_down(settings, instance, smtp_server, database_url)
    assert len(suspicious) >= 3, "some alerts must be left when the time is up"
    smtp_server.stop()
    clock = FakeClock()
    half = (STALE_CLAIM_AFTER / 2).total_seconds()
    handler = ClockAdvancingHandler(smtp_server.mail_dir, clock, after=2, seconds=half)
    smtp = resolved_resources(settings)["smtp"]
    engine = create_engine(database_url)
    try:
        with serving(handler, smtp_server.port):
            report = send_due_alerts(engine, smtp, "slow", pending_grace=timedelta(0), clock=clock)

            assert (report.claimed, report.sent, report.failed) == (len(suspicious), 2, 0)
            assert report.released == len(suspicious) - 2
            assert report.error is None
            rows = outbox(database_url)
            first = set(report.sent_ids)
            assert {rows[tid]["status"] for tid in first} == {"sent"}
            for tid in suspicious - first:
                # as before the claim: one failed attempt (SMTP was down), due again now
                assert (rows[tid]["status"], rows[tid]["attempts"]) == ("pending", 1)
                assert (rows[tid]["claimed_by"], rows[tid]["sent_at"]) == (None, None)
            assert emails_by_transaction(mailbox.wait_for(2)) == dict.fromkeys(first, 1)

            # No wait for the claim to go stale: the released alerts are due at once.
            successor = send_due_alerts(engine, smtp, "successor", pending_grace=timedelta(0))
    finally:
        engine.dispose()

    left = len(suspicious) - 2
    assert (successor.claimed, successor.sent, successor.failed) == (left, left, 0)
    assert sorted(successor.sent_ids) == sorted(suspicious - first)
    mailbox.wait_for(len(suspicious))
    time.sleep(0.5)  # a copy would arrive now
    emails = mailbox.messages()
    assert emails_by_transaction(emails) == dict.fromkeys(suspicious, 1)
    rows = outbox(database_url)
    assert {row["status"] for row in rows.values()} == {"sent"}
    assert {rows[tid]["claimed_by"] for tid in suspicious - first} == {"successor"}
    assert {rows[tid]["attempts"] for tid in suspicious - first} == {2}


class InterruptedWhileStartingSessions(ThreadPoolExecutor):
    """The pool of a delivery whose run is interrupted (the operator's Terminate) right after
    its first SMTP session was submitted, before the others are."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.submitted = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        if self.submitted == 1:
            raise Interrupt()
        self.submitted += 1
        return super().submit(fn, *args, **kwargs)


def test_an_interrupt_while_the_sessions_start_sends_nothing_and_releases_every_alert(
    several_sessions: tuple[Settings, list[int]],
    instance: dg.DagsterInstance,
    smtp_server: LocalSmtpServer,
    mailbox: MailBox,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before: the session submitted before the interrupt sent its whole share (the interrupt
    had not reached it), and nothing marked those emails sent, so the next sender sent them
    again. Now no session sends before all are under way: nothing is sent, every alert is due
    again at once with its attempt not counted, and the next sender sends each one once."""
    settings, _ = several_sessions
    suspicious = alerts_failed_while_smtp_was_down(settings, instance, smtp_server, database_url)
    assert len(suspicious) >= 3, "every session must have a share"
    with monkeypatch.context() as patch:
        patch.setattr(alert_delivery, "ThreadPoolExecutor", InterruptedWhileStartingSessions)
        with pytest.raises(Interrupt):
            send_every_due_alert(settings, database_url, "interrupted")
    gc.collect()

    time.sleep(0.5)  # an email sent by the interrupted delivery would be here now
    assert mailbox.messages() == []
    rows = outbox(database_url)
    assert {(rows[tid]["status"], rows[tid]["attempts"]) for tid in suspicious} == {("pending", 1)}
    assert {rows[tid]["claimed_by"] for tid in suspicious} == {None}

    successor = send_every_due_alert(settings, database_url, "successor")

    assert successor.claimed == successor.sent == len(suspicious)
    mailbox.wait_for(len(suspicious))
    time.sleep(0.5)  # a copy would arrive now
    assert emails_by_transaction(mailbox.messages()) == dict.fromkeys(suspicious, 1)


class EnvelopeRecordingHandler(MaildirHandler):
    """Stores messages like the local server and records each one's envelope recipients."""

    def __init__(self, mail_dir: Path) -> None:
        super().__init__(mail_dir)
        self.envelopes: list[list[str]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.envelopes.append(list(envelope.rcpt_tos))
        return await super().handle_DATA(server, session, envelope)


def test_every_configured_analyst_receives_every_alert_however_long_the_list(
    fast_retries: Settings,
    instance: dg.DagsterInstance,
    smtp_server: LocalSmtpServer,
    mailbox: MailBox,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before: the To header was cut at 2,000 characters with a trailing "…", and smtplib takes
    the envelope from it: the server refused every alert (non-ASCII, no SMTPUTF8) or, with
    SMTPUTF8, the analysts after the cut never received any."""
    analysts = [f"risk-analyst-{i:03d}@bank.example" for i in range(100)]
    monkeypatch.setenv("FRAUD_ALERT_RECIPIENTS", ",".join(analysts))
    settings = load_settings()
    suspicious = alerts_failed_while_smtp_was_down(
        fast_retries, instance, smtp_server, database_url
    )
    smtp_server.stop()
    handler = EnvelopeRecordingHandler(smtp_server.mail_dir)
    with serving(handler, smtp_server.port):
        report = send_every_due_alert(settings, database_url, "many")

    assert (report.sent, report.failed) == (len(suspicious), 0)
    assert handler.envelopes == [analysts] * len(suspicious)
    emails = mailbox.wait_for(len(suspicious))
    assert emails_by_transaction(emails) == dict.fromkeys(suspicious, 1)
    assert {tuple(a.addr_spec for a in m["To"].addresses) for m in emails} == {tuple(analysts)}


def test_an_unexpected_error_in_a_session_fails_its_unsent_alerts_and_the_others_go_out(
    several_sessions: tuple[Settings, list[int]],
    instance: dg.DagsterInstance,
    smtp_server: LocalSmtpServer,
    mailbox: MailBox,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An error no SMTP failure explains (here: rendering one alert fails) in one session.
    Before: it came out of the delivery before any outcome was recorded, leaving every alert
    `sending` with no error and no backoff. Now that session's unsent alerts are failed with
    the error and a backoff, the other sessions' alerts are sent and marked, and the retry
    sends the failed ones once."""
    settings, _ = several_sessions
    suspicious = alerts_failed_while_smtp_was_down(settings, instance, smtp_server, database_url)
    assert len(suspicious) >= 3, "the other sessions must have alerts to send"
    broken = sorted(suspicious)[0]
    render = alert_delivery.render_alert

    def render_failing_once(alert: dict, *args: Any) -> Any:
        if alert["transaction_id"] == broken:
            raise RuntimeError("injected: rendering this alert failed")
        return render(alert, *args)

    with monkeypatch.context() as patch:
        patch.setattr(alert_delivery, "render_alert", render_failing_once)
        report = send_every_due_alert(settings, database_url, "first")

    rows = outbox(database_url)
    failed = {tid for tid in suspicious if rows[tid]["status"] == "failed"}
    assert broken in failed
    assert (report.sent, report.failed) == (len(suspicious) - len(failed), len(failed))
    assert sorted(report.sent_ids) == sorted(suspicious - failed)
    assert {rows[tid]["status"] for tid in suspicious - failed} == {"sent"}
    for tid in failed:
        assert "injected: rendering this alert failed" in rows[tid]["last_error"]
        assert rows[tid]["next_attempt_at"] is not None
    assert emails_by_transaction(mailbox.wait_for(len(suspicious - failed))) == dict.fromkeys(
        suspicious - failed, 1
    )

    engine = create_engine(database_url)

    def failed_ones_due() -> bool:  # their backoff: 2 s after their second attempt
        return outbox_status(engine, pending_grace=timedelta(0)).due == len(failed)

    try:
        wait_for(failed_ones_due, 10, "the failed alerts due again")
    finally:
        engine.dispose()
    retry = send_every_due_alert(settings, database_url, "retry")

    assert sorted(retry.sent_ids) == sorted(failed)
    mailbox.wait_for(len(suspicious))
    time.sleep(0.5)  # a copy would arrive now
    assert emails_by_transaction(mailbox.messages()) == dict.fromkeys(suspicious, 1)
