"""Telling a dead run worker from a live one, and the sensor's two looks before it fails a run.

Real processes (this one, a child that exited, a zombie) and a real Dagster test instance; the
runs are written the way a run worker writes them (STARTED, then the engine event with its pid).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import dagster as dg
import psutil
import pytest
from dagster._core.events import EngineEventData

from fraud_dagster.definitions import defs
from fraud_dagster.run_health import (
    process_is_alive,
    run_worker,
    runs_with_dead_workers,
    worker_start,
)
from fraud_dagster.sensors import DEAD_WORKER_CONFIRM_SECONDS

JOB = "score_transactions"


@dg.op
def do_nothing() -> None:
    """Stands in for a job's work: only the run records matter here."""


def job_named(name: str) -> dg.JobDefinition:
    return dg.GraphDefinition(name=name, node_defs=[do_nothing]).to_job()


def exited_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_this_process_is_alive_and_an_exited_one_is_not() -> None:
    assert process_is_alive(os.getpid(), created_by=time.time())
    assert not process_is_alive(exited_pid(), created_by=time.time())


def test_a_process_created_after_the_report_is_not_the_reporting_worker() -> None:
    """The pid reused after the worker died (or after a reboot) belongs to someone else."""
    assert not process_is_alive(os.getpid(), created_by=0.0)


def test_the_workers_own_record_decides_whatever_the_wall_clock_says() -> None:
    """A clock stepped forward moves every process's wall-clock creation time past the run's
    event: the live worker looked created after it, so dead, and its run was failed and its
    claimed alerts released while it still sent them. Its own record (start in seconds since
    boot, the run's WORKER_START_TAG) does not move."""
    ours = worker_start()
    assert ours.startswith(f"{os.getpid()}@")
    stepped = time.time() - 3600  # the event's timestamp, as read after a one-hour step
    assert not process_is_alive(os.getpid(), created_by=stepped)  # the wall-clock test alone
    assert process_is_alive(os.getpid(), created_by=stepped, recorded=ours)
    started = int(ours.partition("@")[2])
    reused = f"{os.getpid()}@{started + 5}"  # the pid, but another process's start
    assert not process_is_alive(os.getpid(), created_by=time.time(), recorded=reused)
    other_pid = f"{exited_pid()}@{started}"  # a record of another pid: the wall clock decides
    assert process_is_alive(os.getpid(), created_by=time.time(), recorded=other_pid)


def test_a_zombie_is_not_alive() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 10
    while process_is_alive(child.pid, created_by=time.time()):
        assert time.monotonic() < deadline, "the child never became a zombie"
        time.sleep(0.05)
    assert psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE  # exited, not reaped
    child.wait()


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as test_instance:
        yield test_instance


def started_run(instance: dg.DagsterInstance, pid: int | None, job: str = JOB) -> str:
    run = instance.create_run_for_job(job_named(job), status=dg.DagsterRunStatus.STARTED)
    if pid is not None:
        instance.report_engine_event(
            f"Started process for run (pid: {pid}).", run, EngineEventData.in_process(pid)
        )
    return run.run_id


def test_only_started_runs_of_the_given_jobs_whose_reported_worker_is_gone_are_dead(
    instance: dg.DagsterInstance,
) -> None:
    dead = started_run(instance, exited_pid())
    alive = started_run(instance, os.getpid())
    unreported = started_run(instance, None)  # executed inside another program
    other_job = started_run(instance, exited_pid(), job="train_model")

    assert run_worker(instance, alive).pid == os.getpid()
    assert run_worker(instance, unreported) is None
    found = runs_with_dead_workers(instance, {JOB})
    assert [worker.run_id for worker in found] == [dead]
    assert {w.run_id for w in runs_with_dead_workers(instance, {JOB, "train_model"})} == {
        dead,
        other_job,
    }


def tick(instance: dg.DagsterInstance, cursor: str | None) -> dg.SensorExecutionData:
    sensor = defs.resolve_sensor_def("fail_runs_whose_worker_died")
    with dg.build_sensor_context(instance=instance, cursor=cursor) as context:
        return sensor.evaluate_tick(context)


def test_the_sensor_fails_a_dead_run_only_when_a_later_tick_still_sees_it_dead(
    instance: dg.DagsterInstance,
) -> None:
    dead = started_run(instance, exited_pid())
    alive = started_run(instance, os.getpid())

    first = tick(instance, cursor=None)
    assert instance.get_run_by_id(dead).status == dg.DagsterRunStatus.STARTED
    assert set(json.loads(first.cursor)) == {dead}
    assert "confirming" in first.skip_message

    # The next tick, as soon as the confirmation time has passed.
    seen = {dead: time.time() - DEAD_WORKER_CONFIRM_SECONDS - 1}
    second = tick(instance, cursor=json.dumps(seen))
    assert instance.get_run_by_id(dead).status == dg.DagsterRunStatus.FAILURE
    assert instance.get_run_by_id(alive).status == dg.DagsterRunStatus.STARTED
    assert json.loads(second.cursor) == {}
    assert dead in second.skip_message
    (failure,) = instance.get_records_for_run(dead, of_type=dg.DagsterEventType.RUN_FAILURE).records
    assert "is gone" in failure.event_log_entry.dagster_event.message

    # Later ticks leave the failed run alone (Dagster's retry of it is a new run).
    tick(instance, cursor=json.dumps(seen))
    failures = instance.get_records_for_run(dead, of_type=dg.DagsterEventType.RUN_FAILURE)
    assert len(failures.records) == 1
