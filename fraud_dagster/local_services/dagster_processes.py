"""Dagster's own processes (`dagster-daemon`, `dagster-webserver`, `dagster dev`) as children
on a given DAGSTER_HOME, for tests and benchmarks.

They run the sensors, schedules, run queue and UI exactly as a deployment does; everything that
claims to go through them starts and stops them here, the same way: in their own process group,
output appended to a log file, and stopped with whatever they started.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from fraud_dagster.settings import PROJECT_ROOT

DEFAULT_WORKSPACE = PROJECT_ROOT / "workspace.yaml"


def _start(
    argv: Sequence[str], dagster_home: Path, env: Mapping[str, str], log: Path
) -> subprocess.Popen:
    program = Path(sys.executable).with_name(argv[0])
    with log.open("ab") as output:
        return subprocess.Popen(
            [str(program), *argv[1:]],
            cwd=PROJECT_ROOT,
            env={**os.environ, **env, "DAGSTER_HOME": str(dagster_home)},
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def start_daemon(
    dagster_home: Path, env: Mapping[str, str], log: Path, workspace: Path = DEFAULT_WORKSPACE
) -> subprocess.Popen:
    """`dagster-daemon run`: sensors, schedules, the run queue, run retries."""
    return _start(["dagster-daemon", "run", "-w", str(workspace)], dagster_home, env, log)


def start_webserver(
    dagster_home: Path, env: Mapping[str, str], log: Path, port: int, *, with_daemon: bool = False
) -> subprocess.Popen:
    """`dagster-webserver` on 127.0.0.1:`port`, or `dagster dev` (webserver and daemon)."""
    serve = ["-w", str(DEFAULT_WORKSPACE), "-h", "127.0.0.1", "-p", str(port)]
    argv = ["dagster", "dev", *serve] if with_daemon else ["dagster-webserver", *serve]
    return _start(argv, dagster_home, env, log)


def stop_dagster_process(process: subprocess.Popen, timeout_seconds: float = 60) -> None:
    """Stop the process, then whatever it started that outlived it (the daemon's code location
    server has been seen to survive its SIGTERM); they share its process group."""
    process.terminate()  # the leader shuts down its own children gracefully
    try:
        process.wait(timeout=timeout_seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


@contextmanager
def running_daemon(
    dagster_home: Path, env: Mapping[str, str], log: Path, workspace: Path = DEFAULT_WORKSPACE
) -> Iterator[subprocess.Popen]:
    """`start_daemon` for the length of a `with` block, stopped however the block ends."""
    process = start_daemon(dagster_home, env, log, workspace)
    try:
        yield process
    finally:
        stop_dagster_process(process)
