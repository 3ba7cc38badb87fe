"""Turning Kafka offsets into batches: the sensor's arithmetic, without Kafka or Dagster.

The cursor maps each partition to the next offset to hand out. A batch is one partition's
offsets first..last inclusive, at most `max_batch_size` long; batches of a partition are planned
in offset order, and the cursor only moves past offsets that were put in a batch.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

TAG_PREFIX = "fraud_dagster"
TAG_TOPIC = f"{TAG_PREFIX}/topic"
TAG_PARTITION = f"{TAG_PREFIX}/partition"
TAG_TOPIC_PARTITION = f"{TAG_PREFIX}/topic_partition"
TAG_FIRST_OFFSET = f"{TAG_PREFIX}/first_offset"
TAG_LAST_OFFSET = f"{TAG_PREFIX}/last_offset"
TAG_OFFSET_RANGE = f"{TAG_PREFIX}/offset_range"


@dataclass(frozen=True)
class PlannedBatch:
    topic: str
    partition: int
    first_offset: int
    last_offset: int

    @property
    def run_key(self) -> str:
        return f"{self.topic}/{self.partition}/{self.first_offset}-{self.last_offset}"

    @property
    def size(self) -> int:
        return self.last_offset - self.first_offset + 1

    def tags(self) -> dict[str, str]:
        """Run tags: the offset range only, never message contents."""
        return {
            TAG_TOPIC: self.topic,
            TAG_PARTITION: str(self.partition),
            TAG_TOPIC_PARTITION: f"{self.topic}/{self.partition}",
            TAG_FIRST_OFFSET: str(self.first_offset),
            TAG_LAST_OFFSET: str(self.last_offset),
            TAG_OFFSET_RANGE: f"{self.first_offset}-{self.last_offset}",
        }


@dataclass
class SensorCursor:
    """{partition: next offset} for one topic, serialized as JSON in the sensor's cursor."""

    topic: str
    next_offsets: dict[int, int] = field(default_factory=dict)

    @classmethod
    def parse(cls, raw: str | None, topic: str) -> SensorCursor:
        if not raw:
            return cls(topic)
        data = json.loads(raw)
        if data.get("topic") != topic:
            return cls(topic)  # a cursor of another topic says nothing about this one
        return cls(topic, {int(p): int(o) for p, o in data.get("next_offsets", {}).items()})

    def serialize(self) -> str:
        return json.dumps(
            {
                "topic": self.topic,
                "next_offsets": {str(p): o for p, o in sorted(self.next_offsets.items())},
            },
            sort_keys=True,
        )


@dataclass
class BatchPlan:
    batches: list[PlannedBatch]
    cursor: SensorCursor
    backlog_messages: int = 0
    notes: list[str] = field(default_factory=list)


def plan_batches(
    cursor: SensorCursor,
    beginning_offsets: Mapping[int, int],
    end_offsets: Mapping[int, int],
    committed_offsets: Mapping[int, int],
    max_batch_size: int,
    max_batches: int,
    busy_partitions: Collection[int] = (),
) -> BatchPlan:
    """Plan the next batches of every partition and the cursor after them.

    A partition seen for the first time starts at the consumer group's committed offset, or at
    its beginning. At most `max_batches` are planned per call, round-robin over partitions so
    that one busy partition cannot starve the others; the rest waits for the next tick.
    Partitions in `busy_partitions` (a batch of theirs is waiting to start) get no batch now:
    their next batch then covers everything that arrived meanwhile, so batches grow with the
    load instead of queueing up.
    """
    if max_batch_size < 1 or max_batches < 1:
        raise ValueError("max_batch_size and max_batches must be positive")
    next_offsets = dict(cursor.next_offsets)
    notes: list[str] = []
    for partition, end in end_offsets.items():
        if partition not in next_offsets:
            start = committed_offsets.get(partition, beginning_offsets.get(partition, 0))
            next_offsets[partition] = start
        elif next_offsets[partition] > end:
            notes.append(
                f"partition {partition}: cursor {next_offsets[partition]} is past the end {end} "
                "(topic recreated?); restarting at its beginning"
            )
            next_offsets[partition] = beginning_offsets.get(partition, 0)
    batches: list[PlannedBatch] = []
    progress = True
    while progress and len(batches) < max_batches:
        progress = False
        for partition in sorted(end_offsets):
            if len(batches) >= max_batches:
                break
            if partition in busy_partitions:
                continue
            start, end = next_offsets[partition], end_offsets[partition]
            if start >= end:
                continue
            last = min(start + max_batch_size, end) - 1
            batches.append(PlannedBatch(cursor.topic, partition, start, last))
            next_offsets[partition] = last + 1
            progress = True
    backlog = sum(max(end_offsets[p] - next_offsets[p], 0) for p in end_offsets)
    return BatchPlan(batches, SensorCursor(cursor.topic, next_offsets), backlog, notes)
