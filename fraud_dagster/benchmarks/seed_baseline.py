"""The seed's per-message design against the batch pipeline, on the same topic, model and machine.

The seed consumed with a KafkaConsumer loop and, for every message, built a one-row DataFrame,
called model.predict and model.predict_proba, INSERTed and committed each suspicious transaction
and opened one SMTP connection per alert. This benchmark rebuilds that design with the project's
model, features and email rendering, runs it on N messages of a real broker, then runs the batch
pipeline (`pipeline.py`: one batch, one predict_proba, one transaction, a few SMTP sessions) on
the same messages, and prints both rates and their ratio.

Reproduce: python -m fraud_dagster.benchmarks.seed_baseline --count 5000
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import smtplib
import sys
import time
from pathlib import Path

import pandas as pd
import sqlalchemy as sa
from kafka import KafkaConsumer, TopicPartition

from fraud_dagster import kafka_io, pipeline
from fraud_dagster.alert_delivery import deliver_alerts
from fraud_dagster.alerts import render_alert
from fraud_dagster.benchmarks.harness import (
    emit_json,
    fill_topic,
    local_services,
    machine_description,
)
from fraud_dagster.features import compute_features
from fraud_dagster.resources import resolved_resources
from fraud_dagster.storage.schema import metadata, suspicious_transactions

logger = logging.getLogger(__name__)
COMMAND = "python -m fraud_dagster.benchmarks.seed_baseline"


def seed_design(bootstrap: str, topic: str, count: int, model, database_url: str, smtp) -> dict:
    """One message at a time, as the seed did it."""
    engine = sa.create_engine(database_url)
    metadata.create_all(engine)
    consumer = KafkaConsumer(
        bootstrap_servers=[bootstrap], enable_auto_commit=False, auto_offset_reset="earliest"
    )
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    consumer.seek(tp, 0)
    processed = suspicious = 0
    started = time.perf_counter()
    while processed < count:
        for record in consumer.poll(timeout_ms=1000).get(tp, []):
            message = json.loads(record.value)
            row = pd.DataFrame([message])
            row["transaction_date"] = pd.to_datetime(
                row["transaction_date"], utc=True
            ).dt.tz_convert(None)
            row["transaction_amount"] = row["transaction_amount"].astype(float)
            features = compute_features(row)[list(model.entry.features)]
            model.estimator.predict(features)
            probability = float(model.estimator.predict_proba(features)[0, 1])
            if probability >= model.threshold:
                suspicious += 1
                alert = {
                    **message,
                    "transaction_date": row["transaction_date"].iloc[0].to_pydatetime(),
                    "fraud_probability": probability,
                    "threshold": model.threshold,
                    "model_version": model.version,
                }
                with engine.begin() as conn:
                    conn.execute(
                        sa.insert(suspicious_transactions).values(
                            transaction_id=message["transaction_id"],
                            account_id=message["account_id"],
                            merchant=message["merchant"],
                            transaction_amount=float(message["transaction_amount"]),
                            transaction_date=alert["transaction_date"],
                            fraud_probability=probability,
                            threshold=model.threshold,
                            model_version=model.version,
                            detected_at=pd.Timestamp.now().to_pydatetime(),
                        )
                    )
                with smtplib.SMTP(smtp.host, smtp.port, timeout=10) as client:
                    client.send_message(render_alert(alert, smtp.sender, smtp.recipients))
            processed += 1
            if processed >= count:
                break
    seconds = time.perf_counter() - started
    consumer.close()
    engine.dispose()
    return {
        "processed": processed,
        "suspicious": suspicious,
        "seconds": seconds,
        "tx_per_second": processed / seconds,
    }


def batch_design(resources: dict, topic: str, count: int) -> dict:
    """The project's pipeline on the same messages, one batch."""
    engine = resources["database"].get_engine()
    model = resources["model"].load(engine)
    delivery = resources["smtp"].alert_delivery()
    started = time.perf_counter()
    raw = kafka_io.read_range(resources["kafka"].client_options(), topic, 0, 0, count - 1)
    scored = pipeline.score_batch(pipeline.prepare_batch(raw, engine), model)
    pipeline.store_batch(scored, engine, run_id="benchmark")
    report = deliver_alerts(engine, delivery, token="bench", batch=scored.ref)
    seconds = time.perf_counter() - started
    return {
        "processed": len(raw),
        "suspicious": scored.suspicious_count,
        "alerts_sent": report.sent,
        "seconds": seconds,
        "tx_per_second": len(raw) / seconds,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with local_services() as services:
        topic = "bench-seed"
        fill_topic(services, topic, args.count, seed=1)
        seed_url = services.sqlite_url("seed")
        os.environ.update(services.env(topic, services.sqlite_url("batch")))
        resources = resolved_resources(services.settings(topic, services.sqlite_url("batch")))
        model = resources["model"].load()
        seed = seed_design(
            services.bootstrap_servers, topic, args.count, model, seed_url, resources["smtp"]
        )
        batch = batch_design(resources, topic, args.count)
    ratio = batch["tx_per_second"] / seed["tx_per_second"]
    out = sys.stdout
    out.write(f"machine: {machine_description()}\n")
    out.write(f"messages: {args.count} (same topic, same model {model.version})\n")
    out.write(
        f"seed per-message design: {seed['tx_per_second']:>10.1f} tx/s "
        f"({seed['seconds']:.1f} s, {seed['suspicious']} alerts)\n"
    )
    out.write(
        f"batch pipeline:          {batch['tx_per_second']:>10.1f} tx/s "
        f"({batch['seconds']:.2f} s, {batch['suspicious']} alerts)\n"
    )
    out.write(f"ratio batch / seed:      {ratio:>10.1f}x\n")
    out.write(f"reproduce: {COMMAND} --count {args.count}\n")
    emit_json(
        args.json,
        {
            "machine": machine_description(),
            "command": COMMAND,
            "count": args.count,
            "seed": seed,
            "batch": batch,
            "ratio": ratio,
        },
    )


if __name__ == "__main__":
    main()
