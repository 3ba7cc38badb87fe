"""Streaming latency through the real dagster-daemon, at fixed produce rates.

For each rate: a fresh topic and database, a real `dagster-daemon` (QueuedRunCoordinator and run
launcher from the repo's dagster.yaml) loading the production code location, a producer sending
at the rate for a bounded time. Latencies come from the stores themselves: the Kafka message
timestamp (producer time) against `scored_transactions.scored_at` (row stored) and against the
time the SMTP server wrote the alert (email received). Lag (messages produced but not yet stored)
is sampled every second. Before the first rate, the daemon runs a sample of trivial runs (four
no-op ops, same code location and launcher) requested by a sensor: that request -> success time is
the floor Dagster puts under every batch run.

Reproduce: python -m fraud_dagster.benchmarks.latency --rates 200 1000 --seconds 60
(`--cards 1000000` spreads the simulator's 500 customers over a million card numbers;
`--storage postgresql` puts the application database on a throw-away PostgreSQL server.)
"""

from __future__ import annotations

import argparse
import contextlib
import email
import email.policy
import json
import logging
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import numpy as np
import sqlalchemy as sa

from fraud_dagster import kafka_io, producer
from fraud_dagster.batching import TAG_FIRST_OFFSET, TAG_LAST_OFFSET, TAG_TOPIC
from fraud_dagster.benchmarks.harness import (
    Services,
    add_cards_option,
    emit_json,
    kafka_sensor_ticks,
    local_services,
    machine_description,
    percentiles,
)
from fraud_dagster.benchmarks.latency_location import FLOOR_TAG
from fraud_dagster.kafka_io import ensure_topic
from fraud_dagster.local_services.dagster_processes import running_daemon
from fraud_dagster.local_services.postgres import LocalPostgres, temporary_postgres
from fraud_dagster.settings import PROJECT_ROOT
from fraud_dagster.simulator import to_messages
from fraud_dagster.storage.rollups import DAY
from fraud_dagster.storage.schema import account_rollups, scored_transactions

logger = logging.getLogger(__name__)
COMMAND = "python -m fraud_dagster.benchmarks.latency"
SUMMED = "history summed"  # per run: stored transactions its features read as band sums


@dataclass
class Phase:
    rate: int
    seconds: int
    cards: int = 0  # 0: the simulator's 500 customers, each one card
    produced: int = 0
    lag_samples: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, lag)
    started_at: float = 0.0


def write_workspace(home: Path) -> Path:
    """A workspace with the latency location (production jobs plus the trivial floor job)."""
    workspace = home / "workspace.yaml"
    workspace.write_text(
        "load_from:\n  - python_module:\n"
        "      module_name: fraud_dagster.benchmarks.latency_location\n"
        f"      location_name: fraud_dagster\n      working_directory: {PROJECT_ROOT}\n"
    )
    return workspace


def run_durations(instance: dg.DagsterInstance, tags: dict[str, str]) -> list[dict]:
    """create -> end seconds of finished runs with `tags`."""
    records = instance.get_run_records(filters=dg.RunsFilter(tags=tags))
    return [
        {
            "status": record.dagster_run.status.value,
            "request_to_end_seconds": record.end_time - record.create_timestamp.timestamp(),
            "start_to_end_seconds": record.end_time - record.start_time
            if record.start_time
            else None,
        }
        for record in records
        if record.dagster_run.is_finished and record.end_time
    ]


def run_phases(instance: dg.DagsterInstance, tags: dict[str, str]) -> list[dict[str, float]]:
    """Per finished run with `tags`, oldest first: when it was requested (epoch seconds), how many
    offsets it held, the queue and launch (request -> the run worker's first step), each
    step's seconds, by step name, and the stored transactions its features summed (`SUMMED`,
    from the preprocess output's metadata)."""
    runs = []
    for record in instance.get_run_records(filters=dg.RunsFilter(tags=tags)):
        if not record.dagster_run.is_finished:
            continue
        run_tags = record.dagster_run.tags
        phases = {"requested_at": record.create_timestamp.timestamp()}
        if TAG_FIRST_OFFSET in run_tags and TAG_LAST_OFFSET in run_tags:
            phases["offsets"] = int(run_tags[TAG_LAST_OFFSET]) - int(run_tags[TAG_FIRST_OFFSET]) + 1
        stats = instance.get_run_step_stats(record.dagster_run.run_id)
        starts = [st.start_time for st in stats if st.start_time]
        if starts:
            phases["request -> first step"] = min(starts) - phases["requested_at"]
        for st in stats:
            if st.start_time and st.end_time:
                phases[st.step_key.rsplit(".", 1)[-1]] = st.end_time - st.start_time
        summed = _history_summed(instance, record.dagster_run.run_id)
        if summed is not None:
            phases[SUMMED] = summed
        runs.append(phases)
    return sorted(runs, key=lambda phases: phases["requested_at"])


def _history_summed(instance: dg.DagsterInstance, run_id: str) -> int | None:
    """Stored transactions the run's features summed (accounts and merchants), if it says."""
    for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_OUTPUT):
        event = entry.dagster_event
        if event is None or not event.step_key or not event.step_key.endswith("preprocess"):
            continue
        metadata = {k: v.value for k, v in event.event_specific_data.metadata.items()}
        if "account_history_summed" in metadata:
            return int(metadata["account_history_summed"] + metadata["merchant_history_summed"])
    return None


def step_profile(runs: list[dict[str, float]]) -> dict[str, float]:
    """Mean seconds per phase over `runs` (see `run_phases`)."""
    names = {name for phases in runs for name in phases} - {"requested_at", "offsets", SUMMED}
    return {
        name: float(np.mean([phases[name] for phases in runs if name in phases]))
        for name in sorted(names)
    }


def per_minute(runs: list[dict[str, float]], since: float) -> list[dict[str, float]]:
    """`runs` grouped by the minute they were requested in (from `since`): how many, their mean
    offsets and mean seconds per phase; shows which phase grows when the lag does."""
    minutes: dict[int, list[dict[str, float]]] = {}
    for phases in runs:
        minutes.setdefault(int((phases["requested_at"] - since) // 60), []).append(phases)
    return [
        {
            "minute": minute,
            "runs": len(group),
            "offsets": float(np.mean([phases.get("offsets", 0) for phases in group])),
            SUMMED: float(np.mean([phases.get(SUMMED, 0) for phases in group])),
            **step_profile(group),
        }
        for minute, group in sorted(minutes.items())
        if minute >= 0
    ]


def sensor_tick_timing(instance: dg.DagsterInstance, since: float) -> dict[str, dict]:
    """The Kafka sensor's ticks after `since`: seconds between them (the interval actually in
    effect: Dagster's sensor loop runs every 5 s and skips a sensor whose interval has not
    passed), and how long one took, with run requests and without (the sensor's reads, and the
    daemon creating and queueing the runs: part of every message's latency, not of the floor)."""
    ticks = kafka_sensor_ticks(instance, after=since)
    finished = [t for t in ticks if t.end_timestamp is not None]
    return {
        "spacing": percentiles(np.diff([tick.timestamp for tick in ticks]).tolist()),
        "requesting": percentiles([t.end_timestamp - t.timestamp for t in finished if t.run_ids]),
        "skipped": percentiles([t.end_timestamp - t.timestamp for t in finished if not t.run_ids]),
    }


def measure_floor(instance: dg.DagsterInstance, runs: int, timeout_seconds: float) -> list[dict]:
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        finished = run_durations(instance, {FLOOR_TAG: "1"})
        if len(finished) >= runs:
            return finished
        time.sleep(1)
    raise SystemExit(
        f"only {len(run_durations(instance, {FLOOR_TAG: '1'}))} of {runs} floor runs finished"
    )


def stored_count(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return conn.execute(
            sa.select(sa.func.count()).select_from(scored_transactions)
        ).scalar_one()


def produce_at_rate(services: Services, topic: str, phase: Phase, engine: sa.Engine) -> None:
    """Send `rate` messages per second for `seconds`, sampling lag every second meanwhile."""
    count = phase.rate * phase.seconds
    transactions = producer.synthetic_transactions(count, seed=phase.rate)
    messages = to_messages(producer.spread_over_cards(transactions, phase.cards, seed=phase.rate))
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            lag = phase.produced - stored_count(engine)
            phase.lag_samples.append((time.time() - phase.started_at, max(lag, 0)))
            stop.wait(1.0)

    sampler = threading.Thread(target=sample, daemon=True)
    phase.started_at = time.time()
    sampler.start()
    client = kafka_io.producer(services.kafka_options())
    try:
        for i, message in enumerate(messages):
            due = phase.started_at + i / phase.rate
            delay = due - time.time()
            if delay > 0:
                time.sleep(delay)
            message["transaction_date"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            client.send(
                topic, key=str(message["account_id"]).encode(), value=json.dumps(message).encode()
            )
            phase.produced = i + 1
        client.flush()
    finally:
        client.close()
    deadline = time.time() + 300
    while stored_count(engine) < count and time.time() < deadline:
        time.sleep(1)
    stop.set()
    sampler.join()
    phase.lag_samples.append((time.time() - phase.started_at, max(count - stored_count(engine), 0)))


def email_latencies(mail_dir: Path, produced_ms: dict[str, float]) -> list[tuple[float, float]]:
    """(produce time, produce -> received seconds) of each alert email the SMTP server wrote."""
    latencies = []
    for path in mail_dir.glob("*.eml"):
        message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        tid = message["X-Fraud-Transaction-Id"]
        if tid in produced_ms:
            received = datetime.strptime(path.name.split("-")[0], "%Y%m%dT%H%M%S%f").replace(
                tzinfo=UTC
            )
            produced = produced_ms[tid] / 1000
            latencies.append((produced, received.timestamp() - produced))
    return latencies


def run_phase(
    services: Services,
    home: Path,
    phase: Phase,
    args: argparse.Namespace,
    floor_runs: int,
    postgres: LocalPostgres | None = None,
) -> dict:
    topic = f"latency-{phase.rate}"
    database_url = (
        postgres.create_database(f"latency_{phase.rate}")
        if postgres
        else services.sqlite_url(f"latency-{phase.rate}")
    )
    ensure_topic(services.kafka_options(), topic, args.partitions)
    env = services.env(
        topic,
        database_url,
        FRAUD_SENSOR_INTERVAL_SECONDS=str(args.sensor_interval),
        FRAUD_MAX_BATCH_SIZE=str(args.max_batch_size),
        FRAUD_FLOOR_RUNS=str(floor_runs),
    )
    mail_dir = services.mail_dir
    shutil.rmtree(mail_dir, ignore_errors=True)
    mail_dir.mkdir(parents=True)
    engine = sa.create_engine(database_url)
    daemon_log = services.work_dir / "daemon.log"
    with (
        running_daemon(home, env, daemon_log, write_workspace(home)),
        dg.DagsterInstance.from_config(str(home)) as instance,
    ):
        floor = measure_floor(instance, floor_runs, 600) if floor_runs else []
        _wait_for_schema(engine)
        produce_at_rate(services, topic, phase, engine)
        time.sleep(args.sensor_interval + 5)  # let the last alerts go out
        runs = run_durations(instance, {TAG_TOPIC: topic})
        phases = run_phases(instance, {TAG_TOPIC: topic})
        steps = step_profile(phases)
        ticks = sensor_tick_timing(instance, phase.started_at)
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(
                scored_transactions.c.transaction_id,
                scored_transactions.c.kafka_timestamp,
                scored_transactions.c.scored_at,
            )
        ).all()
        # Account-days whose rollups a write started: on PostgreSQL, at most this many writes
        # took the table lock that starting them needs (`storage.rollups.may_start_rollups`).
        rollup_days = conn.execute(
            sa.select(sa.func.count()).where(account_rollups.c.level == DAY)
        ).scalar_one()
    engine.dispose()
    produced_ms = {
        row.transaction_id: row.kafka_timestamp.replace(tzinfo=UTC).timestamp() * 1000
        for row in rows
    }
    stored = [(row.scored_at - row.kafka_timestamp).total_seconds() for row in rows]
    emails = email_latencies(mail_dir, produced_ms)
    produce_end = phase.seconds
    lag = phase.lag_samples
    during = [value for t, value in lag if t <= produce_end]
    third = max(len(during) // 3, 1)
    result = {
        "rate": phase.rate,
        "seconds": phase.seconds,
        "produced": phase.produced,
        "stored": len(rows),
        "emails": len(emails),
        "stored_latency_seconds": percentiles(stored),
        "email_latency_seconds": percentiles([latency for _, latency in emails]),
        "sustained_tx_per_second": len(rows) / max(max(t for t, _ in lag) if lag else 1, 1),
        "lag_first_third_mean": float(np.mean(during[:third])) if during else None,
        "lag_last_third_mean": float(np.mean(during[-third:])) if during else None,
        "lag_max": max((v for _, v in lag), default=0),
        # From the first minute (the lag filling up to its sawtooth) until the producer stops.
        "lag_trend": lag_trend(lag, 60, produce_end),
        "batch_runs": len(runs),
        "batch_run_request_to_end_seconds": percentiles(
            [r["request_to_end_seconds"] for r in runs]
        ),
        "failed_runs": sum(1 for r in runs if r["status"] != "SUCCESS"),
        "rollup_days_started": rollup_days,
        "batch_run_mean_seconds_by_phase": steps,
        "batch_runs_by_minute": per_minute(phases, phase.started_at),
        "sensor_tick_spacing_seconds": ticks["spacing"],
        "sensor_tick_seconds_requesting_runs": ticks["requesting"],
        "sensor_tick_seconds_skipped": ticks["skipped"],
        "lag_samples": lag,
        "floor": floor,
    }
    if args.plot_dir:
        # One file per rate and duration: a 180-s run must not replace the 60-s plot.
        cards = f"-{phase.cards}cards" if phase.cards else ""
        partitions = f"-{args.partitions}partitions" if args.partitions != 1 else ""
        storage = "-postgresql" if postgres else ""
        name = f"latency-{phase.rate}-{phase.seconds}s{cards}{partitions}{storage}.png"
        _plot(args.plot_dir / name, phase, rows, emails)
    return result


def lag_trend(samples: list[tuple[float, int]], start: float, end: float) -> dict | None:
    """The lag's least-squares slope (messages a minute) and mean over samples in [start, end].

    The lag is a sawtooth of one tick's messages; a third against a third moves with where the
    teeth fall, the slope over the whole span does not.
    """
    points = [(t, lag) for t, lag in samples if start <= t <= end]
    if len(points) < 2 or points[0][0] == points[-1][0]:
        return None
    times, lags = np.array(points, dtype=float).T
    return {"per_minute": float(np.polyfit(times, lags, 1)[0] * 60), "mean": float(lags.mean())}


def _wait_for_schema(engine: sa.Engine) -> None:
    from fraud_dagster.storage.database import ensure_schema

    ensure_schema(engine)


def _minute_line(result: dict, minute: dict) -> str:
    """One minute of a rate: its lag's trough and peak, its runs' size and phases."""
    start = minute["minute"] * 60
    lags = [lag for t, lag in result["lag_samples"] if start <= t < start + 60]
    phases = ("request -> first step", "fetch", "preprocess", "score", "persist", "alert")
    return (
        f"  min {minute['minute']:>2}: lag {min(lags, default=0):>6}-{max(lags, default=0):<6} "
        f"runs {minute['runs']:>2}, offsets {minute['offsets']:>6.0f}, "
        f"history summed {minute.get(SUMMED, 0):>9.0f}; "
        + ", ".join(f"{name} {minute[name]:.2f}" for name in phases if name in minute)
    )


def _plot(path: Path, phase: Phase, rows, emails: list[tuple[float, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    start = phase.started_at
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    produced_at = [row.kafka_timestamp.replace(tzinfo=UTC).timestamp() - start for row in rows]
    stored_latency = [(row.scored_at - row.kafka_timestamp).total_seconds() for row in rows]
    top.scatter(produced_at, stored_latency, s=2, alpha=0.3, label="produce -> row stored")
    email_points = [(produced - start, latency) for produced, latency in emails]
    if email_points:
        xs, ys = zip(*email_points, strict=True)
        top.scatter(xs, ys, s=8, color="tab:red", label="produce -> email received")
    top.set_ylabel("latency (s)")
    accounts = f", {phase.cards:,} cards" if phase.cards else ""
    top.set_title(f"{phase.rate} tx/s for {phase.seconds} s through dagster-daemon{accounts}")
    top.legend(loc="upper left")
    times, lags = zip(*phase.lag_samples, strict=True) if phase.lag_samples else ([], [])
    bottom.plot(times, lags, color="tab:green")
    bottom.axvline(phase.seconds, color="grey", linestyle="--", label="producer stops")
    bottom.set_xlabel("seconds since the producer started")
    bottom.set_ylabel("lag (messages not yet stored)")
    bottom.legend(loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rates", type=int, nargs="+", default=[200, 1000])
    parser.add_argument("--seconds", type=int, default=60, help="producing time per rate")
    parser.add_argument("--sensor-interval", type=int, default=5)
    parser.add_argument("--max-batch-size", type=int, default=20_000)
    parser.add_argument("--partitions", type=int, default=1)
    add_cards_option(parser)
    parser.add_argument("--storage", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--floor-runs", type=int, default=20)
    parser.add_argument("--plot-dir", type=Path, default=PROJECT_ROOT / "docs")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    results = []
    application_server = (
        temporary_postgres(prefix="fraud-latency-pg-")
        if args.storage == "postgresql"
        else contextlib.nullcontext()
    )
    with local_services() as services, application_server as postgres:
        home = services.work_dir / "dagster_home"
        home.mkdir()
        shutil.copyfile(PROJECT_ROOT / "dagster.yaml", home / "dagster.yaml")
        for i, rate in enumerate(args.rates):
            phase = Phase(rate=rate, seconds=args.seconds, cards=args.cards)
            floor_runs = args.floor_runs if i == 0 else 0
            results.append(run_phase(services, home, phase, args, floor_runs, postgres))
    floor = results[0]["floor"] if results else []
    floor_stats = percentiles([r["request_to_end_seconds"] for r in floor])
    _print(args, results, floor_stats)
    emit_json(
        args.json,
        {
            "machine": machine_description(),
            "command": COMMAND,
            "args": {k: str(v) for k, v in vars(args).items()},
            "floor_request_to_end_seconds": floor_stats,
            "results": results,
        },
    )


def _fmt(value: float | None) -> str:
    return "   n/a" if value is None else f"{value:6.2f}"


def _print(args: argparse.Namespace, results: list[dict], floor: dict) -> None:
    lines = [
        f"machine: {machine_description()}",
        f"sensor interval {args.sensor_interval} s, max batch {args.max_batch_size}, "
        f"{args.partitions} partition(s), {args.seconds} s per rate, "
        f"{args.cards or 'the simulated'} accounts, {args.storage} application database",
        f"floor (trivial run, request -> success): p50 {_fmt(floor['p50'])} s, "
        f"p95 {_fmt(floor['p95'])} s",
        " | ".join(
            [
                f"{'rate':>6} {'sent':>7} {'stored':>7} {'emails':>6}",
                f"{'stored p50':>10} {'p95':>6} {'p99':>6}",
                f"{'email p50':>9} {'p95':>6} {'p99':>6}",
                f"{'tx/s':>7} {'lag 1st/3':>9} {'lag last/3':>10} {'runs':>5}",
            ]
        ),
    ]
    for r in results:
        s, e = r["stored_latency_seconds"], r["email_latency_seconds"]
        lines.append(
            " | ".join(
                [
                    f"{r['rate']:>6} {r['produced']:>7} {r['stored']:>7} {r['emails']:>6}",
                    f"{_fmt(s['p50']):>10} {_fmt(s['p95'])} {_fmt(s['p99'])}",
                    f"{_fmt(e['p50']):>9} {_fmt(e['p95'])} {_fmt(e['p99'])}",
                    f"{r['sustained_tx_per_second']:>7.0f} {r['lag_first_third_mean'] or 0:>9.0f} "
                    f"{r['lag_last_third_mean'] or 0:>10.0f} {r['batch_runs']:>5}",
                ]
            )
        )
    for r in results:
        spacing = r["sensor_tick_spacing_seconds"]
        took = r["sensor_tick_seconds_requesting_runs"]
        idle = r["sensor_tick_seconds_skipped"]
        lines.append(
            f"{r['rate']} tx/s: sensor ticks every {_fmt(spacing['p50']).strip()} s (p50), "
            f"mean {_fmt(spacing['mean']).strip()} s, one requesting runs taking "
            f"{_fmt(took['p50']).strip()} (p50) / {_fmt(took['p95']).strip()} s (p95), one with "
            f"nothing to request {_fmt(idle['p50']).strip()} s (p50); batch run, mean s: "
            + ", ".join(f"{k} {v:.2f}" for k, v in r["batch_run_mean_seconds_by_phase"].items())
        )
        trend = r["lag_trend"]
        if trend is not None:
            lines.append(
                f"{r['rate']} tx/s: lag trend {trend['per_minute']:+.1f} messages a minute, "
                f"mean {trend['mean']:.0f} (least squares, minute 1 to the producer's end)"
            )
        lines.append(
            f"{r['rate']} tx/s: {r['failed_runs']} runs failed; rollups started for "
            f"{r['rollup_days_started']} account-days"
        )
    for r in results:
        if len(r["batch_runs_by_minute"]) > 2:
            lines.append(f"{r['rate']} tx/s by minute of request (mean s per phase):")
            lines.extend(_minute_line(r, minute) for minute in r["batch_runs_by_minute"])
    for r in results:
        email_p95 = r["email_latency_seconds"]["p95"]
        if r["rate"] == 200 and email_p95 is not None and floor["p95"] is not None:
            budget = floor["p95"] + args.sensor_interval + 2
            verdict = "met" if email_p95 <= budget else "MISSED"
            lines.append(
                f"target at 200 tx/s: email p95 {email_p95:.2f} s <= floor p95 {floor['p95']:.2f} "
                f"+ interval {args.sensor_interval} + 2 = {budget:.2f} s: {verdict}"
            )
    rates = " ".join(str(r["rate"]) for r in results)
    lines.append(
        f"reproduce: {COMMAND} --rates {rates} --seconds {args.seconds} "
        f"--sensor-interval {args.sensor_interval} --max-batch-size {args.max_batch_size}"
        + (f" --partitions {args.partitions}" if args.partitions != 1 else "")
        + (f" --cards {args.cards}" if args.cards else "")
        + (f" --storage {args.storage}" if args.storage != "sqlite" else "")
    )
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
