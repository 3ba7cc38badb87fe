"""The real dagster-daemon: the sensor launches batch runs by itself and they succeed."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from fraud_dagster.batching import TAG_TOPIC
from fraud_dagster.producer import synthetic_transactions
from fraud_dagster.settings import PROJECT_ROOT, Settings
from fraud_dagster.simulator import to_messages
from fraud_dagster.storage import schema
from fraud_dagster_tests.helpers import produce, table_rows

pytestmark = [pytest.mark.services, pytest.mark.slow]


def start_daemon(dagster_home: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    daemon = Path(sys.executable).with_name("dagster-daemon")
    return subprocess.Popen(
        [str(daemon), "run", "-w", str(PROJECT_ROOT / "workspace.yaml")],
        cwd=PROJECT_ROOT,
        env={**os.environ, **env, "DAGSTER_HOME": str(dagster_home)},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop(process: subprocess.Popen) -> None:
    """Stop the daemon, then whatever it started that outlived it (its code location server
    has been seen to survive the daemon's SIGTERM); they share its process group."""
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def wait_for_runs(
    instance: dg.DagsterInstance, topic: str, count: int, timeout_seconds: float
) -> list[dg.DagsterRun]:
    deadline = time.monotonic() + timeout_seconds
    finished = {
        dg.DagsterRunStatus.SUCCESS,
        dg.DagsterRunStatus.FAILURE,
        dg.DagsterRunStatus.CANCELED,
    }
    runs: list[dg.DagsterRun] = []
    while time.monotonic() < deadline:
        runs = list(instance.get_runs(filters=dg.RunsFilter(tags={TAG_TOPIC: topic})))
        if len(runs) >= count and all(run.status in finished for run in runs):
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
    daemon = start_daemon(dagster_home, env, tmp_path / "daemon.log")
    try:
        runs = wait_for_runs(instance, settings.kafka_topic, count=1, timeout_seconds=180)
    finally:
        stop(daemon)
    log = (tmp_path / "daemon.log").read_text(errors="replace")
    assert len(runs) == 1, f"expected one batch run, got {len(runs)}; daemon log:\n{log[-3000:]}"
    (run,) = runs
    assert run.status == dg.DagsterRunStatus.SUCCESS, log[-3000:]
    assert run.tags["dagster/run_key"] == f"{settings.kafka_topic}/0/0-{len(messages) - 1}"
    assert run.tags["dagster/sensor_name"] == "kafka_transactions_sensor"
    stored = {row["transaction_id"] for row in table_rows(database_url, schema.scored_transactions)}
    assert stored == {m["transaction_id"] for m in messages}
