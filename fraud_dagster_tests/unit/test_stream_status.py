"""How `fraud-dagster status` words a partition and the outbox (pure rendering; the figures from
a real broker and database are tested in test_stream_status)."""

from __future__ import annotations

from datetime import datetime, timedelta

from fraud_dagster.kafka_io import Retention, fill_rate
from fraud_dagster.storage.outbox import OutboxStatus
from fraud_dagster.stream_status import Gap, PartitionStatus, StreamStatus, render_status


def outbox(failed_at: datetime | None = None, **counts: int) -> OutboxStatus:
    unsent_at = datetime(2026, 11, 30, 1, 2, 3) if set(counts) - {"sent"} else None
    return OutboxStatus(
        counts, counts.get("failed", 0), None, unsent_at, "421 try later", failed_at
    )


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


def test_unsent_alerts_show_the_oldest_and_the_last_error_with_its_time() -> None:
    partition = PartitionStatus(1, 0, 50, 50, 50, 50, lost=[(0, 4), (10, 11)])
    failed_at = datetime(2026, 11, 30, 1, 5, 9)
    status = StreamStatus("tx", "g", [partition], outbox(failed_at, sent=7, failed=2, pending=1))

    lines = render_status(status)

    assert "LOST: offsets 0-4, 10-11 (7)" in lines[2]
    assert lines[3] == "alerts: 2 failed, 1 pending, 7 sent; 2 due now"
    assert lines[4] == (
        "  oldest unsent alert written 2026-11-30 01:02:03 UTC; "
        "last error at 2026-11-30 01:05:09 UTC: 421 try later"
    )
    assert not status.needs_attention  # lost offsets are reported, not a rerun to do


def test_a_failure_stored_before_its_time_was_recorded_shows_the_error_alone() -> None:
    status = StreamStatus("tx", "g", [], outbox(None, failed=1))

    assert render_status(status)[-1].endswith("UTC; last error: 421 try later")


def test_a_gap_says_when_retention_may_delete_it_or_that_it_already_did() -> None:
    produced = datetime(2026, 11, 30, 2, 47)
    week = 7 * 86_400_000
    gaps = [
        Gap(10, 19, 0, produced, produced + timedelta(milliseconds=week)),
        Gap(30, 39, 5, produced, produced + timedelta(milliseconds=week)),
        Gap(50, 59, 10),
    ]
    partition = PartitionStatus(0, 35, 100, 10, 10, 100, gaps=gaps)
    status = StreamStatus("tx", "g", [partition], outbox(), Retention(week))

    lines = render_status(status)

    assert lines[2].startswith("  NOT STORED: offsets 10-19 (10), below stored ones")
    assert lines[2].endswith(
        "oldest message produced 2026-11-30 02:47 UTC: retention (7 days) may delete it from "
        "2026-12-07 02:47 UTC on"
    )
    assert "its first 5 offset(s) were deleted by retention already" in lines[3]
    assert lines[4].startswith("  NOT STORED, and deleted by retention since: offsets 50-59 (10)")
    assert "fraud_dagster/first_offset=50" in lines[4]
    assert status.needs_attention


def test_a_gap_of_a_topic_kept_for_ever_has_no_deadline() -> None:
    partition = PartitionStatus(0, 0, 30, 10, 10, 30, gaps=[Gap(10, 19, 0, datetime(2026, 1, 1))])
    status = StreamStatus("tx", "g", [partition], outbox(), Retention(-1))

    assert render_status(status)[2].endswith(
        "the topic keeps its messages for ever (retention.ms -1)"
    )


def test_a_size_limit_is_named_beside_the_age_deadline_or_alone() -> None:
    produced = datetime(2026, 11, 30, 2, 47)
    week = 7 * 86_400_000
    limit = 2 * 1024**3
    gaps = [Gap(10, 19, 0, produced, produced + timedelta(milliseconds=week))]
    partitions = [
        PartitionStatus(0, 0, 100, 10, 10, 100, gaps=gaps),
        PartitionStatus(1, 0, 100, 10, 10, 100, gaps=[Gap(10, 19, 0, produced)]),
    ]
    sizes = {0: 1536 * 1024**2}  # partition 1's size the broker did not say
    both = StreamStatus("tx", "g", partitions[:1], outbox(), Retention(week, limit, sizes))
    bytes_only = StreamStatus("tx", "g", partitions[1:], outbox(), Retention(-1, limit, sizes))

    assert render_status(both)[2].endswith(
        "retention (7 days) may delete it from 2026-12-07 02:47 UTC on; retention.bytes limits "
        "the partition to 2.0 GiB (1.5 GiB now, 75% of it): past that, retention deletes its "
        "oldest segments whatever their age"
    )
    assert render_status(bytes_only)[2].endswith(
        "; no age limit (retention.ms -1); retention.bytes limits the partition to 2.0 GiB "
        "(its size unknown): past that, retention deletes its oldest segments whatever their age"
    )


def test_a_partitions_fill_rate_is_the_faster_of_its_retained_mean_and_its_last_hour() -> None:
    gib, day = 1024**3, timedelta(days=1)
    # 1 GiB in 1,000,000 messages over two days: 6,213 bytes a second on average...
    steady = fill_rate(gib, 1_000_000, 2 * day, recent_messages=20_000)
    # ...and the same partition after a burst: 100,000 of them in the last hour.
    burst = fill_rate(gib, 1_000_000, 2 * day, recent_messages=100_000)
    quiet = fill_rate(gib, 1_000_000, 2 * day, recent_messages=0)

    assert steady == gib / (2 * day).total_seconds()
    assert burst == gib / 10 / 3600 and quiet == steady
    assert fill_rate(gib, 1_000, timedelta(0), recent_messages=1_000) == gib / 3600
    assert fill_rate(0, 0, day, 0) is None and fill_rate(gib, 10, timedelta(0), 0) is None

    # At the average rate, a 4 GiB limit holds eight days of messages; at the burst's, 40 hours.
    limit = 4 * gib
    assert Retention(-1, limit, {0: gib}, {0: steady}).size_limit_age(0) == 8 * day
    assert Retention(-1, limit, {0: gib}, {0: burst}).size_limit_age(0) == timedelta(hours=40)
    assert Retention(-1, -1, {}, {0: burst}).size_limit_age(0) is None  # no size limit
    assert Retention(-1, limit, {0: gib}).size_limit_age(0) is None  # no rate known
    assert Retention(-1, limit, {0: 1}, {0: 1e-3}).size_limit_age(0) is None  # past ten years


def test_a_range_the_size_limit_may_reach_says_when_at_the_partitions_rate() -> None:
    produced = datetime(2026, 11, 30, 2, 47)
    limit, size, rate = 2 * 1024**3, 512 * 1024**2, 120 * 1024**2 / 3600
    retention = Retention(-1, limit, {0: size}, {0: rate})
    age = retention.size_limit_age(0)
    assert age is not None and round(age / timedelta(hours=1), 2) == 17.07
    unstored = Gap(10, 19, 0, produced, size_deadline=produced + age)
    partition = PartitionStatus(0, 0, 100, 10, 10, 100, gaps=[unstored])

    line = render_status(StreamStatus("tx", "g", [partition], outbox(), retention))[2]

    assert unstored.deadline == unstored.size_deadline
    assert line.endswith(
        "retention.bytes limits the partition to 2.0 GiB (512.0 MiB now, 25% of it, growing by "
        "about 120.0 MiB an hour): past that, retention deletes its oldest segments whatever "
        "their age; at that rate, retention.bytes may delete this range from 2026-11-30 19:51 "
        "UTC on"
    )
