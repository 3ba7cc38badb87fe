"""The auditor's test: a mixed stream (good, bad, duplicates) through the real dagster-daemon
while faults are injected one after another: SMTP down, broker down, database down, model
tampered, daemon killed. Afterwards every produced message is stored exactly once (scored or
rejected), every suspicious transaction has exactly one email, the operators were told about
the failed runs, and the consumer group's committed offsets show no lag.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
from dagster._core.scheduler.instigation import TickStatus
from dagster._core.storage.tags import PARENT_RUN_ID_TAG, RETRY_NUMBER_TAG, ROOT_RUN_ID_TAG
from kafka import KafkaAdminClient

from fraud_dagster.benchmarks.harness import sensor_ticks
from fraud_dagster.kafka_io import ensure_topic, offset_bounds
from fraud_dagster.local_services.dagster_processes import start_daemon, stop_dagster_process
from fraud_dagster.local_services.kafka import LocalKafka
from fraud_dagster.local_services.process import free_port
from fraud_dagster.local_services.smtp import LocalSmtpServer
from fraud_dagster.producer import synthetic_transactions
from fraud_dagster.sensors import IN_FLIGHT_STATUSES, KAFKA_SENSOR_NAME
from fraud_dagster.settings import PROJECT_ROOT, Settings, load_settings
from fraud_dagster.simulator import to_messages
from fraud_dagster.storage import schema
from fraud_dagster_tests.helpers import MailBox, produce, produce_raw, table_rows
from fraud_dagster_tests.operations_support import (
    accounting,
    batch_records,
    emails_by_transaction,
    local_postgres,
    reexecute,
    step_errors,
    tampered_models_dir,
    wait_for,
)

pytestmark = [pytest.mark.services, pytest.mark.slow, pytest.mark.postgres]


class Stream:
    """Produces chunks of good, bad and duplicate messages and remembers how many it sent."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.sent = 0
        self.seen: list[dict] = []

    def chunk(self, n: int, seed: int) -> None:
        frame = synthetic_transactions(n, seed=seed)
        messages = to_messages(frame)
        for message in messages:
            message["transaction_id"] = f"s{seed}-{message['transaction_id']}"
        last = pd.Timestamp(frame["transaction_date"].max())
        for i, amount in enumerate((4_800.0, 9_999.99)):  # two any sane model flags
            messages.append(
                {
                    "transaction_id": f"s{seed}-FRAUD-{i}",
                    "account_id": f"A-X{seed}-{i}",
                    "merchant": "M-Z",
                    "transaction_amount": amount,
                    "transaction_date": (last + pd.Timedelta(seconds=i + 1)).isoformat() + "Z",
                }
            )
        duplicate = dict(self.seen[-1]) if self.seen else None  # one from an earlier chunk
        self.sent += produce(self.settings, messages)
        self.seen.extend(messages)
        bad = [b"{broken", b"[]", json.dumps({**messages[0], "transaction_amount": -1}).encode()]
        bad.append(json.dumps(messages[1]).encode())  # a duplicate within the stream
        if duplicate:
            bad.append(json.dumps(duplicate).encode())
        self.sent += produce_raw(self.settings, bad)


def kill_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def test_every_message_is_accounted_for_once_and_every_alert_sent_once_across_faults(
    dagster_home: Path,
    instance: dg.DagsterInstance,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broker = LocalKafka(
        data_dir=tmp_path / "kafka", port=free_port(), controller_port=free_port(), heap="512m"
    )
    smtp = LocalSmtpServer(mail_dir=tmp_path / "mail", port=free_port())
    mailbox = MailBox(smtp.mail_dir)
    models = tampered_models_dir(PROJECT_ROOT / "models", tmp_path / "models")
    for path in models.glob("*.joblib"):  # start from intact copies; tampered later
        shutil.copyfile(PROJECT_ROOT / "models" / path.name, path)
    topic = f"audit-{uuid.uuid4().hex[:6]}"
    daemons: list[subprocess.Popen] = []
    broker.start()
    smtp.start()
    try:
        with local_postgres() as postgres:
            ensure_topic({"bootstrap_servers": [broker.bootstrap_servers]}, topic, 2)
            env = {
                "FRAUD_VAR_DIR": str(tmp_path / "var"),
                "FRAUD_MODELS_DIR": str(models),
                "FRAUD_KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
                "FRAUD_KAFKA_TOPIC": topic,
                "FRAUD_KAFKA_CONSUMER_GROUP": f"audit-group-{topic}",
                "FRAUD_KAFKA_CONNECT_TIMEOUT_SECONDS": "2",
                "FRAUD_DATABASE_URL": postgres.url(),
                "FRAUD_SMTP_HOST": "127.0.0.1",
                "FRAUD_SMTP_PORT": str(smtp.port),
                "FRAUD_ALERT_RECIPIENTS": "analysts@bank.example",
                "FRAUD_OPERATOR_RECIPIENTS": "operators@bank.example",
                "FRAUD_SENSOR_INTERVAL_SECONDS": "1",
                "FRAUD_MAX_BATCH_SIZE": "40",
                "FRAUD_ALERT_RETRY_INTERVAL_SECONDS": "2",
                "FRAUD_ALERT_RETRY_BASE_SECONDS": "1",
                "FRAUD_ALERT_RETRY_MAX_SECONDS": "4",
                "FRAUD_ALERT_PENDING_GRACE_SECONDS": "10",
            }
            for name, value in env.items():
                monkeypatch.setenv(name, value)
            settings = load_settings()
            database_url = postgres.url()
            stream = Stream(settings)

            def batch_runs() -> list[dg.DagsterRun]:
                return list(
                    instance.get_runs(filters=dg.RunsFilter(tags={"fraud_dagster/topic": topic}))
                )

            def settled(timeout_seconds: float = 240) -> None:
                wait_for(
                    lambda: (
                        sum(accounting(database_url, topic).values()) >= stream.sent
                        and not any(run.status in IN_FLIGHT_STATUSES for run in batch_runs())
                    ),
                    timeout_seconds,
                    f"all {stream.sent} messages stored",
                )

            daemons.append(start_daemon(dagster_home, env, tmp_path / "daemon-1.log"))

            stream.chunk(50, seed=101)  # 1. normal operation
            settled()

            smtp.stop()  # 2. SMTP down: data flows, alerts wait in the outbox
            stream.chunk(50, seed=102)
            settled()
            unsent = [
                r for r in table_rows(database_url, schema.fraud_alerts) if r["status"] != "sent"
            ]

            stream.chunk(30, seed=103)  # 3. broker down right after new messages...
            stopped_at = time.time()
            broker.stop()
            wait_for(  # ...until the Kafka sensor has found it unreachable
                lambda: any(
                    tick.status == TickStatus.SKIPPED
                    and "Kafka unavailable" in (tick.skip_reason or "")
                    for tick in sensor_ticks(instance, KAFKA_SENSOR_NAME, after=stopped_at)
                ),
                120,
                "a Kafka sensor tick skipped with the broker down",
            )
            broker.start()
            stream.chunk(30, seed=104)
            settled()

            smtp.start()  # 4. SMTP back: retry_alerts sends what waited

            before_outage = {run.run_id for run in batch_runs()}
            postgres.stop()  # 5. database down until a batch run has hit it
            stream.chunk(40, seed=105)

            def storage_errors() -> list[str]:
                return [
                    error
                    for run in batch_runs()
                    if run.run_id not in before_outage
                    for error in step_errors(instance, run.run_id)
                    if "StorageError" in error
                ]

            wait_for(storage_errors, 180, "a batch run's step failing on the database down")
            postgres.start()
            settled()

            tampered_at = time.time()
            for path in models.glob("*.joblib"):  # 6. model tampered: runs refuse to score
                data = bytearray(path.read_bytes())
                data[len(data) // 2] ^= 0xFF
                path.write_bytes(bytes(data))
            stream.chunk(40, seed=106)

            def retries_spent() -> bool:
                """Every batch since the tampering failed, and so did its last run retry."""
                runs = [
                    record.dagster_run
                    for record in batch_records(instance, topic)
                    if record.create_timestamp.timestamp() >= tampered_at
                ]
                originals = {run.run_id for run in runs if PARENT_RUN_ID_TAG not in run.tags}
                last_retries = {
                    run.tags[ROOT_RUN_ID_TAG]
                    for run in runs
                    if run.tags.get(RETRY_NUMBER_TAG) == "2"
                }
                return (
                    bool(originals)
                    and all(run.status == dg.DagsterRunStatus.FAILURE for run in runs)
                    and originals <= last_retries
                    and not any(run.status in IN_FLIGHT_STATUSES for run in batch_runs())
                )

            wait_for(retries_spent, 360, "runs refusing the tampered model, and their retries")
            tampered_failures = [
                run for run in batch_runs() if run.status == dg.DagsterRunStatus.FAILURE
            ]
            for path in models.glob("*.joblib"):  # the operator restores the model...
                shutil.copyfile(PROJECT_ROOT / "models" / path.name, path)
            rerun_unfinished_ranges(instance, batch_runs(), database_url, topic)  # ...and reruns
            settled()

            produced_at = time.time()
            stream.chunk(40, seed=107)  # 7. daemon killed with SIGKILL mid-stream: once a
            wait_for(  # tick has requested batches of the new messages
                lambda: any(
                    tick.run_keys
                    for tick in sensor_ticks(instance, KAFKA_SENSOR_NAME, after=produced_at)
                ),
                120,
                "a tick requesting batches of the new messages",
            )
            os.kill(daemons[0].pid, signal.SIGKILL)
            daemons[0].wait()
            under_way = [run.run_id for run in batch_runs() if not run.is_finished]
            assert under_way, "the daemon was killed with no batch under way"
            stream.chunk(30, seed=108)
            daemons.append(start_daemon(dagster_home, env, tmp_path / "daemon-2.log"))
            stream.chunk(30, seed=109)
            settled(300)
            rerun_unfinished_ranges(instance, batch_runs(), database_url, topic)

            # The audit.
            counts = accounting(database_url, topic)
            _, end = offset_bounds({"bootstrap_servers": [broker.bootstrap_servers]}, topic)
            assert sum(end.values()) == stream.sent
            produced = {(p, o) for p, last in end.items() for o in range(last)}
            assert set(counts) == produced, "a message is missing from both tables"
            assert set(counts.values()) == {1}, "a message is stored twice"
            rejected = table_rows(database_url, schema.rejected_transactions)
            assert sum(1 for r in rejected if r["reason"].startswith("duplicate")) >= 10

            suspicious = {
                r["transaction_id"]
                for r in table_rows(database_url, schema.suspicious_transactions)
            }
            assert suspicious, "the stream must produce alerts"
            assert unsent, "SMTP was down: some alerts had to wait in the outbox"

            def unsent_alerts() -> list[dict]:
                shown = ("transaction_id", "status", "claimed_by", "claimed_at", "last_error")
                return [
                    {column: r[column] for column in shown}
                    for r in table_rows(database_url, schema.fraud_alerts)
                    if r["status"] != "sent"
                ]

            wait_for(
                lambda: not unsent_alerts(),
                120,
                "every alert sent once SMTP is back",
                lambda: f"unsent alerts {unsent_alerts()}, runs {run_statuses(batch_runs())}",
            )
            alerts = [m for m in mailbox.messages() if m["X-Fraud-Transaction-Id"]]
            assert emails_by_transaction(alerts) == dict.fromkeys(suspicious, 1)
            assert all(m["To"] == "analysts@bank.example" for m in alerts)

            operator_mail = [m for m in mailbox.messages() if m["X-Fraud-Run-Id"]]
            assert all(m["To"] == "operators@bank.example" for m in operator_mail)
            told = {m["X-Fraud-Run-Id"] for m in operator_mail}
            assert told & {run.run_id for run in tampered_failures}, "operators not told"
            assert any("SHA-256" in m.get_content() for m in operator_mail)

            admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap_servers)
            try:
                group = settings.kafka_consumer_group
                committed = admin.list_group_offsets(group)[group]
            finally:
                admin.close()
            assert {tp.partition: meta.offset for tp, meta in committed.items()} == end
    finally:
        for daemon in daemons:
            stop_dagster_process(daemon)
            kill_group(daemon)
        smtp.stop()
        broker.stop()


def run_statuses(runs: list[dg.DagsterRun]) -> dict[str, str]:
    return {run.run_id: run.status.value for run in runs}


def rerun_unfinished_ranges(
    instance: dg.DagsterInstance, runs: list[dg.DagsterRun], database_url: str, topic: str
) -> None:
    """What the operator does after fixing a cause: re-execute, from failure, each offset range
    whose runs all failed (the newest attempt), through Dagster's re-execution."""
    by_range: dict[str, list[dg.DagsterRun]] = {}
    for run in runs:
        key = f"{run.tags['fraud_dagster/partition']}/{run.tags['fraud_dagster/offset_range']}"
        by_range.setdefault(key, []).append(run)
    for attempts in by_range.values():
        if any(
            run.status == dg.DagsterRunStatus.SUCCESS or run.status in IN_FLIGHT_STATUSES
            for run in attempts
        ):
            continue
        newest = max(
            attempts, key=lambda run: instance.get_run_record_by_id(run.run_id).create_timestamp
        )
        assert reexecute(instance, newest.run_id, from_failure=True).success
