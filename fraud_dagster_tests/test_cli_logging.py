"""What the `fraud-dagster` command prints when a service is down: one line of its own, with the
client library's connection attempts kept in the log file (a closed port on 127.0.0.1, so no
broker is involved)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from fraud_dagster.local_services.process import free_port


def status_with_broker_down(var_dir: Path, *options: str) -> subprocess.CompletedProcess:
    """`fraud-dagster [options] status` pointed at a port where nothing listens."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FRAUD_", "DAGSTER_"))}
    env |= {
        "FRAUD_VAR_DIR": str(var_dir),
        "FRAUD_KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",
        "FRAUD_DATABASE_URL": f"sqlite:///{var_dir / 'fraud.db'}",
    }
    return subprocess.run(
        [sys.executable, "-m", "fraud_dagster.cli", *options, "status"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def test_a_broker_that_is_down_gets_one_line_on_the_terminal_and_the_details_in_the_log(
    tmp_path: Path,
) -> None:
    shown = status_with_broker_down(tmp_path)
    assert shown.returncode == 1
    lines = shown.stderr.strip().splitlines()
    assert len(lines) == 1, shown.stderr
    (line,) = lines
    log_file = tmp_path / "log" / "fraud-dagster.log"
    assert "cannot reach Kafka at ['127.0.0.1:" in line
    assert f"the client's own messages: {log_file}" in line
    logged = log_file.read_text()
    assert "ERROR kafka." in logged and "ECONNREFUSED" in logged  # kept for whoever digs


def test_at_debug_the_terminal_shows_the_clients_messages_too(tmp_path: Path) -> None:
    shown = status_with_broker_down(tmp_path, "--log-level", "DEBUG")
    assert shown.returncode == 1
    assert "ERROR kafka." in shown.stderr and "cannot reach Kafka" in shown.stderr


def test_smtp_start_on_a_port_another_process_holds_says_so(tmp_path: Path) -> None:
    """Before: the server failed to bind and exited, but the command reported it started (the
    other process answered on the port), and alerts went to that other process."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FRAUD_", "DAGSTER_"))}
        env["FRAUD_VAR_DIR"] = str(tmp_path)
        shown = subprocess.run(
            [sys.executable, "-m", "fraud_dagster.cli", "smtp", "start", "--port", str(port)],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )
    assert shown.returncode == 1, shown.stdout
    assert f"port {port} on 127.0.0.1 is taken by another process" in shown.stderr
    assert "SMTP server on" not in shown.stdout
