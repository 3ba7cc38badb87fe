"""Load test: a backlog of N transactions on a P-partition topic drained by the real dagster-daemon.

Everything runs on this machine, on free ports, in temporary directories: a Kafka broker, an SMTP
server, a PostgreSQL server (application database and Dagster instance storage; `--storage
sqlite` for both on SQLite instead), and `dagster-daemon` loading the production code location
with the repo's dagster.yaml (only `max_concurrent_runs` may be overridden). The topic is filled
first (simulated transactions keyed by account), then the daemon starts and the sensor launches
batch runs until the consumer group's committed offsets reach the end of every partition.

Measured: per-partition lag (end offset minus committed offset) over time, the drain's
throughput (overall, and sustained between 10 % and 90 % drained), the batch runs (count, sizes,
durations, queue waits), the sensor's tick durations. Checked: every produced (partition, offset)
is stored exactly once (scored or rejected), no failed run, one email per suspicious transaction.

Reproduce: python -m fraud_dagster.benchmarks.load_test --messages 1000000 --partitions 4
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import sqlalchemy as sa
import yaml

from fraud_dagster import producer
from fraud_dagster.batching import TAG_FIRST_OFFSET, TAG_LAST_OFFSET, TAG_PARTITION, TAG_TOPIC
from fraud_dagster.benchmarks.harness import (
    Services,
    emit_json,
    kafka_sensor_ticks,
    local_services,
    machine_description,
    percentiles,
)
from fraud_dagster.instance_config import dagster_pg_env, instance_yaml
from fraud_dagster.kafka_io import committed_offsets, ensure_topic, offset_bounds
from fraud_dagster.local_services.dagster_processes import running_daemon
from fraud_dagster.local_services.postgres import DAGSTER_DATABASE, temporary_postgres
from fraud_dagster.sensors import IN_FLIGHT_STATUSES
from fraud_dagster.simulator import SimulationConfig, simulate_transactions, to_messages
from fraud_dagster.storage import schema
from fraud_dagster.storage.database import create_engine, ensure_schema

logger = logging.getLogger(__name__)
COMMAND = "python -m fraud_dagster.benchmarks.load_test"


@dataclass
class Samples:
    """Lag per partition and runs in flight, every `interval` seconds from the daemon's start."""

    seconds: list[float] = field(default_factory=list)
    lag: list[dict[int, int]] = field(default_factory=list)
    runs_in_flight: list[int] = field(default_factory=list)
    load_average: list[float] = field(default_factory=list)


def simulated_messages(count: int, seed: int) -> list[dict]:
    """`count` simulated transactions of 5,000 accounts, dated up to now, as messages."""
    days = max(count // 12_000 + 1, 7)  # about 2.6 transactions per account and day
    while True:
        frame = simulate_transactions(
            SimulationConfig(n_customers=5000, n_terminals=10000, n_days=days, seed=seed)
        )
        if len(frame) >= count:
            break
        days = int(days * 1.3) + 1
    frame = frame.tail(count).reset_index(drop=True)
    frame["transaction_date"] += pd.Timestamp.now() - frame["transaction_date"].max()
    frame["transaction_id"] = [f"L{seed}-{i:09d}" for i in range(len(frame))]
    return to_messages(frame)


def write_instance(home: Path, postgres: bool, max_concurrent_runs: int | None) -> None:
    config = yaml.safe_load(instance_yaml(postgres))
    if max_concurrent_runs is not None:
        config["run_coordinator"]["config"]["max_concurrent_runs"] = max_concurrent_runs
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def drain(
    services: Services,
    topic: str,
    group: str,
    end: dict[int, int],
    instance: dg.DagsterInstance,
    interval: float,
    timeout_seconds: float,
) -> tuple[Samples, float]:
    """Sample lag until every partition's committed offset reaches its end; seconds taken."""
    samples = Samples()
    started = time.monotonic()
    options = services.kafka_options()
    while True:
        elapsed = time.monotonic() - started
        committed = committed_offsets(options, topic, group)
        lag = {p: end[p] - committed.get(p, 0) for p in sorted(end)}
        in_flight = instance.get_runs_count(
            filters=dg.RunsFilter(statuses=IN_FLIGHT_STATUSES, tags={TAG_TOPIC: topic})
        )
        samples.seconds.append(round(elapsed, 2))
        samples.lag.append(lag)
        samples.runs_in_flight.append(in_flight)
        samples.load_average.append(os.getloadavg()[0])
        if not any(lag.values()):
            return samples, elapsed
        if elapsed > timeout_seconds:
            raise SystemExit(f"not drained after {timeout_seconds:.0f} s; lag {lag}")
        time.sleep(interval)


def sustained_rate(samples: Samples, total: int) -> dict[str, float | None]:
    """Messages per second between 10 % and 90 % of the backlog committed."""
    drained = [total - sum(lag.values()) for lag in samples.lag]

    def first_time(fraction: float) -> float | None:
        for t, value in zip(samples.seconds, drained, strict=True):
            if value >= fraction * total:
                return t
        return None

    t10, t90 = first_time(0.1), first_time(0.9)
    rate = 0.8 * total / (t90 - t10) if t10 is not None and t90 and t90 > t10 else None
    return {"t10_seconds": t10, "t90_seconds": t90, "tx_per_second": rate}


def accounting(engine: sa.Engine, topic: str) -> dict[int, dict[str, int]]:
    """Per partition: rows stored (scored + rejected), distinct offsets, first and last offset."""
    parts = [
        sa.select(
            table.c.source_partition.label("partition"), table.c.source_offset.label("offset")
        ).where(table.c.source_topic == topic)
        for table in (schema.scored_transactions, schema.rejected_transactions)
    ]
    stored = sa.union_all(*parts).subquery()
    query = sa.select(
        stored.c.partition,
        sa.func.count(),
        sa.func.count(sa.distinct(stored.c.offset)),
        sa.func.min(stored.c.offset),
        sa.func.max(stored.c.offset),
    ).group_by(stored.c.partition)
    with engine.connect() as conn:
        return {
            int(p): {"rows": rows, "distinct": distinct, "first": first, "last": last}
            for p, rows, distinct, first, last in conn.execute(query)
        }


def table_counts(engine: sa.Engine) -> dict[str, int]:
    tables = {
        "scored": schema.scored_transactions,
        "rejected": schema.rejected_transactions,
        "suspicious": schema.suspicious_transactions,
    }
    with engine.connect() as conn:
        counts = {
            name: conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
            for name, table in tables.items()
        }
        statuses = conn.execute(
            sa.select(schema.fraud_alerts.c.status, sa.func.count()).group_by(
                schema.fraud_alerts.c.status
            )
        ).all()
    counts.update({f"alerts_{status}": count for status, count in statuses})
    return counts


def emailed_transactions(mail_dir: Path) -> Counter[str]:
    """X-Fraud-Transaction-Id of every alert the SMTP server wrote (headers only)."""
    ids: Counter[str] = Counter()
    for path in mail_dir.glob("*.eml"):
        with path.open("rb") as handle:
            for raw in handle:
                if raw in (b"\r\n", b"\n"):
                    break
                if raw.lower().startswith(b"x-fraud-transaction-id:"):
                    ids[raw.split(b":", 1)[1].strip().decode()] += 1
                    break
    return ids


def run_figures(instance: dg.DagsterInstance, topic: str) -> dict:
    records = instance.get_run_records(filters=dg.RunsFilter(tags={TAG_TOPIC: topic}))
    finished = [r for r in records if r.dagster_run.is_finished and r.end_time]
    sizes = [
        int(r.dagster_run.tags[TAG_LAST_OFFSET]) - int(r.dagster_run.tags[TAG_FIRST_OFFSET]) + 1
        for r in finished
    ]
    durations = [r.end_time - r.start_time for r in finished if r.start_time]
    waits = [r.start_time - r.create_timestamp.timestamp() for r in finished if r.start_time]
    per_partition = Counter(r.dagster_run.tags[TAG_PARTITION] for r in finished)
    successful = [r.dagster_run.run_id for r in finished if r.dagster_run.status.value == "SUCCESS"]
    return {
        "phases": run_phases(instance, successful),
        "runs": len(records),
        "statuses": dict(Counter(r.dagster_run.status.value for r in records)),
        "retried_runs": sum(1 for r in records if "dagster/retry_number" in r.dagster_run.tags),
        "runs_per_partition": dict(sorted(per_partition.items())),
        "batch_size": percentiles(sizes),
        "run_start_to_end_seconds": percentiles(durations),
        "run_queue_wait_seconds": percentiles(waits),
        "seconds_per_message_in_run": (sum(durations) / sum(sizes)) if sizes else None,
    }


def run_phases(instance: dg.DagsterInstance, run_ids: list[str]) -> dict:
    """Where a batch run's time goes, from its own event log: queue, launch (process start,
    imports, code location), set-up before the first step, each step, and the end."""
    E = dg.DagsterEventType
    phases: dict[str, list[float]] = {}

    def add(name: str, value: float) -> None:
        phases.setdefault(name, []).append(value)

    for run_id in run_ids:
        first: dict[str, float] = {}
        step_start: dict[str, float] = {}
        last_step_end = None
        for record in instance.all_logs(run_id):
            event = record.dagster_event
            if event is None:
                continue
            kind, at = event.event_type, record.timestamp
            first.setdefault(kind, at)
            if kind == E.STEP_START:
                step_start[event.step_key] = at
            elif kind == E.STEP_SUCCESS and event.step_key in step_start:
                add(f"step {event.step_key.rsplit('.', 1)[-1]}", at - step_start[event.step_key])
                last_step_end = at
        if {E.RUN_ENQUEUED, E.RUN_DEQUEUED} <= first.keys():
            add("queued", first[E.RUN_DEQUEUED] - first[E.RUN_ENQUEUED])
        if {E.RUN_STARTING, E.RUN_START} <= first.keys():
            add("launch (STARTING -> START)", first[E.RUN_START] - first[E.RUN_STARTING])
        if {E.RUN_START, E.STEP_START} <= first.keys():
            add("set-up (START -> first step)", first[E.STEP_START] - first[E.RUN_START])
        if last_step_end is not None and E.RUN_SUCCESS in first:
            add("end (last step -> SUCCESS)", first[E.RUN_SUCCESS] - last_step_end)
    return {name: percentiles(values) for name, values in phases.items()}


def sensor_ticks(instance: dg.DagsterInstance) -> dict:
    ticks = kafka_sensor_ticks(instance)
    if not ticks:
        return {"ticks": 0}
    durations = [t.end_timestamp - t.timestamp for t in ticks if t.end_timestamp]
    intervals = np.diff([t.timestamp for t in ticks]).tolist()
    with_runs = [t for t in ticks if t.run_ids and t.end_timestamp]
    return {
        "ticks": len(ticks),
        "with_runs": len(with_runs),
        "runs_requested": sum(len(t.run_ids) for t in with_runs),
        # a tick that requests runs creates each of them in the instance before it ends
        "seconds_per_requested_run": (
            sum(t.end_timestamp - t.timestamp for t in with_runs)
            / sum(len(t.run_ids) for t in with_runs)
            if with_runs
            else None
        ),
        "duration_seconds_without_runs": percentiles(
            [t.end_timestamp - t.timestamp for t in ticks if t.end_timestamp and not t.run_ids]
        ),
        "duration_seconds": percentiles(durations),
        "interval_seconds": percentiles(intervals),
    }


def plot(path: Path, samples: Samples, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(10, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    for partition in sorted(samples.lag[0]):
        top.plot(
            samples.seconds,
            [lag[partition] for lag in samples.lag],
            label=f"partition {partition}",
        )
    top.set_ylabel("lag (end offset - committed offset)")
    top.set_title(title)
    top.legend(loc="upper right")
    top.grid(alpha=0.3)
    bottom.step(samples.seconds, samples.runs_in_flight, where="post", color="tab:grey")
    bottom.set_ylabel("runs queued\nor running")
    bottom.set_xlabel("seconds since dagster-daemon started")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict:
    topic = f"load-{args.partitions}p-{args.messages}"
    with ExitStack() as stack:
        services = stack.enter_context(local_services())
        if args.storage == "postgresql":
            postgres = stack.enter_context(temporary_postgres(prefix="fraud-load-pg-"))
            database_url = postgres.url()
            storage_env = dagster_pg_env(postgres.url(DAGSTER_DATABASE))
        else:
            database_url, storage_env = services.sqlite_url("load"), {}
        env = services.env(
            topic,
            database_url,
            FRAUD_SENSOR_INTERVAL_SECONDS=str(args.sensor_interval),
            FRAUD_MAX_BATCH_SIZE=str(args.max_batch_size),
            **storage_env,
        )
        home = services.work_dir / "dagster_home"
        write_instance(home, args.storage == "postgresql", args.max_concurrent_runs)
        os.environ.update(storage_env)  # this process reads the instance too

        started = time.monotonic()
        messages = simulated_messages(args.messages, args.seed)
        generate_seconds = time.monotonic() - started
        ensure_topic(services.kafka_options(), topic, args.partitions)
        report = producer.produce(
            services.kafka_options(), topic, messages, total=len(messages), show_progress=False
        )
        del messages
        beginning, end = offset_bounds(services.kafka_options(), topic)
        assert sum(end.values()) - sum(beginning.values()) == report.sent
        engine = create_engine(database_url)
        ensure_schema(engine)
        logger.warning(
            "produced %d messages in %.0f s (%.0f/s); draining with dagster-daemon",
            report.sent,
            report.seconds,
            report.rate,
        )

        with running_daemon(home, env, services.work_dir / "daemon.log"):
            with dg.DagsterInstance.from_config(str(home)) as instance:
                samples, drain_seconds = drain(
                    services,
                    topic,
                    env["FRAUD_KAFKA_CONSUMER_GROUP"],
                    end,
                    instance,
                    args.sample_interval,
                    args.timeout_seconds,
                )
                time.sleep(max(args.sensor_interval, 2) + 3)  # last alert steps and ticks end
                runs = run_figures(instance, topic)
                ticks = sensor_ticks(instance)
            log_tail = (services.work_dir / "daemon.log").read_text(errors="replace")[-3000:]

        per_partition = accounting(engine, topic)
        counts = table_counts(engine)
        engine.dispose()
        emailed = emailed_transactions(services.mail_dir)
    exactly_once = {
        p: per_partition.get(p, {}).get("rows") == end[p] - beginning[p]
        and per_partition[p]["distinct"] == end[p] - beginning[p]
        and per_partition[p]["first"] == beginning[p]
        and per_partition[p]["last"] == end[p] - 1
        for p in end
    }
    result = {
        "machine": machine_description(),
        "command": reproduce_command(args),
        "settings": {
            "messages": args.messages,
            "partitions": args.partitions,
            "storage": args.storage,
            "sensor_interval_seconds": args.sensor_interval,
            "max_batch_size": args.max_batch_size,
            "max_concurrent_runs": args.max_concurrent_runs
            or yaml.safe_load(instance_yaml())["run_coordinator"]["config"]["max_concurrent_runs"],
        },
        "generate_seconds": generate_seconds,
        "produce": {"sent": report.sent, "seconds": report.seconds, "rate": report.rate},
        "end_offsets": end,
        "drain_seconds": drain_seconds,
        "overall_tx_per_second": report.sent / drain_seconds,
        "sustained": sustained_rate(samples, report.sent),
        "exactly_once_per_partition": exactly_once,
        "stored_per_partition": per_partition,
        "counts": counts,
        "emails": {
            "received": sum(emailed.values()),
            "distinct_transactions": len(emailed),
            "duplicates": sum(1 for n in emailed.values() if n > 1),
        },
        "runs": runs,
        "sensor": ticks,
        "samples": {
            "seconds": samples.seconds,
            "lag": samples.lag,
            "runs_in_flight": samples.runs_in_flight,
            "load_average_1min": samples.load_average,
        },
        "load_average_1min": percentiles(samples.load_average),
        "daemon_log_tail": log_tail if not all(exactly_once.values()) else "",
    }
    if args.plot:
        settings = result["settings"]
        plot(
            args.plot,
            samples,
            f"{report.sent:,} transactions, {args.partitions} partitions, "
            f"max batch {args.max_batch_size}, {settings['max_concurrent_runs']} concurrent runs, "
            f"{args.storage}",
        )
    return result


def reproduce_command(args: argparse.Namespace) -> str:
    parts = [
        COMMAND,
        f"--messages {args.messages}",
        f"--partitions {args.partitions}",
        f"--storage {args.storage}",
        f"--sensor-interval {args.sensor_interval}",
        f"--max-batch-size {args.max_batch_size}",
    ]
    if args.max_concurrent_runs:
        parts.append(f"--max-concurrent-runs {args.max_concurrent_runs}")
    return " ".join(parts)


def report_lines(result: dict) -> list[str]:
    runs, sensor, sustained = result["runs"], result["sensor"], result["sustained"]
    ok = all(result["exactly_once_per_partition"].values())
    counts, emails = result["counts"], result["emails"]
    alerts = {k.removeprefix("alerts_"): v for k, v in counts.items() if k.startswith("alerts_")}

    def fmt(stats: dict, unit: str = "s") -> str:
        if stats.get("p50") is None:
            return "n/a"
        return ", ".join(f"{k} {stats[k]:.2f}{unit}" for k in ("p50", "p95", "max"))

    sustained_text = (
        f"{sustained['tx_per_second']:.0f} tx/s (10 % -> 90 % drained: "
        f"{sustained['t10_seconds']:.0f} s -> {sustained['t90_seconds']:.0f} s)"
        if sustained["tx_per_second"]
        else "n/a"
    )
    return [
        f"machine: {result['machine']}",
        f"settings: {result['settings']}",
        f"produced {result['produce']['sent']} messages in {result['produce']['seconds']:.0f} s "
        f"({result['produce']['rate']:.0f}/s); end offsets {result['end_offsets']}",
        f"drained in {result['drain_seconds']:.0f} s: {result['overall_tx_per_second']:.0f} tx/s "
        f"overall, sustained {sustained_text}",
        f"exactly once (scored + rejected = produced, every offset once) per partition: "
        f"{result['exactly_once_per_partition']} -> {'OK' if ok else 'FAILED'}",
        f"stored: {counts['scored']} scored, {counts['rejected']} rejected, "
        f"{counts['suspicious']} suspicious; alerts {alerts}; emails {emails['received']} for "
        f"{emails['distinct_transactions']} transactions, {emails['duplicates']} duplicated",
        f"runs: {runs['runs']} {runs['statuses']}, retried {runs['retried_runs']}, per partition "
        f"{runs['runs_per_partition']}",
        f"batch size: {fmt(runs['batch_size'], '')}; "
        f"run seconds per message: {runs['seconds_per_message_in_run'] or 0:.6f}",
        f"run start->end: {fmt(runs['run_start_to_end_seconds'])}; "
        f"queue wait: {fmt(runs['run_queue_wait_seconds'])}",
        f"sensor: {sensor.get('ticks')} ticks ({sensor.get('with_runs')} with runs), "
        f"duration {fmt(sensor.get('duration_seconds', {}))}, "
        f"interval {fmt(sensor.get('interval_seconds', {}))}",
        f"sensor ticks without runs: {fmt(sensor.get('duration_seconds_without_runs', {}))}; "
        f"ticks with runs: {sensor.get('seconds_per_requested_run') or 0:.2f} s per requested run "
        f"({sensor.get('runs_requested')} runs)",
        *(f"  {name}: {fmt(stats)}" for name, stats in runs["phases"].items()),
        f"load average (1 min) while draining: {fmt(result['load_average_1min'], '')}",
        f"reproduce: {result['command']}",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--storage", choices=["postgresql", "sqlite"], default="postgresql")
    parser.add_argument("--sensor-interval", type=int, default=2, help="seconds")
    parser.add_argument("--max-batch-size", type=int, default=20_000, help="FRAUD_MAX_BATCH_SIZE")
    parser.add_argument(
        "--max-concurrent-runs", type=int, default=None, help="default: dagster.yaml's"
    )
    parser.add_argument("--sample-interval", type=float, default=2.0, help="lag sampling, s")
    parser.add_argument("--timeout-seconds", type=float, default=3 * 3600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", type=Path, default=None, help="PNG of lag per partition")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    result = run(args)
    sys.stdout.write("\n".join(report_lines(result)) + "\n")
    emit_json(args.json, result)
    if not all(result["exactly_once_per_partition"].values()) or result["emails"]["duplicates"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
