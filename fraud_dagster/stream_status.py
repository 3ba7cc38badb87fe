"""Where the stream stands, for an operator at a terminal (`fraud-dagster status`).

Per partition: how far Kafka's log reaches, how far the consumer group is committed, which
offsets below the highest stored one no batch has stored (a failed batch to rerun, or one still
under way), what retention deleted unread; then the alert outbox. It reads the broker and the
application database only, so it answers when Dagster is down too, and it changes nothing;
`range_runs` adds, where the Dagster instance can be read, the runs behind each unstored range.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Engine

from fraud_dagster import kafka_io
from fraud_dagster.alerts import (
    batch_run_lines,
    find_runs_hint,
    size_deadline_words,
    size_limit_words,
)
from fraud_dagster.storage.batches import lost_in, not_stored, stored_end, stored_without_gap
from fraud_dagster.storage.outbox import OutboxStatus, outbox_status

if TYPE_CHECKING:
    from fraud_dagster.range_runs import BatchRuns

Span = tuple[int, int]  # first and last offset, inclusive


@dataclass(frozen=True)
class Gap:
    """Offsets first..last no batch has stored, below stored ones, and how long they have left:
    retention deletes them unread (lost for good) unless their batch is rerun before."""

    first: int
    last: int
    deleted: int = 0  # how many of its first offsets retention already deleted
    produced_at: datetime | None = None  # Kafka timestamp of its oldest message still there
    deletable_from: datetime | None = None  # produced_at + retention.ms (None: kept for ever)
    batches: tuple[BatchRuns, ...] = ()  # its batches and their runs, if Dagster was read
    # produced_at + the partition's size_limit_age: when retention.bytes may delete it if the
    # partition goes on filling at its rate (None: no size limit, or no rate known)
    size_deadline: datetime | None = None

    @property
    def size(self) -> int:
        return self.last - self.first + 1

    @property
    def deadline(self) -> datetime | None:
        """The earliest moment retention may delete it, by age or by size (None: neither)."""
        known = [d for d in (self.deletable_from, self.size_deadline) if d is not None]
        return min(known, default=None)


@dataclass(frozen=True)
class PartitionStatus:
    partition: int
    beginning: int  # the log's first offset (retention deletes below it)
    end: int  # the next offset to be written
    committed: int | None  # the consumer group's committed offset (None: nothing committed)
    stored_until: int  # end of the gap-free stored ranges from the committed offset
    stored_end: int  # one past the highest offset a stored range reaches
    gaps: list[Gap] = field(default_factory=list)  # unstored offsets below stored_end
    lost: list[Span] = field(default_factory=list)  # deleted by retention before being read

    @property
    def start(self) -> int:
        """Where the group's history starts: its committed offset, else the log's beginning."""
        return self.beginning if self.committed is None else self.committed

    @property
    def lag(self) -> int:
        return max(self.end - self.start, 0)

    @property
    def waiting(self) -> int:
        """Offsets past the highest stored one: batches under way, queued or not yet planned."""
        return max(self.end - max(self.stored_end, self.start), 0)


@dataclass(frozen=True)
class StreamStatus:
    topic: str
    group: str
    partitions: list[PartitionStatus]
    outbox: OutboxStatus
    retention: kafka_io.Retention = field(default_factory=kafka_io.Retention)
    topic_id: str | None = None  # the topic's Kafka id (it changes when the topic is recreated)

    @property
    def needs_attention(self) -> bool:
        """An unstored gap below stored offsets: a batch to rerun. (Offsets lost to retention
        are reported, but stay lost: they would keep a monitor red for ever.)"""
        return any(p.gaps for p in self.partitions)


def stream_status(
    kafka_options: Mapping[str, Any], topic: str, group: str, engine: Engine
) -> StreamStatus:
    """Read the topic's offsets, the group's commits, the stored and lost ranges and the outbox."""
    offsets = kafka_io.topic_offsets(kafka_options, topic)
    beginning, end = offsets.beginning, offsets.end
    committed = kafka_io.committed_offsets(kafka_options, topic, group)
    retention = kafka_io.topic_retention(kafka_options, topic)
    partitions = []
    with engine.connect() as conn:
        for partition in sorted(end):
            first_kept = beginning.get(partition, 0)
            start = committed.get(partition, first_kept)
            highest = max(stored_end(conn, topic, partition) or start, start)
            partitions.append(
                PartitionStatus(
                    partition=partition,
                    beginning=first_kept,
                    end=end[partition],
                    committed=committed.get(partition),
                    stored_until=stored_without_gap(conn, topic, partition, start),
                    stored_end=highest,
                    gaps=[
                        _gap(kafka_options, topic, partition, span, first_kept, retention)
                        for span in not_stored(conn, topic, partition, start, highest - 1)
                    ],
                    lost=lost_in(engine, topic, partition, 0, end[partition]),
                )
            )
    return StreamStatus(
        topic, group, partitions, outbox_status(engine), retention, offsets.topic_id
    )


def _gap(
    options: Mapping[str, Any],
    topic: str,
    partition: int,
    span: Span,
    beginning: int,
    retention: kafka_io.Retention,
) -> Gap:
    """The gap with its deadlines: the timestamp of its oldest message still on the broker (one
    message read) plus the topic's retention.ms, and plus the partition's size_limit_age. That
    message is the first of the gap that holds one: its first offset may hold none (a
    transactional producer's commit marker), and a gap without a message has nothing to lose."""
    first, last = span
    deleted = max(0, min(beginning, last + 1) - first)
    if deleted == last - first + 1:
        return Gap(first, last, deleted)
    oldest = max(first, beginning)
    read = kafka_io.read_range(options, topic, partition, oldest, last, max_messages=1)
    if not read.timestamps_ms:
        return Gap(first, last, deleted)
    produced = datetime.fromtimestamp(read.timestamps_ms[0] / 1000, UTC)
    deletable = (
        produced + timedelta(milliseconds=retention.ms)
        if retention.ms is not None and retention.ms >= 0
        else None
    )
    size_age = retention.size_limit_age(partition)
    by_size = produced + size_age if size_age is not None else None
    return Gap(first, last, deleted, produced, deletable, size_deadline=by_size)


def _spans(spans: list[Span]) -> str:
    return ", ".join(f"{a}-{b}" for a, b in spans)


def _when(moment: datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M} UTC"


def _gap_line(gap: Gap, partition: int, retention: kafka_io.Retention) -> str:
    where = f"offsets {gap.first}-{gap.last} ({gap.size})"
    find = "its runs below" if gap.batches else f"its run: {find_runs_hint(partition, gap.first)}"
    if gap.deleted == gap.size:
        return (
            f"  NOT STORED, and deleted by retention since: {where}; re-execute its batch so "
            f"that they are recorded as lost and the consumer group moves on; {find}"
        )
    line = (
        f"  NOT STORED: {where}, below stored ones: a failed batch (re-execute it from failure; "
        f"a rerun stores and sends nothing twice) or one still under way; {find}"
    )
    if gap.deleted:
        line += f"; its first {gap.deleted} offset(s) were deleted by retention already"
    if gap.deletable_from is not None and gap.produced_at is not None:
        days = (retention.ms or 0) / 86_400_000
        line += (
            f"; oldest message produced {_when(gap.produced_at)}: retention ({days:g} days) may "
            f"delete it from {_when(gap.deletable_from)} on"
        )
    elif retention.ms is not None and retention.ms < 0:
        line += (
            "; no age limit (retention.ms -1)"
            if retention.limits_size
            else "; the topic keeps its messages for ever (retention.ms -1)"
        )
    size_limit = size_limit_words(retention, partition)
    if size_limit:
        line += f"; {size_limit}"
    if gap.size_deadline is not None:
        line += f"; {size_deadline_words(gap.size_deadline)}"
    return line


def _last_failure(outbox: OutboxStatus) -> str:
    """The newest failure of an unsent alert: when (if recorded) and the server's words."""
    if not outbox.last_error:
        return ""
    when = f" at {outbox.last_failed_at:%Y-%m-%d %H:%M:%S} UTC" if outbox.last_failed_at else ""
    return f"; last error{when}: {outbox.last_error}"


def render_status(status: StreamStatus, ui_url: str | None = None) -> list[str]:
    """The status as lines of text, the things to act on spelled out; runs linked to the Dagster
    UI at `ui_url`, if given."""
    lines = [f"topic {status.topic}, consumer group {status.group}"]
    for p in status.partitions:
        committed = "nothing committed" if p.committed is None else f"committed {p.committed}"
        lines.append(
            f"partition {p.partition}: log {p.beginning}..{p.end - 1} (end {p.end}), "
            f"{committed}, lag {p.lag}"
        )
        for gap in p.gaps:
            lines.append(_gap_line(gap, p.partition, status.retention))
            lines += [f"    {line}" for line in batch_run_lines(gap, p.partition, ui_url)]
        if p.lost:
            count = sum(b - a + 1 for a, b in p.lost)
            lines.append(
                f"  LOST: offsets {_spans(p.lost)} ({count}) were deleted by retention before "
                "they were read (table lost_ranges): never scored, never alerted"
            )
        if p.waiting:
            lines.append(
                f"  {p.waiting} offset(s) after the last stored one: batches under way or "
                "waiting for the next sensor tick"
            )
    outbox = status.outbox
    counts = ", ".join(f"{n} {s}" for s, n in sorted(outbox.counts.items())) or "none"
    lines.append(f"alerts: {counts}; {outbox.due} due now")
    if outbox.unsent:
        lines.append(
            f"  oldest unsent alert written {outbox.oldest_unsent_at:%Y-%m-%d %H:%M:%S} UTC"
            + _last_failure(outbox)
        )
    return lines
