"""Per-batch bookkeeping of the operations features: what each batch run pays for them.

* offset commit: the old "commit last + 1" (one consumer: read the group's offset, commit) against
  `kafka_io.commit_stored` (also the partition's beginning and the gap-free end of the stored
  ranges, from the database), each with a fresh consumer as in a batch run;
* `store.contiguous_end` with many stored ranges in the table;
* a batch's read, without and with the consumer group's committed offset (`history_start`),
  and the check it starts with that the broker has the partition (one admin describe);
* the Kafka sensor's lookup each tick: the topic's id from an admin client and the partitions'
  ends from a fresh consumer (before), against `kafka_io.topic_offsets` (one admin client);
* the alert step's outbox claim for a batch without suspicious transactions, with many sent
  alerts in the table, and its look-up of claims left by runs that ended (`abandoned_claims`,
  with a Dagster instance on SQLite): with no claim held, and with three runs holding one.

Each figure is the median of `--repeat` tries (first try discarded), on a real local broker
and a fresh SQLite database.

Reproduce: python -m fraud_dagster.benchmarks.batch_bookkeeping --ranges 10000 --repeat 30
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import closing
from datetime import timedelta

import dagster as dg
import sqlalchemy as sa
from kafka import TopicPartition
from kafka.structs import OffsetAndMetadata

from fraud_dagster import kafka_io
from fraud_dagster.alert_claims import abandoned_claims, claim_token
from fraud_dagster.benchmarks.harness import fill_topic, local_services, machine_description
from fraud_dagster.cli import print_line
from fraud_dagster.storage.batches import contiguous_end
from fraud_dagster.storage.database import create_engine, ensure_schema, utcnow
from fraud_dagster.storage.outbox import claim_alerts
from fraud_dagster.storage.schema import fraud_alerts, stored_ranges

COMMAND = "python -m fraud_dagster.benchmarks.batch_bookkeeping"
BATCH = 100
HOLDERS = 3  # runs at once (dagster.yaml's max_concurrent_runs)


def median_ms(action: Callable[[], object], repeat: int) -> float:
    action()  # warm-up: connections, imports
    timings = []
    for _ in range(repeat):
        started = time.perf_counter()
        action()
        timings.append((time.perf_counter() - started) * 1000)
    return statistics.median(timings)


def plain_commit(options: dict, topic: str, group: str, offset: int) -> None:
    """What the persist step did before: read the group's offset, commit last + 1."""
    tp = TopicPartition(topic, 0)
    with closing(kafka_io._consumer(options, group_id=group, enable_auto_commit=False)) as c:
        current = c.committed(tp)
        if current is None or current < offset:
            c.commit({tp: OffsetAndMetadata(offset, "", -1)})


def consumer_offset_lookup(options: dict, topic: str) -> tuple[object, dict, dict]:
    """What the sensor did each tick before: the id from an admin client, the partitions and
    their ends from a fresh consumer (which waits out kafka-python's metadata backoff)."""
    with kafka_io._admin(options) as admin:
        (described,) = admin.describe_topics([topic])
    with closing(kafka_io._consumer(options, enable_auto_commit=False)) as consumer:
        tps = [TopicPartition(topic, p) for p in kafka_io.partitions_of(consumer, topic)]
        return described.get("topic_id"), consumer.beginning_offsets(tps), consumer.end_offsets(tps)


def hold_claims(engine: sa.Engine, instance: dg.DagsterInstance, runs: int) -> None:
    """`runs` runs under way, each holding the claim of one alert (batch runs side by side)."""
    with engine.begin() as conn:
        for i in range(runs):
            run = instance.add_run(dg.DagsterRun("bench", status=dg.DagsterRunStatus.STARTED))
            conn.execute(
                sa.update(fraud_alerts)
                .where(fraud_alerts.c.transaction_id == f"t{i}")
                .values(status="sending", claimed_by=claim_token(run.run_id), claimed_at=utcnow())
            )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ranges", type=int, default=10_000, help="stored ranges in the table")
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args(argv)
    with local_services() as services:
        topic = "bookkeeping"
        fill_topic(services, topic, 1000)
        options = services.kafka_options()
        engine = create_engine(services.sqlite_url("bookkeeping"))
        ensure_schema(engine)
        now = utcnow()
        with engine.begin() as conn:
            conn.execute(
                sa.insert(stored_ranges),
                [
                    {
                        "source_topic": topic,
                        "source_partition": 0,
                        "first_offset": i * BATCH,
                        "last_offset": i * BATCH + BATCH - 1,
                        "stored_at": now,
                    }
                    for i in range(args.ranges)
                ],
            )
        end = args.ranges * BATCH
        # Groups one batch behind, prepared outside the timings; each try commits a fresh one.
        old_groups = iter([f"old-{i}" for i in range(args.repeat + 1)])
        new_groups = iter([f"new-{i}" for i in range(args.repeat + 1)])
        for i in range(args.repeat + 1):
            plain_commit(options, topic, f"old-{i}", end - BATCH)
            plain_commit(options, topic, f"new-{i}", end - BATCH)

        old_ms = median_ms(lambda: plain_commit(options, topic, next(old_groups), end), args.repeat)
        new_ms = median_ms(
            lambda: kafka_io.commit_stored(
                options,
                topic,
                0,
                next(new_groups),
                lambda start: contiguous_end(engine, topic, 0, start),
            ),
            args.repeat,
        )
        range_ms = median_ms(lambda: contiguous_end(engine, topic, 0, end - BATCH), args.repeat)
        # Reading a batch, and reading it with the group's committed offset (history_start).
        read_ms = median_ms(lambda: kafka_io.read_range(options, topic, 0, 0, 99), args.repeat)
        read_group_ms = median_ms(
            lambda: kafka_io.read_range(options, topic, 0, 0, 99, group_id="new-0"), args.repeat
        )
        check_ms = median_ms(lambda: kafka_io._require_partition(options, topic, 0), args.repeat)
        lookup_before_ms = median_ms(lambda: consumer_offset_lookup(options, topic), args.repeat)
        lookup_ms = median_ms(lambda: kafka_io.topic_offsets(options, topic), args.repeat)

        with engine.connect() as conn:  # sent alerts only; their suspicious rows do not matter
            conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
            conn.execute(
                sa.insert(fraud_alerts),
                [
                    {
                        "transaction_id": f"t{i}",
                        "status": "sent",
                        "attempts": 1,
                        "created_at": now,
                        "sent_at": now,
                    }
                    for i in range(args.ranges)
                ],
            )
            conn.commit()
        claim_ms = median_ms(
            lambda: claim_alerts(engine, "bench", source_range=(topic, 0, end, end + BATCH - 1)),
            args.repeat,
        )
        retry_claim_ms = median_ms(
            lambda: claim_alerts(engine, "bench", limit=500, pending_grace=timedelta(0)),
            args.repeat,
        )
        with tempfile.TemporaryDirectory() as home, dg.DagsterInstance.local_temp(home) as instance:
            no_holder_ms = median_ms(lambda: abandoned_claims(instance, engine), args.repeat)
            hold_claims(engine, instance, HOLDERS)
            holders_ms = median_ms(lambda: abandoned_claims(instance, engine), args.repeat)
        engine.dispose()
    print_line(f"machine: {machine_description()}")
    print_line(f"command: {COMMAND} --ranges {args.ranges} --repeat {args.repeat}")
    print_line(f"offset commit, last + 1 (before):         {old_ms:8.1f} ms")
    print_line(f"offset commit, gap-free stored ranges:    {new_ms:8.1f} ms")
    print_line(f"contiguous_end, {args.ranges} ranges stored:   {range_ms:8.2f} ms")
    print_line(f"read 100 messages:                        {read_ms:8.1f} ms")
    print_line(f"read 100 messages + group's commit:       {read_group_ms:8.1f} ms")
    print_line(f"  of which the partition check:           {check_ms:8.1f} ms")
    print_line(f"sensor lookup, admin + consumer (before): {lookup_before_ms:8.1f} ms")
    print_line(f"sensor lookup, one admin client:          {lookup_ms:8.1f} ms")
    print_line(f"alert claim, batch without alerts:        {claim_ms:8.2f} ms")
    print_line(f"alert claim, retry run, nothing due:      {retry_claim_ms:8.2f} ms")
    print_line(f"claims of ended runs, no claim held:      {no_holder_ms:8.2f} ms")
    print_line(f"claims of ended runs, {HOLDERS} runs hold claims: {holders_ms:8.2f} ms")


if __name__ == "__main__":
    main()
