"""Shared set-up of the benchmarks: local services on free ports, a filled topic, a settings object.

Every benchmark talks only to 127.0.0.1, starts what it needs in a temporary directory and stops
it afterwards, so a benchmark run leaves nothing behind.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
from dagster._core.scheduler.instigation import InstigatorType

from fraud_dagster import producer
from fraud_dagster.kafka_io import ensure_topic
from fraud_dagster.local_services import smtp
from fraud_dagster.local_services.kafka import LocalKafka
from fraud_dagster.local_services.process import free_port
from fraud_dagster.sensors import KAFKA_SENSOR_NAME
from fraud_dagster.settings import PROJECT_ROOT, Settings, load_settings
from fraud_dagster.simulator import to_messages


@dataclass
class Services:
    work_dir: Path
    bootstrap_servers: str
    smtp_port: int
    mail_dir: Path

    def env(self, topic: str, database_url: str, **extra: str) -> dict[str, str]:
        """The pipeline's settings for these services. Other FRAUD_* variables of the
        benchmark's own environment pass through, so a setting can be compared by running a
        benchmark twice (e.g. FRAUD_SMTP_MAX_SESSIONS=1), and FRAUD_MODELS_DIR picks another
        model directory (e.g. one written by `fraud-dagster train --kind logistic --default`)."""
        return {
            **{name: value for name, value in os.environ.items() if name.startswith("FRAUD_")},
            "FRAUD_VAR_DIR": str(self.work_dir / "var"),
            "FRAUD_MODELS_DIR": os.environ.get("FRAUD_MODELS_DIR", str(PROJECT_ROOT / "models")),
            "FRAUD_KAFKA_BOOTSTRAP_SERVERS": self.bootstrap_servers,
            "FRAUD_KAFKA_TOPIC": topic,
            "FRAUD_KAFKA_CONSUMER_GROUP": f"bench-{topic}",
            "FRAUD_DATABASE_URL": database_url,
            "FRAUD_SMTP_HOST": "127.0.0.1",
            "FRAUD_SMTP_PORT": str(self.smtp_port),
            **extra,
        }

    def settings(self, topic: str, database_url: str, **extra: str) -> Settings:
        return load_settings(self.env(topic, database_url, **extra))

    def sqlite_url(self, name: str) -> str:
        return f"sqlite:///{self.work_dir / (name + '.db')}"

    def kafka_options(self) -> dict:
        return {"bootstrap_servers": [self.bootstrap_servers]}


@contextmanager
def local_services(keep: bool = False) -> Iterator[Services]:
    """A Kafka broker and an SMTP server (separate processes) on free ports in a temp dir."""
    work_dir = Path(tempfile.mkdtemp(prefix="fraud-bench-"))
    broker = LocalKafka(
        data_dir=work_dir / "kafka", port=free_port(), controller_port=free_port(), heap="1g"
    )
    mail_dir = work_dir / "mail"
    smtp_port = free_port()
    broker.start()
    try:
        smtp.start_background(work_dir, mail_dir, port=smtp_port)
        try:
            yield Services(work_dir, broker.bootstrap_servers, smtp_port, mail_dir)
        finally:
            smtp.background_process(work_dir).stop()
    finally:
        broker.stop()
        if not keep:
            shutil.rmtree(work_dir, ignore_errors=True)


def fill_topic(
    services: Services, topic: str, count: int, seed: int = 0, partitions: int = 1
) -> int:
    """Create `topic` and send `count` simulated transactions (some fraudulent) to it."""
    ensure_topic(services.kafka_options(), topic, partitions)
    messages = to_messages(producer.synthetic_transactions(count, seed=seed))
    return producer.produce(services.kafka_options(), topic, messages, show_progress=False).sent


def add_cards_option(parser: argparse.ArgumentParser) -> None:
    """`--cards`, for benchmarks that send the synthetic stream (`producer.spread_over_cards`)."""
    parser.add_argument(
        "--cards",
        type=int,
        default=0,
        help="spread the simulator's 500 customers over this many card numbers (0: one each)",
    )


def machine_description() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = subprocess.run(["nproc"], capture_output=True, text=True, check=False).stdout.strip()
    memory_kib = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory_kib = int(line.split()[1])
    except OSError:
        pass
    return (
        f"{cpu}, {cores} cores, {memory_kib / 1024 / 1024:.0f} GiB RAM, "
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}"
    )


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Stopwatch:
    """Named wall-clock timings, in order."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextmanager
    def time(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = time.perf_counter() - started


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    """p50, p95, p99, max and mean of `values` (all None when there are none)."""
    if not values:
        return dict.fromkeys(("p50", "p95", "p99", "max", "mean"))
    array = np.asarray(values, dtype=float)
    return {
        "p50": float(np.percentile(array, 50)),
        "p95": float(np.percentile(array, 95)),
        "p99": float(np.percentile(array, 99)),
        "max": float(array.max()),
        "mean": float(array.mean()),
    }


def sensor_ticks(
    instance: dg.DagsterInstance, name: str = KAFKA_SENSOR_NAME, after: float | None = None
) -> list:
    """The ticks of sensor `name` (those started after `after`, epoch seconds), oldest first."""
    for state in instance.all_instigator_state(instigator_type=InstigatorType.SENSOR):
        if state.name == name:
            ticks = instance.get_ticks(
                state.instigator_origin_id, state.selector_id, after=after, limit=100_000
            )
            return sorted(ticks, key=lambda tick: tick.timestamp)
    return []


def kafka_sensor_ticks(instance: dg.DagsterInstance, after: float | None = None) -> list:
    """The Kafka sensor's ticks (those after `after`, if given), oldest first."""
    return sensor_ticks(instance, KAFKA_SENSOR_NAME, after)


def run_child(command: Sequence[str], what: str, **popen_options: Any) -> dict:
    """Run a measurement in a fresh Python process; its last stdout line is its JSON result."""
    result = subprocess.run(command, capture_output=True, text=True, check=False, **popen_options)
    if result.returncode != 0:
        raise SystemExit(f"{what} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def emit_json(path: Path | None, payload: dict) -> None:
    if path is not None:
        path.write_text(json.dumps(payload, indent=2))
