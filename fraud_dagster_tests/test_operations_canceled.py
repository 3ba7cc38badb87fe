"""A batch run the operator terminates before it stored its batch, through the real
dagster-daemon, code server, broker, SMTP server and database.

Dagster retries failed runs, not canceled ones, and the failure email does not cover them: the
operators must be told once, with the offsets, and re-executing the run as the email says must
store the batch once. The database refuses the batch's rows at first, so the run is still at its
persist step (retrying) when it is terminated.

A batch run terminated while it sends its alerts (behind a slow SMTP relay) must not leave an
alert to be sent twice: the one in flight is accepted after the interrupt.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from fraud_dagster.alert_claims import claiming_run_id
from fraud_dagster.alerts import run_failure_message_id
from fraud_dagster.batching import PlannedBatch
from fraud_dagster.benchmarks.harness import sensor_ticks
from fraud_dagster.definitions import build_definitions
from fraud_dagster.jobs import batch_run_config
from fraud_dagster.local_services.dagster_processes import running_daemon
from fraud_dagster.local_services.smtp import LocalSmtpServer, MaildirHandler
from fraud_dagster.resources import resolved_resources
from fraud_dagster.sensors import CANCELED_BATCH_EMAIL_SENSOR, RUN_FAILURE_EMAIL_SENSOR
from fraud_dagster.settings import Settings, load_settings
from fraud_dagster.storage import schema
from fraud_dagster_tests.helpers import MailBox, produce, serving, suspicious_ids, table_rows
from fraud_dagster_tests.operations_support import (
    accept_writes,
    accounting,
    batch_records,
    emails_by_transaction,
    operator_emails,
    reexecute,
    sensor_tick,
    stall_a_batch,
    wait_for,
    wait_for_the_batch_at_persist,
)
from fraud_dagster_tests.test_end_to_end import known_transactions

pytestmark = pytest.mark.services

OPERATORS = "ops-oncall@bank.example"


@pytest.mark.slow
@pytest.mark.backends("sqlite")
def test_a_terminated_batch_run_is_mailed_once_and_its_rerun_stores_the_batch(
    settings: Settings,
    env: dict[str, str],
    dagster_home: Path,
    instance: dg.DagsterInstance,
    database_url: str,
    mailbox: MailBox,
    tmp_path: Path,
) -> None:
    topic = settings.kafka_topic
    sent = stall_a_batch(settings, database_url, seed=93)

    daemon_env = {**env, "FRAUD_OPERATOR_RECIPIENTS": OPERATORS}
    with running_daemon(dagster_home, daemon_env, tmp_path / "daemon.log"):
        run_id = wait_for_the_batch_at_persist(instance, topic)
        # The UI's Terminate: the instance's run coordinator asks the code server to stop it.
        assert instance.run_coordinator.cancel_run(run_id)
        wait_for(
            lambda: instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.CANCELED,
            60,
            "the run canceled",
        )
        wait_for(lambda: bool(operator_emails(mailbox)), 60, "the operators' email")
        # Two more ticks of each mailer: no copy, no failure email; and no automatic retry.
        mailed_at = time.time()
        for sensor in (CANCELED_BATCH_EMAIL_SENSOR, RUN_FAILURE_EMAIL_SENSOR):
            wait_for(
                lambda sensor=sensor: len(sensor_ticks(instance, sensor, mailed_at)) >= 2,
                60,
                f"two more ticks of {sensor}",
            )
        (email,) = operator_emails(mailbox)
        assert not [r for r in batch_records(instance, topic) if r.dagster_run.parent_run_id]

    assert email["To"] == OPERATORS and email["X-Fraud-Run-Id"] == run_id
    assert email["Subject"].startswith(
        f"[fraud-dagster] run was canceled: score_transactions ({topic}/0 offsets 0-59)"
    )
    body = email.get_content()
    assert "Dagster does not retry a canceled run" in body
    assert "Re-execute > From failure" in body
    assert accounting(database_url, topic) == {}

    # What the email asks for, once the database is back: the batch is stored once.
    accept_writes(database_url, "scored_transactions")
    assert reexecute(instance, run_id, from_failure=True).success
    assert accounting(database_url, topic) == {(0, offset): 1 for offset in range(sent)}
    assert resolved_resources(settings)["kafka"].committed_offsets() == {0: sent}


@pytest.mark.backends("sqlite")
def test_only_canceled_batch_runs_are_mailed(
    settings: Settings,
    instance: dg.DagsterInstance,
    mailbox: MailBox,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A canceled send_pending_alerts run holds no offsets (its alerts go with the next one)."""
    monkeypatch.setenv("FRAUD_OPERATOR_RECIPIENTS", OPERATORS)
    settings = load_settings()
    defs = build_definitions(settings)
    watching = sensor_tick(CANCELED_BATCH_EMAIL_SENSOR, defs, instance, settings, None)
    batch = PlannedBatch(settings.kafka_topic, 0, 100, 199)
    canceled = []
    for job_name, config, tags in (
        ("send_pending_alerts", {}, {}),
        ("score_transactions", batch_run_config(batch), batch.tags()),
    ):
        run = instance.create_run_for_job(
            defs.resolve_job_def(job_name), run_config=config, tags=tags
        )
        instance.report_run_canceled(run, message="Run was canceled by an operator.")
        canceled.append(run.run_id)

    mailed = sensor_tick(CANCELED_BATCH_EMAIL_SENSOR, defs, instance, settings, watching.cursor)

    assert mailed.skip_reason.skip_message == "emailed the operators about 1 canceled batch run(s)"
    (email,) = mailbox.messages()
    assert email["X-Fraud-Run-Id"] == canceled[1]
    assert email["Message-ID"] == run_failure_message_id(canceled[1], "canceled")
    assert f"({settings.kafka_topic}/0 offsets 100-199)" in email["Subject"]
    assert "Run was canceled by an operator." in email.get_content()


class SlowRelay(MaildirHandler):
    """Stores each message, then takes `delay` seconds to tell the client it was accepted: the
    run's sessions spend their time waiting on the server, as behind a slow relay."""

    def __init__(self, mail_dir: Path, delay: float) -> None:
        super().__init__(mail_dir)
        self.delay = delay

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        reply = await super().handle_DATA(server, session, envelope)
        await asyncio.sleep(self.delay)
        return reply


def run_worker_pid(instance: dg.DagsterInstance, run_id: str) -> int:
    """The process the run's steps execute in (the in-process executor: the run worker)."""
    (start, *_) = instance.get_records_for_run(
        run_id, of_type=dg.DagsterEventType.STEP_START
    ).records
    return start.event_log_entry.dagster_event.pid


@pytest.mark.slow
@pytest.mark.backends("sqlite")
@pytest.mark.parametrize("killed_too", [False, True], ids=["terminate", "terminate-then-kill"])
def test_a_run_terminated_while_sending_alerts_leaves_no_alert_to_be_sent_twice(
    killed_too: bool,
    settings: Settings,
    env: dict[str, str],
    dagster_home: Path,
    instance: dg.DagsterInstance,
    database_url: str,
    smtp_server: LocalSmtpServer,
    mailbox: MailBox,
    tmp_path: Path,
) -> None:
    """The operator terminates a batch run while its alert step is sending through a slow
    relay. The email the session has in flight is accepted after the interrupt: it must be
    recorded as sent before the run ends, and what the run did not try must be sent by
    `retry_alerts`: every alert arrives once. `killed_too`: half a second after the
    Terminate, the operator also sends the run worker a SIGTERM (a `kill`, a second Ctrl-C on
    `dagster dev`): it must not cut that recording short."""
    topic = settings.kafka_topic
    produce(settings, known_transactions()[0])
    smtp_server.stop()
    daemon_env = {
        **env,
        "FRAUD_ALERT_PENDING_GRACE_SECONDS": "0",
        "FRAUD_ALERT_RETRY_INTERVAL_SECONDS": "5",
    }

    def alerts() -> list[dict]:
        return table_rows(database_url, schema.fraud_alerts)

    def alert_emails() -> list:
        return [m for m in mailbox.messages() if m["X-Fraud-Transaction-Id"]]

    def outbox_state() -> str:
        return str(sorted((row["status"], row["claimed_by"]) for row in alerts()))

    with (
        serving(SlowRelay(smtp_server.mail_dir, delay=1.5), smtp_server.port),
        running_daemon(dagster_home, daemon_env, tmp_path / "daemon.log"),
    ):
        wait_for(lambda: bool(alert_emails()), 120, "the batch run's first alert email")
        (record,) = batch_records(instance, topic)
        run_id = record.dagster_run.run_id
        assert instance.run_coordinator.cancel_run(run_id)  # the UI's Terminate
        if killed_too:
            time.sleep(0.5)  # the Terminate's SIGINT has reached the run, its email in flight
            os.kill(run_worker_pid(instance, run_id), signal.SIGTERM)
        wait_for(
            lambda: instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.CANCELED,
            60,
            "the run canceled",
        )
        suspicious = suspicious_ids(database_url)
        assert len(suspicious) >= 4, "the relay must still have alerts to take at the cancel"
        wait_for(
            lambda: {row["status"] for row in alerts()} == {"sent"},
            120,
            "every alert sent by retry_alerts",
            state=outbox_state,
        )
        # A copy of an alert would arrive with the others; let two more ticks pass anyway.
        settled_at = time.time()
        wait_for(
            lambda: len(sensor_ticks(instance, "retry_alerts", settled_at)) >= 2,
            60,
            "two more ticks of retry_alerts",
        )

    assert emails_by_transaction(alert_emails()) == dict.fromkeys(suspicious, 1)
    senders = {claiming_run_id(row["claimed_by"]) for row in alerts()}
    assert run_id in senders and len(senders) >= 2, "the cancel came after the last alert"
    held = "interrupted again (SIGTERM) while recording the alert delivery"
    assert (held in (tmp_path / "daemon.log").read_text()) == killed_too
