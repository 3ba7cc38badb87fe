"""The pid file of a local service names our process only when the process has our marker as
one of its arguments, exactly."""

from __future__ import annotations

import sys
from pathlib import Path

import psutil

from fraud_dagster.local_services.process import ManagedProcess


def test_a_process_whose_argument_only_contains_the_marker_is_not_ours(tmp_path: Path) -> None:
    """Before, a broker of `var/kafka2` (or a `tail -f var/kafka/...`) passed as the broker of
    `var/kafka`, and `kafka stop` could signal it."""
    pid_file = tmp_path / "service.pid"
    ours = ManagedProcess("svc", pid_file, marker=f"--dir={tmp_path / 'kafka'}")
    sleeper = [sys.executable, "-c", "import time; time.sleep(30)"]
    other = ManagedProcess("svc", pid_file, marker=f"--dir={tmp_path / 'kafka2'}")
    pid = other.start([*sleeper, f"--dir={tmp_path / 'kafka2'}"], log_file=tmp_path / "svc.log")
    try:
        assert other.is_running()
        assert not ours.is_running()  # same pid file, an argument that merely starts with ours
        assert not ours.stop()  # and stop leaves it alone (it only drops the stale pid file)
        assert psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    finally:
        psutil.Process(pid).kill()
