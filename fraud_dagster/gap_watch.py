"""When an unstored offset range is worth an operator email: before retention deletes it.

A batch whose run failed for good is mailed once, when it fails (the run-failure sensor). If
nobody reruns it, its offsets stay unstored (the consumer group waits below them, later batches
go on) until the topic's retention deletes them unread: the one way this pipeline loses
messages. The watch turns the unstored ranges `stream_status` finds into at most three notices
per range: once it has been unstored for the alert threshold, a last call when less than a day
is left before retention may delete it (by age, or by size at the rate its partition grows) or
its partition nears a size limit, and once
retention has deleted it while the consumer group still waits below it. (The next batch of the
partition to be stored records such a range in `lost_ranges` and commits past it, so this last
notice is rare; the range then shows as lost in `fraud-dagster status`.)
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from fraud_dagster.batch_order import RunningBatch
from fraud_dagster.stream_status import Gap, StreamStatus

NoticeKind = Literal["unstored", "last_call", "deleted"]
# The last call: a day before the range's deadline (retention.ms, or retention.bytes at the
# partition's fill rate), or once its partition has filled this share of a size limit (past it
# Kafka deletes the oldest segments at the next full one, whatever their age; how soon that is
# depends on traffic, which a rate measured over the last hour may not foresee).
LAST_CALL_BEFORE = timedelta(days=1)
LAST_CALL_SIZE_SHARE = 0.9


@dataclass(frozen=True)
class GapNotice:
    """One unstored range of one partition to tell the operators about, and why now."""

    partition: int
    gap: Gap
    kind: NoticeKind

    @property
    def key(self) -> str:
        # By the range's first offset: a range that grows at its end (a later batch failed
        # too) is the same problem; one whose start moved (partly rerun) is a new one.
        return f"{self.partition}/{self.gap.first}/{self.kind}"


@dataclass(frozen=True)
class GapWatch:
    """The notices already sent (a sensor cursor), as their keys."""

    mailed: frozenset[str] = frozenset()

    def serialize(self) -> str:
        return json.dumps(sorted(self.mailed))

    @classmethod
    def parse(cls, cursor: str | None) -> GapWatch:
        if not cursor:
            return cls()
        try:
            return cls(frozenset(str(key) for key in json.loads(cursor)))
        except (TypeError, ValueError):
            return cls()  # a cursor of another format: nothing known to be mailed


def _kind(
    gap: Gap, now: datetime, alert_after: timedelta, size_share: float | None
) -> NoticeKind | None:
    if gap.deleted == gap.size:
        return "deleted"
    if gap.produced_at is None or now - gap.produced_at < alert_after:
        return None  # young: its batch is likely still under way or being retried
    if gap.deadline is not None and gap.deadline - now <= LAST_CALL_BEFORE:
        return "last_call"
    if size_share is not None and size_share >= LAST_CALL_SIZE_SHARE:
        return "last_call"
    return "unstored"


def gaps_to_mail(
    watch: GapWatch,
    status: StreamStatus,
    now: datetime,
    alert_after: timedelta,
    in_flight: Collection[RunningBatch] = (),
) -> tuple[GapWatch, list[GapNotice]]:
    """The notices `status` calls for that `watch` has not sent, and the watch once they are
    sent (keys of ranges no longer unstored are dropped, so the cursor stays small). The caller
    saves the new watch only once the email is sent.

    A range that a batch run queued or under way covers in part (`in_flight`: a retry, or an
    operator's rerun) is not mailed now: it may be stored in a
    minute (after an outage its messages are old already). What was mailed about it is kept.
    """
    due: list[GapNotice] = []
    current: set[str] = set()
    waiting: set[str] = set()
    for partition in status.partitions:
        size_share = status.retention.share_of_size_limit(partition.partition)
        for gap in partition.gaps:
            kind = _kind(gap, now, alert_after, size_share)
            if kind is None:
                continue
            if any(
                run.partition == partition.partition
                and run.first_offset <= gap.last
                and run.last_offset >= gap.first
                for run in in_flight
            ):
                waiting.add(f"{partition.partition}/{gap.first}")
                continue
            notice = GapNotice(partition.partition, gap, kind)
            current.add(notice.key)
            if notice.key not in watch.mailed:
                due.append(notice)
    open_ranges = {key.rsplit("/", 1)[0] for key in current} | waiting
    still_open = {key for key in watch.mailed if key.rsplit("/", 1)[0] in open_ranges}
    return GapWatch(frozenset(still_open | current)), due
