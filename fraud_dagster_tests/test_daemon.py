"""The real dagster-daemon: the sensor launches batch runs by itself and they succeed."""

from __future__ import annotations

import time
from pathlib import Path

import dagster as dg
import pytest

from fraud_dagster.batching import TAG_TOPIC
from fraud_dagster.local_services.dagster_processes import running_daemon
from fraud_dagster.producer import synthetic_transactions
from fraud_dagster.settings import Settings
from fraud_dagster.simulator import to_messages
from fraud_dagster.storage import schema
from fraud_dagster_tests.helpers import produce, table_rows

pytestmark = [pytest.mark.services, pytest.mark.slow]


def wait_for_runs(
    instance: dg.DagsterInstance, topic: str, count: int, timeout_seconds: float
) -> list[dg.DagsterRun]:
    deadline = time.monotonic() + timeout_seconds
    runs: list[dg.DagsterRun] = []
    while time.monotonic() < deadline:
        runs = list(instance.get_runs(filters=dg.RunsFilter(tags={TAG_TOPIC: topic})))
        if len(runs) >= count and all(run.is_finished for run in runs):
            return runs
        time.sleep(1)
    return runs


def test_daemon_sensor_launches_a_successful_batch_run(
    settings: Settings,
    env: dict[str, str],
    dagster_home: Path,
    instance: dg.DagsterInstance,
    database_url: str,
    mailbox,
    tmp_path: Path,
) -> None:
    messages = to_messages(synthetic_transactions(50, seed=3))
    produce(settings, messages)
    with running_daemon(dagster_home, env, tmp_path / "daemon.log"):
        runs = wait_for_runs(instance, settings.kafka_topic, count=1, timeout_seconds=180)
    log = (tmp_path / "daemon.log").read_text(errors="replace")
    assert len(runs) == 1, f"expected one batch run, got {len(runs)}; daemon log:\n{log[-3000:]}"
    (run,) = runs
    assert run.status == dg.DagsterRunStatus.SUCCESS, log[-3000:]
    assert run.tags["dagster/run_key"] == f"{settings.kafka_topic}/0/0-{len(messages) - 1}"
    assert run.tags["dagster/sensor_name"] == "kafka_transactions_sensor"
    stored = {row["transaction_id"] for row in table_rows(database_url, schema.scored_transactions)}
    assert stored == {m["transaction_id"] for m in messages}
