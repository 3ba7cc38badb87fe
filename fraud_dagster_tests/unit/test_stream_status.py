"""How `fraud-dagster status` words a partition and the outbox (pure rendering; the figures from
a real broker and database are tested in test_stream_status)."""

from __future__ import annotations

from datetime import datetime

from fraud_dagster.storage.outbox import OutboxStatus
from fraud_dagster.stream_status import PartitionStatus, StreamStatus, render_status


def outbox(**counts: int) -> OutboxStatus:
    unsent_at = datetime(2026, 11, 30, 1, 2, 3) if set(counts) - {"sent"} else None
    return OutboxStatus(counts, counts.get("failed", 0), None, unsent_at, "421 try later")


def test_a_partition_nothing_was_committed_on_counts_its_lag_from_the_log_start() -> None:
    partition = PartitionStatus(
        0, beginning=100, end=130, committed=None, stored_until=100, stored_end=100
    )
    status = StreamStatus("tx", "g", [partition], outbox())

    lines = render_status(status)

    assert (partition.lag, partition.waiting) == (30, 30)
    assert lines[1] == "partition 0: log 100..129 (end 130), nothing committed, lag 30"
    assert "30 offset(s) after the last stored one" in lines[2]
    assert lines[-1] == "alerts: none; 0 due now"
    assert not status.needs_attention


def test_unsent_alerts_show_the_oldest_and_the_last_error() -> None:
    partition = PartitionStatus(1, 0, 50, 50, 50, 50, lost=[(0, 4), (10, 11)])
    status = StreamStatus("tx", "g", [partition], outbox(sent=7, failed=2, pending=1))

    lines = render_status(status)

    assert "LOST: offsets 0-4, 10-11 (7)" in lines[2]
    assert lines[3] == "alerts: 2 failed, 1 pending, 7 sent; 2 due now"
    assert (
        lines[4]
        == "  oldest unsent alert written 2026-11-30 01:02:03 UTC; last error: 421 try later"
    )
    assert not status.needs_attention  # lost offsets are reported, not a rerun to do
