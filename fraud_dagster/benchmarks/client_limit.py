"""The client's limit: raw kafka-python consume rate (poll + json decode, nothing else).

The pipeline's batch rate reads as a share of this. Measured with kafka-python's default consumer
settings and with the large-fetch settings that batch runs use (`kafka_io._BATCH_CONSUMER_OPTIONS`).

Reproduce: python -m fraud_dagster.benchmarks.client_limit --count 100000
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from kafka import KafkaConsumer, TopicPartition

from fraud_dagster.benchmarks.harness import (
    emit_json,
    fill_topic,
    local_services,
    machine_description,
)
from fraud_dagster.kafka_io import _BATCH_CONSUMER_OPTIONS

COMMAND = "python -m fraud_dagster.benchmarks.client_limit"


def consume_rate(bootstrap: str, topic: str, count: int, options: dict) -> dict:
    consumer = KafkaConsumer(
        bootstrap_servers=[bootstrap], **{"enable_auto_commit": False, **options}
    )
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    consumer.seek(tp, 0)
    decoded = 0
    started = time.perf_counter()
    while decoded < count:
        for record in consumer.poll(timeout_ms=1000).get(tp, []):
            json.loads(record.value)
            decoded += 1
    seconds = time.perf_counter() - started
    consumer.close()
    return {"messages": decoded, "seconds": seconds, "tx_per_second": decoded / seconds}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    results: dict[str, list[dict]] = {"default": [], "batch_options": []}
    with local_services() as services:
        topic = "bench-client-limit"
        fill_topic(services, topic, args.count, seed=2)
        for _ in range(args.repeat):
            results["default"].append(
                consume_rate(services.bootstrap_servers, topic, args.count, {})
            )
            batch_options = {
                k: v for k, v in _BATCH_CONSUMER_OPTIONS.items() if k != "auto_offset_reset"
            }
            results["batch_options"].append(
                consume_rate(services.bootstrap_servers, topic, args.count, batch_options)
            )
    out = sys.stdout
    out.write(f"machine: {machine_description()}\nmessages: {args.count}, runs: {args.repeat}\n")
    best = {}
    for name, runs in results.items():
        rates = sorted(r["tx_per_second"] for r in runs)
        best[name] = rates[-1]
        out.write(
            f"{name:>14}: median {rates[len(rates) // 2]:>9.0f} tx/s, best {rates[-1]:>9.0f} tx/s\n"
        )
    out.write(f"client limit (best of all): {max(best.values()):.0f} tx/s\n")
    out.write(f"reproduce: {COMMAND} --count {args.count}\n")
    emit_json(
        args.json,
        {
            "machine": machine_description(),
            "command": COMMAND,
            "results": results,
            "client_limit_tx_per_second": max(best.values()),
        },
    )


if __name__ == "__main__":
    main()
