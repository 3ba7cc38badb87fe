"""`fraud-dagster status`: what an operator at a terminal learns of the stream, read from the real
broker and application database after real batch runs (one of them left unrun, as a failed
batch is until it is rerun)."""

from __future__ import annotations

import os
import subprocess
import sys

import dagster as dg
import pytest

from fraud_dagster.batching import PlannedBatch
from fraud_dagster.definitions import build_definitions
from fraud_dagster.jobs import batch_run_config
from fraud_dagster.producer import synthetic_transactions
from fraud_dagster.resources import resolved_resources
from fraud_dagster.settings import Settings
from fraud_dagster.simulator import to_messages
from fraud_dagster.stream_status import render_status, stream_status
from fraud_dagster_tests.helpers import delete_before, produce

pytestmark = pytest.mark.services


def status_command(*arguments: str) -> subprocess.CompletedProcess:
    """The installed CLI, with this test's FRAUD_* environment."""
    return subprocess.run(
        [sys.executable, "-m", "fraud_dagster.cli", "status", *arguments],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        timeout=120,
        check=False,
    )


def test_status_names_the_gap_to_rerun_the_lost_offsets_and_what_waits(
    instance: dg.DagsterInstance, database_url: str, settings: Settings
) -> None:
    defs = build_definitions(settings)
    resources = resolved_resources(settings)
    job = defs.resolve_job_def("score_transactions")
    produce(settings, to_messages(synthetic_transactions(40, seed=5)))
    delete_before(settings, 5)  # retention took offsets 0..4 before any batch read them

    def run_range(first: int, last: int) -> None:
        batch = PlannedBatch(settings.kafka_topic, 0, first, last)
        assert job.execute_in_process(run_config=batch_run_config(batch), instance=instance).success

    run_range(0, 9)
    run_range(20, 29)  # 10..19 not run: as a failed batch before its rerun; 30..39 not yet

    def status():
        return stream_status(
            resources["kafka"].client_options(),
            settings.kafka_topic,
            settings.kafka_consumer_group,
            resources["database"].get_engine(),
        )

    (partition,) = status().partitions
    assert (partition.beginning, partition.end, partition.committed) == (5, 40, 10)
    assert (partition.lag, partition.stored_until, partition.stored_end) == (30, 10, 30)
    assert partition.gaps == [(10, 19)] and partition.lost == [(0, 4)]
    assert partition.waiting == 10
    shown = status_command("--check")
    assert shown.returncode == 2, shown.stderr
    assert "NOT STORED: offsets 10-19 (10)" in shown.stdout
    assert "fraud_dagster/first_offset=10" in shown.stdout
    assert "LOST: offsets 0-4 (5)" in shown.stdout
    assert "10 offset(s) after the last stored one" in shown.stdout

    run_range(10, 19)  # the rerun
    run_range(30, 39)

    after = status()
    (partition,) = after.partitions
    assert (partition.committed, partition.lag, partition.gaps, partition.waiting) == (40, 0, [], 0)
    assert partition.lost == [(0, 4)]  # lost stays lost, and on record
    assert not after.needs_attention
    assert not any("NOT STORED" in line for line in render_status(after))
    assert status_command("--check").returncode == 0
