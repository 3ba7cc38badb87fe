"""Kafka access with kafka-python: offsets, reading one offset range, committing, producing.

The sensor only looks at offsets; a batch run reads exactly its range with a consumer that is
assigned the partition (no group rebalancing, no auto-commit) and commits the range's end for the
pipeline's consumer group once the batch is stored (never past a range that is not), so standard
Kafka tooling shows the real lag.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import closing
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType, NewPartitions, NewTopic
from kafka.errors import (
    KafkaError,
    OffsetOutOfRangeError,
    TopicAlreadyExistsError,
    UnknownTopicOrPartitionError,
    for_code,
)
from kafka.protocol.consumer.offsets import OffsetSpec
from kafka.structs import OffsetAndMetadata

from fraud_dagster.errors import (
    MISSING_TOPIC_WORDS,
    KafkaUnavailableError,
    OffsetRangeError,
    TopicChangedError,
)
from fraud_dagster.messages import RawBatch

logger = logging.getLogger(__name__)

# Large fetches, as a batch run reads thousands of messages; but polls of 500 records, the
# client's default: with 10,000 per poll a 100,000-message range read took 0.82 s, with 500
# 0.58 s (docs/benchmarks.md, "The client's limit").
_BATCH_CONSUMER_OPTIONS = {
    "enable_auto_commit": False,
    "auto_offset_reset": "none",
    "max_poll_records": 500,
    "fetch_max_bytes": 64 * 1024 * 1024,
    "max_partition_fetch_bytes": 16 * 1024 * 1024,
    "fetch_max_wait_ms": 100,
}


def _unreachable(options: Mapping[str, Any], exc: KafkaError) -> KafkaUnavailableError:
    """The one message for a client that could not bootstrap, whichever kind of client."""
    return KafkaUnavailableError(
        f"cannot reach Kafka at {options.get('bootstrap_servers')}: {exc!r}"
    )


def _consumer(options: Mapping[str, Any], **extra: Any) -> KafkaConsumer:
    try:
        return KafkaConsumer(**{**options, **extra})
    except KafkaError as exc:
        raise _unreachable(options, exc) from exc


def _admin(options: Mapping[str, Any]) -> closing[KafkaAdminClient]:
    """An admin client from the shared client options (those it takes), closed after use."""
    admin_options = {k: v for k, v in options.items() if k in KafkaAdminClient.DEFAULT_CONFIG}
    try:
        return closing(KafkaAdminClient(**admin_options))
    except KafkaError as exc:
        raise _unreachable(options, exc) from exc


def _no_such_topic(topic: str) -> KafkaUnavailableError:
    """The one message for a topic the broker does not have, with how to create it."""
    return KafkaUnavailableError(
        f"topic {topic!r} {MISSING_TOPIC_WORDS} (or has no partitions yet); "
        "create it with `fraud-dagster topic create`"
    )


def partitions_of(consumer: KafkaConsumer, topic: str) -> list[int]:
    partitions = consumer.partitions_for_topic(topic)
    if not partitions:
        raise _no_such_topic(topic)
    return sorted(partitions)


@dataclass(frozen=True)
class TopicOffsets:
    """A topic's id and every partition's first and next offsets, read together."""

    topic_id: str | None
    beginning: dict[int, int]
    end: dict[int, int]


_NO_TOPIC_ID = "00000000-0000-0000-0000-000000000000"


def topic_offsets(options: Mapping[str, Any], topic: str) -> TopicOffsets:
    """The topic's id (KIP-516: it changes when the topic is deleted and created again; None
    before Kafka 2.8), then the beginning and end (next offset to be written) of every partition.

    One admin client asks for both: a fresh KafkaConsumer learns a topic's partitions only after
    kafka-python's 100-ms metadata backoff that follows its bootstrap (114.5 ms a lookup against
    8.0 ms, docs/benchmarks.md "Stop 25"), and the sensor asks on every tick.
    """
    try:
        with _admin(options) as admin:
            found, tps = _describe(admin, topic)
            first = admin.list_partition_offsets(dict.fromkeys(tps, OffsetSpec.EARLIEST))
            after = admin.list_partition_offsets(dict.fromkeys(tps, OffsetSpec.LATEST))
    except KafkaError as exc:
        raise KafkaUnavailableError(f"cannot read offsets of {topic!r}: {exc!r}") from exc
    return TopicOffsets(
        topic_id=found,
        beginning={tp.partition: first[tp].offset for tp in tps},
        end={tp.partition: after[tp].offset for tp in tps},
    )


def _describe(admin: KafkaAdminClient, topic: str) -> tuple[str | None, list[TopicPartition]]:
    """The topic's id (None if the broker has none) and its partitions, in order. The admin
    client asks without auto-creation, so a missing topic stays missing."""
    (described,) = admin.describe_topics([topic])
    error = described.get("error_code") or 0
    if error == UnknownTopicOrPartitionError.errno or not described.get("partitions"):
        raise _no_such_topic(topic)
    if error:
        raise for_code(error)(f"describing topic {topic!r}")
    tps = sorted(
        (TopicPartition(topic, p["partition_index"]) for p in described["partitions"]),
        key=lambda tp: tp.partition,
    )
    found = described.get("topic_id")
    return (str(found) if found and str(found) != _NO_TOPIC_ID else None), tps


def _require_partition(
    options: Mapping[str, Any], topic: str, partition: int, topic_id: str | None = None
) -> None:
    """Fail at once, saying what is missing, if the broker has no such topic or partition (a
    rerun of a batch whose topic was deleted since): a KafkaConsumer would wait out its 30-s
    request timeout for the offsets of an unknown partition and only say that it timed out,
    and kafka-python 3.0 asks for the topic with auto-creation whatever its
    `allow_auto_create_topics` says. A few ms a batch (one describe). With `topic_id` (the
    topic the batch was planned for), fail with TopicChangedError if the broker's topic is
    another one: its offsets hold other messages, which the batch would store as its own."""
    try:
        with _admin(options) as admin:
            found, tps = _describe(admin, topic)
    except KafkaError as exc:
        raise KafkaUnavailableError(f"cannot describe topic {topic!r}: {exc!r}") from exc
    if topic_id and found and found != topic_id:
        raise TopicChangedError(
            f"this batch was planned for topic {topic!r} with id {topic_id}, which was deleted "
            f"since: the broker's {topic!r} is a new topic (id {found}) whose offsets hold other "
            "messages. Do not rerun this batch: the sensor reads the new topic from its "
            "beginning, and the deleted topic's offsets no batch stored went with it "
            '(docs/operations.md, "When the topic is deleted and created again")'
        )
    partitions = [tp.partition for tp in tps]
    if partition not in partitions:
        raise KafkaUnavailableError(
            f"topic {topic!r} has no partition {partition} on the broker (its partitions: "
            f"{', '.join(map(str, partitions))}); was it deleted and created again since?"
        )


def offset_bounds(options: Mapping[str, Any], topic: str) -> tuple[dict[int, int], dict[int, int]]:
    """(beginning, end) offsets of every partition; end is the next offset to be written."""
    offsets = topic_offsets(options, topic)
    return offsets.beginning, offsets.end


# How far back the recent fill rate of a size-limited partition looks (`fill_rate`).
FILL_RATE_WINDOW = timedelta(hours=1)
_TEN_YEARS = timedelta(days=3653)


@dataclass(frozen=True)
class Retention:
    """What the topic's retention deletes by (its own settings, else the broker's defaults):
    age (`ms`) and, per partition, size on disk (`max_bytes`); -1: no limit, None: not said.
    Read only where a size limit applies: `sizes`, every partition's bytes on disk now, and
    `fill_rates`, how fast each grows (bytes a second, `fill_rate`)."""

    ms: int | None = None
    max_bytes: int | None = None
    sizes: dict[int, int] = field(default_factory=dict)
    fill_rates: dict[int, float] = field(default_factory=dict)

    @property
    def limits_size(self) -> bool:
        return self.max_bytes is not None and self.max_bytes >= 0

    def share_of_size_limit(self, partition: int) -> float | None:
        """How full `partition` is against `max_bytes` (1.0: retention may delete its oldest
        segments, whatever their age); None without a limit or a size."""
        size = self.sizes.get(partition)
        if not self.limits_size or size is None:
            return None
        return size / self.max_bytes if self.max_bytes else float("inf")

    def size_limit_age(self, partition: int) -> timedelta | None:
        """How old a message of `partition` gets before the size limit deletes it, if the
        partition goes on filling at its rate: the time it takes to write `max_bytes`. (Kafka
        deletes a segment only once the partition is over the limit by that whole segment, so
        this is the earliest, not the exact, moment.) None without a limit or a rate, or
        beyond ten years."""
        rate = self.fill_rates.get(partition)
        if not self.limits_size or not rate:
            return None
        seconds = (self.max_bytes or 0) / rate
        return timedelta(seconds=seconds) if seconds <= _TEN_YEARS.total_seconds() else None


def fill_rate(size: int, messages: int, retained: timedelta, recent_messages: int) -> float | None:
    """Bytes a second a partition of `size` bytes on disk grows by: the faster of its mean rate
    over its `messages` retained ones (the oldest written `retained` ago) and its rate over
    the last `FILL_RATE_WINDOW` (`recent_messages`, at the retained mean size a message), so a
    burst counts at once and a quiet hour does not hide a busy day. None with nothing to go by.
    """
    if size <= 0 or messages <= 0:
        return None
    rates = [recent_messages * size / messages / FILL_RATE_WINDOW.total_seconds()]
    if retained > timedelta(0):
        rates.append(size / retained.total_seconds())
    return max(rates) or None


def topic_retention(
    options: Mapping[str, Any], topic: str, now: datetime | None = None
) -> Retention:
    """The topic's `retention.ms` and `retention.bytes` and, where the bytes limit applies, its
    partitions' sizes and fill rates at `now` (a broker that will not say them leaves them
    empty, with a warning)."""
    keys = {"retention.ms": None, "retention.bytes": None}
    try:
        with _admin(options) as admin:
            described = admin.describe_configs(
                [ConfigResource(ConfigResourceType.TOPIC, topic, keys)], config_filter="all"
            )
            configs = described.get("topic", {}).get(topic, {})
            ms, max_bytes = (configs.get(key, {}).get("value") for key in keys)
            retention = Retention(
                None if ms is None else int(ms), None if max_bytes is None else int(max_bytes)
            )
            if not retention.limits_size:
                return retention
            try:
                sizes = _partition_sizes(admin.describe_log_dirs([topic]), topic)
            except KafkaError as exc:
                logger.warning("cannot read the sizes of %s's partitions: %r", topic, exc)
                return retention
            try:
                rates = _fill_rates(admin, topic, sizes, now or datetime.now(UTC))
            except KafkaError as exc:
                logger.warning("cannot read how fast %s's partitions grow: %r", topic, exc)
                rates = {}
    except KafkaError as exc:
        raise KafkaUnavailableError(f"cannot describe the configs of {topic!r}: {exc!r}") from exc
    return Retention(retention.ms, retention.max_bytes, sizes, rates)


def _fill_rates(
    admin: KafkaAdminClient, topic: str, sizes: Mapping[int, int], now: datetime
) -> dict[int, float]:
    """`fill_rate` of every partition in `sizes`, from four offset lookups for them all: the
    oldest message and its timestamp (the earliest at or after timestamp 0), the first written
    in the last `FILL_RATE_WINDOW` (-1: none) and the end."""
    tps = [TopicPartition(topic, partition) for partition in sorted(sizes)]
    since_ms = int((now - FILL_RATE_WINDOW).timestamp() * 1000)
    oldest = admin.list_partition_offsets(dict.fromkeys(tps, 0))
    recent = admin.list_partition_offsets(dict.fromkeys(tps, since_ms))
    first = admin.list_partition_offsets(dict.fromkeys(tps, OffsetSpec.EARLIEST))
    after = admin.list_partition_offsets(dict.fromkeys(tps, OffsetSpec.LATEST))
    rates = {}
    for tp in tps:
        end = after[tp].offset
        retained = (
            now - datetime.fromtimestamp(oldest[tp].timestamp / 1000, UTC)
            if oldest[tp].offset >= 0
            else timedelta(0)
        )
        recent_messages = end - recent[tp].offset if recent[tp].offset >= 0 else 0
        rate = fill_rate(sizes[tp.partition], end - first[tp].offset, retained, recent_messages)
        if rate is not None:
            rates[tp.partition] = rate
    return rates


def _partition_sizes(brokers: Iterable[Mapping[str, Any]], topic: str) -> dict[int, int]:
    """Each partition's size on disk from `describe_log_dirs`, the largest of its replicas
    (each broker applies retention.bytes to its own copy); replicas being moved between
    directories (future ones) do not count."""
    sizes: dict[int, int] = {}
    for broker in brokers:
        for log_dir in broker["log_dirs"]:
            if log_dir.get("error_code"):
                continue
            for described in log_dir["topics"]:
                if described["name"] != topic:
                    continue
                for partition in described["partitions"]:
                    if partition.get("is_future_key"):
                        continue
                    index = partition["partition_index"]
                    sizes[index] = max(sizes.get(index, 0), partition["partition_size"])
    return sizes


def committed_offsets(options: Mapping[str, Any], topic: str, group_id: str) -> dict[int, int]:
    """The offsets `group_id` committed on `topic` (partitions without a commit are absent)."""
    with closing(_consumer(options, group_id=group_id, enable_auto_commit=False)) as consumer:
        try:
            result = {}
            for partition in partitions_of(consumer, topic):
                offset = consumer.committed(TopicPartition(topic, partition))
                if offset is not None:
                    result[partition] = offset
            return result
        except KafkaError as exc:
            raise KafkaUnavailableError(f"cannot read committed offsets: {exc!r}") from exc


def read_range(
    options: Mapping[str, Any],
    topic: str,
    partition: int,
    first_offset: int,
    last_offset: int,
    timeout_seconds: float = 60.0,
    group_id: str | None = None,
    topic_id: str | None = None,
    max_messages: int | None = None,
) -> RawBatch:
    """Read offsets `first_offset..last_offset` (inclusive) of one partition, and nothing more
    (with `max_messages`, only the first that many messages of the range).

    Offsets without a message (transaction markers, compaction) are simply absent from the
    result. Offsets at the start of the range that retention already deleted cannot be read:
    the rest is read and the batch says which were deleted (`deleted_by_retention`), so that
    they are recorded as lost and the partition goes on, instead of a run that fails on every
    rerun while the offsets still on the broker wait unread behind it. Raises
    `OffsetRangeError` if the range is not written yet, and `KafkaUnavailableError` if the
    broker has no such topic or partition or the range cannot be read within
    `timeout_seconds`. With `group_id`, the batch also says where that
    group's history starts (`history_start`: its committed offset, else the beginning).
    With `topic_id` (the id of the topic the batch was planned for), raises
    `TopicChangedError` if the broker's topic is another one.
    """
    batch = RawBatch(topic, partition, first_offset, last_offset)
    if last_offset < first_offset:
        return batch
    limit = max_messages if max_messages is not None else last_offset - first_offset + 1
    tp = TopicPartition(topic, partition)
    group = {"group_id": group_id} if group_id else {}
    _require_partition(options, topic, partition, topic_id)
    with closing(_consumer(options, **_BATCH_CONSUMER_OPTIONS, **group)) as consumer:
        try:
            consumer.assign([tp])
            begin = consumer.beginning_offsets([tp])[tp]
            end = consumer.end_offsets([tp])[tp]
            if group_id:
                committed = consumer.committed(tp)
                batch.history_start = committed if committed is not None else begin
            if last_offset >= end:
                raise OffsetRangeError(
                    f"offset {last_offset} of {topic}/{partition} does not exist yet (end is {end})"
                )
            if first_offset < begin:
                batch.deleted_by_retention = (first_offset, min(begin - 1, last_offset))
                logger.warning(
                    "offsets %d..%d of %s/%d were deleted by retention before this batch read them",
                    *batch.deleted_by_retention,
                    topic,
                    partition,
                )
                if begin > last_offset:
                    return batch
            consumer.seek(tp, max(first_offset, begin))
            deadline = time.monotonic() + timeout_seconds
            while consumer.position(tp) <= last_offset and len(batch) < limit:
                if time.monotonic() > deadline:
                    raise KafkaUnavailableError(
                        f"read {len(batch)} messages of {topic}/{partition} "
                        f"{first_offset}..{last_offset} in {timeout_seconds:.0f}s, then timed out"
                    )
                for record in consumer.poll(timeout_ms=500).get(tp, []):
                    if record.offset > last_offset:
                        break
                    batch.offsets.append(record.offset)
                    batch.timestamps_ms.append(record.timestamp)
                    batch.values.append(record.value)
                if len(batch) > limit:  # per poll, not per message: only with max_messages
                    del batch.offsets[limit:], batch.timestamps_ms[limit:], batch.values[limit:]
        except OffsetOutOfRangeError as exc:
            # Retention deleted offsets while this batch read them: the step's retry reads
            # again, finds them below the beginning and records them as lost.
            raise OffsetRangeError(
                f"offsets of {topic}/{partition} {first_offset}..{last_offset} were deleted by "
                f"retention while this batch read them ({exc}); a retry records them as lost"
            ) from exc
        except KafkaError as exc:
            raise KafkaUnavailableError(
                f"reading {topic}/{partition} {first_offset}..{last_offset} failed: {exc!r}"
            ) from exc
    return batch


def commit_stored(
    options: Mapping[str, Any],
    topic: str,
    partition: int,
    group_id: str,
    stored_until: Callable[[int], int],
    deleted_unread: Callable[[int, int], object] | None = None,
) -> int | None:
    """Commit `group_id` as far as the stored data reaches without a gap; return its offset.

    `stored_until(start)` says up to which offset everything from `start` on is stored. The
    start is the group's committed offset (or the partition's beginning, if it has none or
    retention deleted past it). The group never moves backwards. When retention deleted past
    the committed offset, `deleted_unread(first, last)` is told the deleted offsets first, so
    that those no batch stored are recorded as lost before the commit moves past them (else
    they would leave the unstored ranges `fraud-dagster status` shows without a trace).
    """
    tp = TopicPartition(topic, partition)
    with closing(_consumer(options, group_id=group_id, enable_auto_commit=False)) as consumer:
        try:
            current = consumer.committed(tp)
            if current is not None and (target := stored_until(current)) > current:
                return _commit_forward(consumer, tp, target)
            # No commit yet, or a gap: start at the beginning if retention deleted past us.
            # (Only on this path: asking for the beginning costs a round trip per batch.)
            beginning = consumer.beginning_offsets([tp])[tp]
            if current is not None and beginning <= current:
                return current
            if current is not None and deleted_unread is not None:
                deleted_unread(current, beginning - 1)
            target = stored_until(beginning)
            if target <= beginning:
                return current
            return _commit_forward(consumer, tp, target)
        except KafkaError as exc:
            raise KafkaUnavailableError(
                f"committing {topic}/{partition} for group {group_id}: {exc!r}"
            ) from exc


def _commit_forward(consumer: KafkaConsumer, tp: TopicPartition, target: int) -> int:
    """Commit `target` unless the group got there meanwhile: two runs of a partition may finish
    together, and the one that read the database first must not move the group back. (Kafka
    has no compare-and-set for offsets; this re-read narrows the window to one round trip.)"""
    latest = consumer.committed(tp)
    if latest is not None and latest >= target:
        return latest
    consumer.commit({tp: OffsetAndMetadata(target, "", -1)})
    return target


def ensure_topic(options: Mapping[str, Any], topic: str, partitions: int) -> None:
    """Create `topic` with `partitions` partitions, or grow it to that many."""
    with _admin(options) as admin:
        try:
            admin.create_topics([NewTopic(topic, partitions, 1)])
            logger.info("created topic %s with %d partition(s)", topic, partitions)
        except TopicAlreadyExistsError:
            described = admin.describe_topics([topic])[0]
            current = len(described["partitions"])
            if current < partitions:
                admin.create_partitions({topic: NewPartitions(partitions)})
                logger.info("grew topic %s from %d to %d partitions", topic, current, partitions)


def producer(options: Mapping[str, Any]) -> KafkaProducer:
    producer_options = {k: v for k, v in options.items() if k in KafkaProducer.DEFAULT_CONFIG}
    try:
        return KafkaProducer(
            **producer_options,
            acks="all",
            linger_ms=20,
            batch_size=256 * 1024,
            compression_type=None,
        )
    except KafkaError as exc:
        raise _unreachable(options, exc) from exc


def send_all(
    kafka_producer: KafkaProducer, topic: str, messages: Iterable[tuple[bytes | None, bytes]]
) -> int:
    """Send (key, value) pairs and wait until the broker acknowledged every one."""
    count = 0
    for key, value in messages:
        kafka_producer.send(topic, key=key, value=value)
        count += 1
    kafka_producer.flush()
    return count
