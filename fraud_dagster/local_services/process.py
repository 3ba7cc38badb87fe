"""Background processes of local services, tracked by pid file so `stop` stops only our own."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from fraud_dagster.errors import LocalServiceError

logger = logging.getLogger(__name__)


def port_is_open(host: str, port: int, timeout_seconds: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_seconds):
            return True
    except OSError:
        return False


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_until(
    check: Callable[[], bool], timeout_seconds: float, what: str, interval_seconds: float = 0.2
) -> None:
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval_seconds)
    raise LocalServiceError(f"{what} did not happen within {timeout_seconds:.0f}s")


class ManagedProcess:
    """A detached process whose pid lives in `pid_file`; it outlives the command that started it."""

    def __init__(self, name: str, pid_file: Path, marker: str) -> None:
        self.name = name
        self.pid_file = pid_file
        # One argument of the process's command line, exactly: a recycled pid is not mistaken
        # for ours (not even a process whose argument merely contains it, such as another data
        # directory that starts with ours, or a `tail -f` of our log).
        self.marker = marker

    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        try:
            arguments = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        except (OSError, UnicodeDecodeError):
            return None
        return pid if self.marker in arguments else None

    def is_running(self) -> bool:
        return self.pid() is not None

    def start(
        self,
        command: Sequence[str],
        log_file: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> int:
        if (pid := self.pid()) is not None:
            raise LocalServiceError(f"{self.name} is already running (pid {pid})")
        log_file.parent.mkdir(parents=True, exist_ok=True)
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        with log_file.open("ab") as log:
            process = subprocess.Popen(
                list(command),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
                cwd=cwd,
                start_new_session=True,
            )
        self.pid_file.write_text(str(process.pid))
        # Right after fork/exec, /proc/<pid>/cmdline can still be empty for a moment.
        wait_until(
            lambda: process.poll() is not None or self.pid() is not None,
            10,
            f"{self.name} process start",
            interval_seconds=0.01,
        )
        logger.info("started %s (pid %d), log in %s", self.name, process.pid, log_file)
        return process.pid

    def stop(self, timeout_seconds: float = 30.0) -> bool:
        """SIGTERM, then SIGKILL after `timeout_seconds`. False if it was not running."""
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        os.kill(pid, signal.SIGTERM)
        try:
            wait_until(lambda: not _alive(pid), timeout_seconds, f"{self.name} exit")
        except LocalServiceError:
            logger.warning("%s (pid %d) ignored SIGTERM; killing it", self.name, pid)
            os.kill(pid, signal.SIGKILL)
            wait_until(lambda: not _alive(pid), 10, f"{self.name} exit after SIGKILL")
        self.pid_file.unlink(missing_ok=True)
        logger.info("stopped %s (pid %d)", self.name, pid)
        return True


def _alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"
