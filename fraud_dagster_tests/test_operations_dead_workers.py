"""A batch run's worker process killed, through the real dagster-daemon, broker, SMTP server and
database: the run is marked failed, Dagster retries it, nothing is lost or written twice, the
operators are told.

Two ways to die: the worker alone (the code location server that launched it sees it and fails
the run), and the worker together with that server and the daemon (a machine crash, `kill -9`
of the whole `dagster dev`): then only the `fail_runs_whose_worker_died` sensor of the restarted
daemon can tell the run will never finish. In both, the database refuses the batch's rows at
first, so the run is still at its persist step (retrying) when it is killed. A run that died
before its process reported anything stays STARTING: dagster.yaml's run monitoring fails it.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import dagster as dg
import pytest

from fraud_dagster.local_services.dagster_processes import running_daemon, start_daemon
from fraud_dagster.run_health import (
    WORKER_START_TAG,
    RunWorker,
    process_is_alive,
    run_worker,
)
from fraud_dagster.settings import Settings
from fraud_dagster_tests.helpers import MailBox, suspicious_ids
from fraud_dagster_tests.operations_support import (
    accept_writes,
    accounting,
    analyst_alerts,
    emails_by_transaction,
    operator_emails,
    stall_a_batch,
    wait_for,
    wait_for_the_batch_at_persist,
    wait_until_settled,
)

pytestmark = [pytest.mark.services, pytest.mark.slow]

OPERATORS = "operators@bank.example"


@pytest.fixture
def daemon_env(env: dict[str, str]) -> dict[str, str]:
    return {**env, "FRAUD_RUN_HEALTH_INTERVAL_SECONDS": "1", "FRAUD_OPERATOR_RECIPIENTS": OPERATORS}


def failure_messages(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    records = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.RUN_FAILURE).records
    return [record.event_log_entry.dagster_event.message or "" for record in records]


def wait_until_worker_gone(worker: RunWorker) -> None:
    wait_for(
        lambda: not process_is_alive(worker.pid, worker.reported_at),
        30,
        f"worker pid {worker.pid} exiting",
    )


def assert_retried_once_and_nothing_lost(
    instance: dg.DagsterInstance,
    settings: Settings,
    database_url: str,
    mailbox: MailBox,
    dead: RunWorker,
    sent: int,
    log: Path,
) -> None:
    """The dead run failed (once), its retry stored every message once, one email per
    suspicious transaction, and the operators were told about the dead run."""
    topic = settings.kafka_topic
    records = wait_until_settled(instance, database_url, topic, sent, log)
    dead_run = instance.get_run_by_id(dead.run_id)
    assert dead_run is not None and dead_run.status == dg.DagsterRunStatus.FAILURE
    assert len(failure_messages(instance, dead.run_id)) == 1, "failed more than once"
    retries = [r.dagster_run for r in records if r.dagster_run.parent_run_id == dead.run_id]
    assert [r.status for r in retries] == [dg.DagsterRunStatus.SUCCESS]
    assert accounting(database_url, topic) == {(0, offset): 1 for offset in range(sent)}
    suspicious = suspicious_ids(database_url)
    assert suspicious, "the batch should hold suspicious transactions"

    def all_mail_in() -> bool:
        told = {m["X-Fraud-Run-Id"] for m in operator_emails(mailbox)}
        return len(analyst_alerts(mailbox)) >= len(suspicious) and dead.run_id in told

    wait_for(all_mail_in, 60, "the analysts' alerts and the operators' email")
    assert emails_by_transaction(analyst_alerts(mailbox)) == {tx: 1 for tx in suspicious}
    (told,) = [m for m in operator_emails(mailbox) if m["X-Fraud-Run-Id"] == dead.run_id]
    assert told["To"] == OPERATORS
    assert "Dagster retries it" in told.get_content()


@pytest.mark.backends("postgresql")
@pytest.mark.dagster_storage("postgresql")
def test_a_worker_that_died_with_its_server_and_daemon_is_failed_and_retried_after_restart(
    settings: Settings,
    daemon_env: dict[str, str],
    dagster_home: Path,
    instance: dg.DagsterInstance,
    database_url: str,
    mailbox: MailBox,
    tmp_path: Path,
) -> None:
    """The production set-up (instance and application database on PostgreSQL)."""
    sent = stall_a_batch(settings, database_url)
    log = tmp_path / "daemon.log"
    daemon = start_daemon(dagster_home, daemon_env, log)
    try:
        dead = run_worker(instance, wait_for_the_batch_at_persist(instance, settings.kafka_topic))
        os.killpg(daemon.pid, signal.SIGKILL)  # daemon, code server and run worker at once
    finally:
        daemon.kill()
        daemon.wait()
    wait_until_worker_gone(dead)
    # Nothing of Dagster's is left to notice: the run stays STARTED.
    assert instance.get_run_by_id(dead.run_id).status == dg.DagsterRunStatus.STARTED

    accept_writes(database_url, "scored_transactions")
    with running_daemon(dagster_home, daemon_env, log):
        assert_retried_once_and_nothing_lost(
            instance, settings, database_url, mailbox, dead, sent, log
        )
    (message,) = failure_messages(instance, dead.run_id)
    assert f"worker process (pid {dead.pid}) is gone" in message


@pytest.mark.backends("sqlite")
def test_a_worker_killed_alone_is_failed_once_by_its_server_and_retried(
    settings: Settings,
    daemon_env: dict[str, str],
    dagster_home: Path,
    instance: dg.DagsterInstance,
    database_url: str,
    mailbox: MailBox,
    tmp_path: Path,
) -> None:
    """The server that launched the worker fails the run itself; the sensor, which waits
    `DEAD_WORKER_CONFIRM_SECONDS` before it acts, must not fail it a second time."""
    sent = stall_a_batch(settings, database_url)
    log = tmp_path / "daemon.log"
    with running_daemon(dagster_home, daemon_env, log):
        dead = run_worker(instance, wait_for_the_batch_at_persist(instance, settings.kafka_topic))
        # The worker recorded itself (start in ticks since boot): alive by that record even
        # when the wall clock says otherwise (created_by 0: as after a large clock step).
        recorded = instance.get_run_by_id(dead.run_id).tags[WORKER_START_TAG]
        assert recorded.startswith(f"{dead.pid}@")
        assert process_is_alive(dead.pid, 0.0, recorded)
        os.kill(dead.pid, signal.SIGKILL)
        wait_until_worker_gone(dead)
        accept_writes(database_url, "scored_transactions")
        assert_retried_once_and_nothing_lost(
            instance, settings, database_url, mailbox, dead, sent, log
        )
    (message,) = failure_messages(instance, dead.run_id)
    assert "is gone" not in message, "the sensor, not the server, failed the run"
    engine_events = instance.get_records_for_run(
        dead.run_id, of_type=dg.DagsterEventType.ENGINE_EVENT
    ).records
    assert any(
        "terminated by signal 9 (SIGKILL)" in (r.event_log_entry.dagster_event.message or "")
        for r in engine_events
    ), "the server's explanation is missing from the run's event log"


@dg.op
def never_runs() -> None:
    """The stuck run's only step; its process never started."""


@pytest.mark.backends("sqlite")
def test_a_run_stuck_starting_is_failed_by_dagsters_run_monitoring(
    env: dict[str, str], dagster_home: Path, instance: dg.DagsterInstance, tmp_path: Path
) -> None:
    """A run launched 10 minutes ago whose process never reported (it died with the server
    that launched it, between launch and its first event): dagster.yaml's run monitoring
    (start_timeout_seconds 180, polled every 30 s) fails it through the real daemon."""
    job = dg.GraphDefinition(name="stuck_job", node_defs=[never_runs]).to_job()
    run = instance.create_run_for_job(
        job, status=dg.DagsterRunStatus.STARTING, tags={"dagster/max_retries": "0"}
    )
    launched = dg.DagsterEvent(
        event_type_value=dg.DagsterEventType.RUN_STARTING.value, job_name=job.name
    )
    instance.report_dagster_event(launched, run.run_id, timestamp=time.time() - 600)
    assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.STARTING

    log = tmp_path / "daemon.log"
    with running_daemon(dagster_home, env, log):
        try:
            wait_for(
                lambda: instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.FAILURE,
                120,
                "run monitoring failing the stuck run",
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}; daemon log:\n{log.read_text()[-3000:]}") from None
    (message,) = failure_messages(instance, run.run_id)
    assert "taking longer than 180 seconds to start" in message
