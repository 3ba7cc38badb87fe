"""Claim tokens, and which claims their runs left behind.

Each send of a run gets its own token, and the run is read back from it. Which claims are
abandoned is asked of a real Dagster test instance (runs written the way a run worker writes
them: status, then the engine event with its pid), real processes and a real SQLite outbox.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa
from dagster._core.events import EngineEventData

from fraud_dagster.alert_claims import abandoned_claims, claim_token, claiming_run_id
from fraud_dagster.messages import ValidationLimits
from fraud_dagster.storage.database import create_engine, ensure_schema
from fraud_dagster.storage.outbox import claim_alerts
from fraud_dagster_tests.unit.stored_batches import batch, run
from fraud_dagster_tests.unit.test_run_health import exited_pid

RUN_ID = "0f9c2a52-4d1e-4a7b-9a51-3c1f7e2b8d10"


def test_each_send_of_a_run_has_its_own_token_naming_the_run() -> None:
    first, second = claim_token(RUN_ID), claim_token(RUN_ID)
    assert first != second
    assert claiming_run_id(first) == claiming_run_id(second) == RUN_ID


def test_tokens_of_senders_that_are_not_runs_name_no_run() -> None:
    assert claiming_run_id("bench") is None
    assert claiming_run_id(":a1b2c3d4") is None


@dg.op
def send_alerts() -> None:
    """Stands in for a sending run: only its run record and engine event matter here."""


@dg.job
def sending_job() -> None:
    send_alerts()


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as test_instance:
        yield test_instance


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[sa.Engine]:
    """Six alerts pending in a real SQLite outbox (the pipeline stored six suspicious rows)."""
    engine = create_engine(f"sqlite:///{tmp_path / 'app.db'}")
    ensure_schema(engine)
    run(batch([10.0, 20.0, 30.0, 40.0, 50.0, 60.0]), engine, ValidationLimits())
    yield engine
    engine.dispose()


@pytest.fixture
def live_process() -> Iterator[subprocess.Popen]:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield child
    child.kill()
    child.wait()


def run_holding_a_claim(
    instance: dg.DagsterInstance,
    engine: sa.Engine,
    status: dg.DagsterRunStatus,
    worker_pid: int | None,
) -> str:
    """A run in `status` that reported `worker_pid` as its worker and claimed one alert."""
    dagster_run = instance.create_run_for_job(sending_job, status=status)
    if worker_pid is not None:
        instance.report_engine_event(
            f"Started process for run (pid: {worker_pid}).",
            dagster_run,
            EngineEventData.in_process(worker_pid),
        )
    token = claim_token(dagster_run.run_id)
    (claimed,) = claim_alerts(engine, token, limit=1, pending_grace=timedelta(0))
    assert claimed
    return token


def test_only_runs_that_ended_and_whose_worker_is_gone_or_was_this_process_abandon_claims(
    instance: dg.DagsterInstance, outbox: sa.Engine, live_process: subprocess.Popen
) -> None:
    """A run canceled in the instance while its worker still runs (forced from the UI, or by
    run monitoring's cancel timeout) may still be sending: its claim is kept until the worker is
    gone. A run executed in this process has returned; one that reported no worker is taken at
    the instance's word; a run still under way keeps its claim."""
    ended, under_way = dg.DagsterRunStatus.CANCELED, dg.DagsterRunStatus.STARTED
    worker_gone = run_holding_a_claim(instance, outbox, ended, exited_pid())
    executed_here = run_holding_a_claim(instance, outbox, dg.DagsterRunStatus.SUCCESS, os.getpid())
    unreported = run_holding_a_claim(instance, outbox, dg.DagsterRunStatus.FAILURE, None)
    still_sending = run_holding_a_claim(instance, outbox, ended, live_process.pid)
    started = run_holding_a_claim(instance, outbox, under_way, exited_pid())
    claim_alerts(outbox, "bench", limit=1, pending_grace=timedelta(0))  # not a run's claim

    assert abandoned_claims(instance, outbox) == {worker_gone, executed_here, unreported}

    live_process.kill()
    live_process.wait()
    assert abandoned_claims(instance, outbox) == {
        worker_gone,
        executed_here,
        unreported,
        still_sending,
    }
    assert started not in abandoned_claims(instance, outbox)
