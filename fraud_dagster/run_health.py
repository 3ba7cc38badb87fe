"""Runs whose worker process died together with the server that launched it.

With the DefaultRunLauncher each run executes in a process spawned by the code location server.
If only that process dies (out of memory, `kill -9`), the server notices within a second and
marks the run failed; Dagster retries it (`run_retries`) and the failure sensor emails the
operators. If the server dies with it (the machine, or the whole `dagster dev`, killed), nobody
is left to notice: the run stays STARTED for ever, holds one of the queue's run slots and its
partition's tag slot, its offset range is never stored, and each later batch of its partition
waits the full `max_wait_seconds` for it. Dagster's own run monitoring cannot tell either: the
DefaultRunLauncher has no worker health check (dagster.yaml enables run monitoring for what it
can see: a run stuck STARTING).

A dead worker is recognized from the instance and the process table alone: the run worker's
first engine event records its pid. A run still STARTED whose pid no longer exists, or now
belongs to a process created after that event (pid reuse, reboot), will never finish.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import psutil

# A process's creation time (from /proc, rounded) and an event's timestamp are separate clock
# readings; only a process created more than this after the event is not the one that wrote it.
CREATION_TOLERANCE_SECONDS = 2.0
# The first engine events of a run include the worker's "Started process for run (pid: …)".
ENGINE_EVENTS_TO_READ = 20


@dataclass(frozen=True)
class RunWorker:
    """The process a run reported executing it, and when it reported it (epoch seconds)."""

    run_id: str
    pid: int
    reported_at: float


def run_worker(instance: dg.DagsterInstance, run_id: str) -> RunWorker | None:
    """The run's worker process: the first engine event of the run that carries a pid.

    A run executed in process inside another program (a test's `execute_job`) reports that
    program's pid. None for a run with no such event (a run record never executed): nothing to
    check.
    """
    records = instance.get_records_for_run(
        run_id, of_type=dg.DagsterEventType.ENGINE_EVENT, limit=ENGINE_EVENTS_TO_READ
    ).records
    for record in records:
        event = record.event_log_entry.dagster_event
        data = event.event_specific_data if event is not None else None
        metadata = getattr(data, "metadata", None) or {}
        if "pid" in metadata:
            return RunWorker(run_id, int(metadata["pid"].value), record.event_log_entry.timestamp)
    return None


# The run worker's own record of itself, `<pid>@<start in clock ticks since boot>`, written by its
# first steps (`record_worker_start`). The wall-clock test below compares a process's creation
# with an event's timestamp: a clock stepped forward (NTP, a VM resumed) moves every process's
# wall-clock creation time with it, and live workers looked dead. Ticks since boot do not move.
WORKER_START_TAG = "fraud_dagster/worker_start"
_tagged_runs: set[str] = set()  # runs this process has tagged (one write per run and worker)


def worker_start() -> str:
    """This process as `WORKER_START_TAG` records it."""
    return f"{os.getpid()}@{_start_ticks(os.getpid())}"


def _start_ticks(pid: int) -> int:
    """When the process started, in clock ticks since boot (`starttime`, field 22 of
    /proc/<pid>/stat: fixed for the process's life, whatever the wall clock does)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[19])  # fields after "(comm)" start at 3


def record_worker_start(context: dg.OpExecutionContext) -> None:
    """Tag the run with the worker executing it (once per run in this process; a re-execution's
    worker tags its own run)."""
    if context.run_id not in _tagged_runs:
        context.instance.add_run_tags(context.run_id, {WORKER_START_TAG: worker_start()})
        _tagged_runs.add(context.run_id)


def _recorded_start(pid: int, recorded: str | None) -> int | None:
    """The start (ticks since boot) the worker recorded, if the record is this pid's."""
    recorded_pid, _, started = (recorded or "").partition("@")
    try:
        return int(started) if recorded_pid == str(pid) else None
    except ValueError:
        return None


def process_is_alive(pid: int, created_by: float, recorded: str | None = None) -> bool:
    """Whether a live process with `pid` exists that is the run's worker; a zombie (exited, not
    yet reaped) is not alive. With the worker's own record (`recorded`, the run's
    WORKER_START_TAG) it must have started then (ticks since boot, immune to clock steps);
    without one, it must have been created by `created_by` (epoch seconds)."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        started = _recorded_start(pid, recorded)
        if started is not None:
            try:
                return _start_ticks(pid) == started
            except FileNotFoundError:  # it exited in between
                return False
        return process.create_time() <= created_by + CREATION_TOLERANCE_SECONDS
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True  # it exists; whose it is cannot be told, so it is not declared dead


def runs_with_dead_workers(
    instance: dg.DagsterInstance, job_names: Collection[str]
) -> list[RunWorker]:
    """STARTED runs of `job_names` whose worker process is gone (one runs query, then one
    event query per started run)."""
    started = instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED]))
    dead = []
    for run in started:
        if run.job_name not in job_names:
            continue
        worker = run_worker(instance, run.run_id)
        recorded = run.tags.get(WORKER_START_TAG)
        if worker is not None and not process_is_alive(worker.pid, worker.reported_at, recorded):
            dead.append(worker)
    return dead


def dead_worker_message(worker: RunWorker) -> str:
    """What the failed run's event log, the UI and the operators' email say."""
    return (
        f"The run's worker process (pid {worker.pid}) is gone and the run never finished: it "
        "died with the server that launched it (machine or `dagster dev` killed). Marked failed "
        "by the fail_runs_whose_worker_died sensor, so that Dagster retries it (run_retries) "
        "and nothing it had read is lost; its writes are idempotent."
    )
