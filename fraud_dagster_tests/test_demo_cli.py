"""`fraud-dagster demo` stopped by Ctrl-C, `kill` (SIGTERM) or a closed terminal (SIGHUP): the
broker, the SMTP server and `dagster dev` it started stop with it, so the next demo finds its
ports free.

The demo's broker and SMTP server use fixed ports (9092/9093, 8025); the test skips when they
are taken (a demo of your own running), and fails instead under CI (`require`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from fraud_dagster.errors import LocalServiceError
from fraud_dagster.local_services.process import free_port, port_is_open, wait_until
from fraud_dagster.settings import PROJECT_ROOT
from fraud_dagster_tests.operations_support import require

pytestmark = [pytest.mark.slow, pytest.mark.backends()]

DEMO_SERVICE_PORTS = (9092, 9093, 8025)


def processes_of(var_dir: Path) -> list[psutil.Process]:
    """Every process started for the demo with `var_dir`: they inherit its FRAUD_VAR_DIR."""
    found = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if process.environ().get("FRAUD_VAR_DIR") == str(var_dir):
                found.append(process)
    return found


# Runs argv[1:] in this same process (same pid) with SIGINT ignored, which exec keeps.
WITH_SIGINT_IGNORED = [
    sys.executable,
    "-c",
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
    "os.execv(sys.argv[1], sys.argv[1:])",
]


def kill_all(processes: list[psutil.Process]) -> None:
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.kill()


# SIGINT is Ctrl-C: the terminal sends it to the demo's process group, which is the demo alone
# (its services and `dagster dev` run in sessions of their own). The demo starts with SIGINT
# ignored, as under a script's `fraud-dagster demo &` (a non-interactive shell's background job):
# `kill -INT` must stop it all the same, whoever started the test run and how.
@pytest.mark.parametrize(
    "signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["SIGINT", "SIGTERM", "SIGHUP"]
)
def test_a_demo_stopped_by_a_signal_stops_everything_it_started(
    signum: signal.Signals, tmp_path: Path
) -> None:
    busy = [port for port in DEMO_SERVICE_PORTS if port_is_open("127.0.0.1", port)]
    require(not busy, f"ports {busy} are taken (a demo running?); the demo's services need them")
    var_dir = tmp_path / "var"
    ui_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FRAUD_", "DAGSTER_"))}
    env["FRAUD_VAR_DIR"] = str(var_dir)
    command = [str(Path(sys.executable).with_name("fraud-dagster")), "demo", "--count", "20"]
    with (tmp_path / "demo.log").open("wb") as log:
        demo = subprocess.Popen(
            [*WITH_SIGINT_IGNORED, *command, "--partitions", "1", "--dagster-port", str(ui_port)],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until(lambda: port_is_open("127.0.0.1", ui_port), 240, "the demo's Dagster UI")
        started = {" ".join(p.cmdline()) for p in processes_of(var_dir)}
        for part in ("kafka.Kafka", "local_services.smtp", "dagster dev", "dagster_webserver"):
            assert any(part in line for line in started), f"no {part} among {started}"
        # `dagster dev` warns about a dagster.yaml in its working directory other than
        # DAGSTER_HOME's before it starts the UI; the demo's copy is the one in effect.
        printed = (tmp_path / "demo.log").read_text(errors="replace")
        assert "will not be used to configure Dagster" not in printed, printed

        demo.send_signal(signum)

        assert demo.wait(timeout=120) == 0
        with contextlib.suppress(LocalServiceError):
            wait_until(lambda: not processes_of(var_dir), 60, "the demo's processes to exit")
        leftovers = [" ".join(p.cmdline())[:160] for p in processes_of(var_dir)]
        assert leftovers == [], "the demo left these running"
        for port in (*DEMO_SERVICE_PORTS, ui_port):
            assert not port_is_open("127.0.0.1", port), f"port {port} still open"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(demo.pid, signal.SIGKILL)
        kill_all(processes_of(var_dir))
