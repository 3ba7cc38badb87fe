"""Turning Kafka offsets into batches: the sensor's arithmetic, without Kafka or Dagster.

The cursor maps each partition to the next offset to hand out. A batch is one partition's
offsets first..last inclusive, at most `max_batch_size` long; batches of a partition are planned
in offset order, and the cursor only moves past offsets that were put in a batch.

A topic deleted and created again (an operator action) starts its offsets at 0 again: its batches
would get the run keys of the previous topic's, and Dagster skips a request whose run key was
used before. The cursor therefore keeps the topic's id (KIP-516) and a run-key tag: empty for the
first topic the sensor sees (keys `<topic>/<partition>/<first>-<last>`), and a new one for each
later incarnation (keys `<topic>@<tag>/<partition>/<first>-<last>`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

# The job a batch runs in; here, not in `jobs`, so that reading its runs imports no pipeline.
SCORE_TRANSACTIONS_JOB = "score_transactions"

TAG_PREFIX = "fraud_dagster"
TAG_TOPIC = f"{TAG_PREFIX}/topic"
TAG_PARTITION = f"{TAG_PREFIX}/partition"
TAG_TOPIC_PARTITION = f"{TAG_PREFIX}/topic_partition"
TAG_FIRST_OFFSET = f"{TAG_PREFIX}/first_offset"
TAG_LAST_OFFSET = f"{TAG_PREFIX}/last_offset"
TAG_OFFSET_RANGE = f"{TAG_PREFIX}/offset_range"
TAG_TOPIC_ID = f"{TAG_PREFIX}/topic_id"


def run_key_prefix(topic: str, key_tag: str) -> str:
    """What the run keys of one topic incarnation start with: `<topic>[@<tag>]/`."""
    return f"{topic}@{key_tag}/" if key_tag else f"{topic}/"


@dataclass(frozen=True)
class PlannedBatch:
    topic: str
    partition: int
    first_offset: int
    last_offset: int
    key_tag: str = ""  # the topic incarnation's run-key tag (see the module's docstring)
    topic_id: str | None = None

    @property
    def run_key(self) -> str:
        prefix = run_key_prefix(self.topic, self.key_tag)
        return f"{prefix}{self.partition}/{self.first_offset}-{self.last_offset}"

    @property
    def size(self) -> int:
        return self.last_offset - self.first_offset + 1

    def tags(self) -> dict[str, str]:
        """Run tags: the offset range only, never message contents."""
        tags = {
            TAG_TOPIC: self.topic,
            TAG_PARTITION: str(self.partition),
            TAG_TOPIC_PARTITION: f"{self.topic}/{self.partition}",
            TAG_FIRST_OFFSET: str(self.first_offset),
            TAG_LAST_OFFSET: str(self.last_offset),
            TAG_OFFSET_RANGE: f"{self.first_offset}-{self.last_offset}",
        }
        if self.topic_id:
            tags[TAG_TOPIC_ID] = self.topic_id
        return tags


def batch_config_problem(
    topic: str, partition: int, first_offset: int, last_offset: int, tags: Mapping[str, str]
) -> str | None:
    """Why a batch run's offset range cannot be read as given, or None.

    The sensor only plans valid ranges; this guards a range typed in the launchpad. A negative
    offset would be recorded as lost (it lies below the log's beginning), a range that ends
    before it starts would store nothing, and a range other than the run's tags say would be
    ordered and found in the UI as the tags' range (ordering and `status` read the tags)."""
    if partition < 0:
        return f"partition {partition} does not exist: partitions count from 0"
    if first_offset < 0:
        return f"first_offset {first_offset} does not exist: offsets count from 0"
    if last_offset < first_offset:
        return (
            f"last_offset {last_offset} is before first_offset {first_offset}: "
            "a batch is the offsets first..last, both included"
        )
    tagged = (
        tags.get(TAG_TOPIC),
        tags.get(TAG_PARTITION),
        tags.get(TAG_FIRST_OFFSET),
        tags.get(TAG_LAST_OFFSET),
    )
    if None in tagged:
        return None  # launched by hand without the sensor's tags: nothing to disagree with
    configured = (topic, str(partition), str(first_offset), str(last_offset))
    if tagged != configured:
        said = "{}/{} offsets {}..{}"
        return (
            f"the run's config says {said.format(*configured)} but its tags say "
            f"{said.format(*tagged)}: batches are ordered and found by their tags, so "
            "re-execute the batch with the config it was launched with"
        )
    return None


@dataclass
class SensorCursor:
    """{partition: next offset} for one topic incarnation, its topic id and run-key tag,
    serialized as JSON in the sensor's cursor."""

    topic: str
    next_offsets: dict[int, int] = field(default_factory=dict)
    topic_id: str | None = None
    key_tag: str = ""

    @classmethod
    def parse(cls, raw: str | None, topic: str) -> SensorCursor:
        if not raw:
            return cls(topic)
        data = json.loads(raw)
        if data.get("topic") != topic:
            return cls(topic)  # a cursor of another topic says nothing about this one
        return cls(
            topic,
            {int(p): int(o) for p, o in data.get("next_offsets", {}).items()},
            data.get("topic_id"),
            data.get("key_tag", ""),
        )

    @property
    def is_fresh(self) -> bool:
        """Nothing known yet: no ticks before, or the cursor was reset."""
        return not self.next_offsets and self.topic_id is None

    def serialize(self) -> str:
        data: dict = {
            "topic": self.topic,
            "next_offsets": {str(p): o for p, o in sorted(self.next_offsets.items())},
        }
        if self.topic_id:
            data["topic_id"] = self.topic_id
        if self.key_tag:
            data["key_tag"] = self.key_tag
        return json.dumps(data, sort_keys=True)


def past_launched_ranges(cursor: SensorCursor, run_keys: Iterable[str]) -> SensorCursor:
    """`cursor` moved past the ranges of `run_keys` (batches already launched) of its own topic
    incarnation, for partitions it already holds.

    Dagster saves a sensor's cursor when the tick ends: a daemon killed after a tick launched
    its runs but before it ended leaves the previous cursor, and the next tick would plan those
    offsets again under longer ranges (other run keys, so launched again, overlapping the
    first). The launched runs' keys say how far the lost cursor had got.
    """
    prefix = run_key_prefix(cursor.topic, cursor.key_tag)
    next_offsets = dict(cursor.next_offsets)
    for key in run_keys:
        if not key.startswith(prefix):
            continue
        partition, _, offsets = key[len(prefix) :].partition("/")
        last = offsets.rpartition("-")[2]
        if not (partition.isdigit() and last.isdigit()) or int(partition) not in next_offsets:
            continue
        next_offsets[int(partition)] = max(next_offsets[int(partition)], int(last) + 1)
    return SensorCursor(cursor.topic, next_offsets, cursor.topic_id, cursor.key_tag)


def new_key_tag(topic_id: str | None, previous_tag: str, now: float) -> str:
    """A run-key tag that no earlier batch of the topic used: the first 8 hex digits of a topic
    id no batch has seen before (`topic_id`; the caller passes None for an id seen before), or
    the time in milliseconds, base 16."""
    if topic_id:
        tag = topic_id.replace("-", "")[:8]
        if tag != previous_tag:
            return tag
    return f"t{int(now * 1000):x}"


@dataclass
class BatchPlan:
    batches: list[PlannedBatch]
    cursor: SensorCursor
    backlog_messages: int = 0
    notes: list[str] = field(default_factory=list)
    # The topic was recreated: its batches start over at the beginning under a new run-key tag,
    # and what is stored of the previous topic no longer says what of this one is stored.
    recreated: bool = False
    # ...and the broker says so by a new topic id: the messages at the stored coordinates are
    # certainly other messages. (Seen from the offsets alone it may be the same topic after a
    # broker lost data, whose first offsets hold the very messages stored before.)
    new_topic_id: bool = False


def plan_batches(
    cursor: SensorCursor,
    beginning_offsets: Mapping[int, int],
    end_offsets: Mapping[int, int],
    committed_offsets: Mapping[int, int],
    max_batch_size: int,
    max_batches: int,
    busy_partitions: Collection[int] = (),
    topic_id: str | None = None,
    now: float | None = None,
) -> BatchPlan:
    """Plan the next batches of every partition and the cursor after them.

    A partition seen for the first time starts at the consumer group's committed offset, or at
    its beginning (also when the committed offset lies past the partition's end: that commit
    was made on a previous incarnation of the topic). At most `max_batches` are planned per
    call, round-robin over partitions so that one busy partition cannot starve the others; the
    rest waits for the next tick. Partitions in `busy_partitions` (a batch of theirs is waiting
    to start) get no batch now: their next batch then covers everything that arrived
    meanwhile, so batches grow with the load instead of queueing up. A partition whose next
    offsets were deleted by retention gets a batch that starts at them (so that it records
    them as lost) and holds `max_batch_size` offsets from its beginning on.

    The topic was recreated if its id (`topic_id`, None if the broker does not say) differs
    from the cursor's, or, whatever the ids, if a partition's cursor lies past its end. Every
    partition then starts over at its beginning (committed offsets are those of the previous
    topic, or gone) under a new run-key tag (`new_key_tag`, at time `now`), and the plan says
    `recreated` (and `new_topic_id` when the ids differ).
    """
    if max_batch_size < 1 or max_batches < 1:
        raise ValueError("max_batch_size and max_batches must be positive")
    next_offsets = dict(cursor.next_offsets)
    key_tag = cursor.key_tag
    notes: list[str] = []
    new_topic_id = bool(cursor.topic_id and topic_id and cursor.topic_id != topic_id)
    if new_topic_id:
        reason = f"its id changed from {cursor.topic_id} to {topic_id}"
    else:
        reason = next(
            (
                f"the cursor of partition {p} ({next_offsets[p]}) is past its end {end}"
                for p, end in sorted(end_offsets.items())
                if p in next_offsets and next_offsets[p] > end
            ),
            None,
        )
    recreated = reason is not None
    if recreated:
        # The id's own tag only for an id the cursor did not have: under the same id (the broker
        # lost data, perhaps again after a cursor reset) that tag may have been used already,
        # and Dagster would skip every run key it gave out before.
        fresh_id = topic_id if topic_id != cursor.topic_id else None
        key_tag = new_key_tag(fresh_id, cursor.key_tag, time.time() if now is None else now)
        notes.append(
            f"topic {cursor.topic} was recreated ({reason}): every partition restarts at its "
            f"beginning, run keys tagged @{key_tag}"
        )
        next_offsets = {p: beginning_offsets.get(p, 0) for p in end_offsets}
    for partition, end in end_offsets.items():
        if partition not in next_offsets:
            start = committed_offsets.get(partition, beginning_offsets.get(partition, 0))
            if start > end:
                notes.append(
                    f"partition {partition}: committed offset {start} is past the end {end} "
                    "(committed on a previous incarnation of the topic); starting at its beginning"
                )
                start = beginning_offsets.get(partition, 0)
            next_offsets[partition] = start
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
            # Offsets retention deleted before they were read do not count towards the size:
            # the batch records them as lost and reads a full batch of what is still there.
            beginning = beginning_offsets.get(partition, 0)
            if start < beginning:
                notes.append(
                    f"partition {partition}: offsets {start}..{min(beginning, end) - 1} were "
                    "deleted by retention before they were read; the next batch records them "
                    "as lost"
                )
            last = min(max(start, beginning) + max_batch_size, end) - 1
            batches.append(PlannedBatch(cursor.topic, partition, start, last, key_tag, topic_id))
            next_offsets[partition] = last + 1
            progress = True
    backlog = sum(max(end_offsets[p] - next_offsets[p], 0) for p in end_offsets)
    new_cursor = SensorCursor(cursor.topic, next_offsets, topic_id or cursor.topic_id, key_tag)
    return BatchPlan(batches, new_cursor, backlog, notes, recreated, new_topic_id)
