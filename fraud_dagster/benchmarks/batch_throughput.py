"""Batch throughput: time of each stage and of a whole `score_transactions` run, per batch size.

For each size, the messages are first put on a topic of a real local broker; then, each in a
fresh process (so that peak memory is the batch's own):
* `stages`: the pipeline functions called one after another (fetch, preprocess, score, persist,
  alert), timed separately, on a fresh SQLite database;
* `run`: the Dagster job `score_transactions` executed in process on a real instance, on another
  fresh database, as a batch run would be.

With `--repeat N` each size is measured N times (fresh processes and databases each time) and a
median row follows: on a shared 2-core machine one run of a size varies by 10-25 %.

Reproduce: python -m fraud_dagster.benchmarks.batch_throughput --sizes 1000 10000 100000
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from fraud_dagster.benchmarks.harness import (
    Services,
    Stopwatch,
    emit_json,
    fill_topic,
    local_services,
    machine_description,
    peak_rss_mib,
    run_child,
)
from fraud_dagster.logging_setup import configure_logging
from fraud_dagster.settings import PROJECT_ROOT

logger = logging.getLogger(__name__)
COMMAND = "python -m fraud_dagster.benchmarks.batch_throughput"


def measure_stages(services: Services, topic: str, size: int, attempt: int) -> dict:
    from fraud_dagster import kafka_io, pipeline
    from fraud_dagster.alert_delivery import deliver_alerts
    from fraud_dagster.resources import resolved_resources

    database_url = services.sqlite_url(f"stages-{topic}-{attempt}")
    os.environ.update(services.env(topic, database_url))
    settings = services.settings(topic, database_url)
    resources = resolved_resources(settings)
    engine = resources["database"].get_engine()
    watch = Stopwatch()
    with watch.time("fetch"):
        raw = kafka_io.read_range(resources["kafka"].client_options(), topic, 0, 0, size - 1)
    with watch.time("preprocess"):
        prepared = pipeline.prepare_batch(raw, engine)
    with watch.time("score"):
        model = resources["model"].load(engine)
        scored = pipeline.score_batch(prepared, model)
    with watch.time("persist"):
        pipeline.store_batch(scored, engine, run_id="benchmark")
    with watch.time("alert"):
        report = deliver_alerts(
            engine, resources["smtp"].alert_delivery(), token="bench", batch=scored.ref
        )
    total = sum(watch.timings.values())
    return {
        "size": size,
        "read": len(raw),
        "suspicious": scored.suspicious_count,
        "alerts_sent": report.sent,
        "stages_seconds": watch.timings,
        "stages_total_seconds": total,
        "stages_tx_per_second": size / total,
        "peak_rss_mib": peak_rss_mib(),
    }


def measure_run(services: Services, topic: str, size: int, attempt: int) -> dict:
    import dagster as dg

    from fraud_dagster.batching import PlannedBatch
    from fraud_dagster.definitions import build_definitions
    from fraud_dagster.jobs import batch_run_config

    database_url = services.sqlite_url(f"run-{topic}-{attempt}")
    os.environ.update(services.env(topic, database_url))  # EnvVar secrets resolve from here
    defs = build_definitions(services.settings(topic, database_url))
    job = defs.resolve_job_def("score_transactions")
    batch = PlannedBatch(topic, 0, 0, size - 1)
    with (
        tempfile.TemporaryDirectory(prefix="bench-dagster-") as home,
        dg.DagsterInstance.from_config(_instance_dir(home)) as instance,
    ):
        started = time.perf_counter()
        result = job.execute_in_process(
            run_config=batch_run_config(batch), instance=instance, tags=batch.tags()
        )
        seconds = time.perf_counter() - started
    if not result.success:
        raise SystemExit(f"the score_transactions run failed for size {size}")
    return {
        "size": size,
        "run_seconds": seconds,
        "run_tx_per_second": size / seconds,
        "peak_rss_mib": peak_rss_mib(),
    }


def _instance_dir(home: str) -> str:
    shutil.copyfile(PROJECT_ROOT / "dagster.yaml", Path(home) / "dagster.yaml")
    return home


def _profiled(
    measure, services: Services, topic: str, size: int, attempt: int, directory: Path
) -> dict:
    """The stages under pyinstrument (a sampling profiler: a few % of overhead)."""
    from pyinstrument import Profiler

    directory.mkdir(parents=True, exist_ok=True)
    with Profiler(interval=0.001) as profiler:
        result = measure(services, topic, size, attempt)
    (directory / f"stages-{size}.txt").write_text(profiler.output_text(show_all=False))
    profiler.write_html(directory / f"stages-{size}.html")
    return result


def _child(
    services: Services,
    topic: str,
    size: int,
    mode: str,
    attempt: int,
    profile: Path | None = None,
) -> dict:
    """Run one measurement in a fresh Python process and return its JSON result."""
    command = [
        sys.executable,
        "-m",
        "fraud_dagster.benchmarks.batch_throughput",
        "--child",
        mode,
        "--topic",
        topic,
        "--size",
        str(size),
        "--attempt",
        str(attempt),
        "--services",
        json.dumps(
            {
                "work_dir": str(services.work_dir),
                "bootstrap_servers": services.bootstrap_servers,
                "smtp_port": services.smtp_port,
                "mail_dir": str(services.mail_dir),
            }
        ),
        *(["--profile", str(profile)] if profile else []),
    ]
    return run_child(command, f"measurement {mode} {size}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000])
    parser.add_argument("--repeat", type=int, default=1, help="measurements per size")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="directory for a pyinstrument profile (text and HTML) of each size's stages",
    )
    parser.add_argument("--child", choices=["stages", "run"], help=argparse.SUPPRESS)
    parser.add_argument("--topic", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--attempt", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--services", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        logging.basicConfig(level=logging.WARNING)
        fields = json.loads(args.services)
        services = Services(
            work_dir=Path(fields["work_dir"]),
            bootstrap_servers=fields["bootstrap_servers"],
            smtp_port=fields["smtp_port"],
            mail_dir=Path(fields["mail_dir"]),
        )
        measure = measure_stages if args.child == "stages" else measure_run
        if args.profile and args.child == "stages":
            result = _profiled(measure, services, args.topic, args.size, args.attempt, args.profile)
        else:
            result = measure(services, args.topic, args.size, args.attempt)
        sys.stdout.write(json.dumps(result) + "\n")
        return

    with tempfile.TemporaryDirectory() as logs:
        configure_logging(Path(logs), "WARNING")
    rows = []
    with local_services() as services:
        for size in args.sizes:
            topic = f"bench-throughput-{size}"
            fill_topic(services, topic, size, seed=size)
            for attempt in range(args.repeat):
                stages = _child(services, topic, size, "stages", attempt, args.profile)
                run = _child(services, topic, size, "run", attempt)
                rows.append({**stages, "run": run})
    _print(rows, args.repeat)
    emit_json(args.json, {"machine": machine_description(), "command": COMMAND, "rows": rows})


def median_row(rows: list[dict]) -> dict:
    """The per-field median of repeated measurements of one size (same shape as a row)."""
    stage_names = rows[0]["stages_seconds"].keys()
    return {
        "size": rows[0]["size"],
        "suspicious": rows[0]["suspicious"],
        "stages_seconds": {
            name: statistics.median(r["stages_seconds"][name] for r in rows) for name in stage_names
        },
        **{
            key: statistics.median(r[key] for r in rows)
            for key in ("stages_total_seconds", "stages_tx_per_second")
        },
        "run": {
            key: statistics.median(r["run"][key] for r in rows)
            for key in ("run_seconds", "run_tx_per_second", "peak_rss_mib")
        },
    }


def _print(rows: list[dict], repeat: int) -> None:
    out = sys.stdout
    out.write(f"machine: {machine_description()}\n")
    out.write(
        f"{'size':>8} {'fetch':>7} {'prep':>7} {'score':>7} {'persist':>8} {'alert':>7} "
        f"{'stages':>7} {'stage tx/s':>11} {'run s':>7} {'run tx/s':>9} {'susp':>6} "
        f"{'peak MiB':>9}\n"
    )
    for start in range(0, len(rows), repeat):
        group = rows[start : start + repeat]
        for row in group:
            out.write(_line(row, ""))
        if repeat > 1:
            out.write(_line(median_row(group), "  median"))
    sizes = " ".join(str(size) for size in dict.fromkeys(r["size"] for r in rows))
    repeat_option = f" --repeat {repeat}" if repeat > 1 else ""
    out.write(f"reproduce: {COMMAND} --sizes {sizes}{repeat_option}\n")


def _line(row: dict, label: str) -> str:
    s = row["stages_seconds"]
    run = row["run"]
    return (
        f"{row['size']:>8} {s['fetch']:>7.2f} {s['preprocess']:>7.2f} {s['score']:>7.2f} "
        f"{s['persist']:>8.2f} {s['alert']:>7.2f} {row['stages_total_seconds']:>7.2f} "
        f"{row['stages_tx_per_second']:>11.0f} {run['run_seconds']:>7.2f} "
        f"{run['run_tx_per_second']:>9.0f} {row['suspicious']:>6} {run['peak_rss_mib']:>9.0f}"
        f"{label}\n"
    )


if __name__ == "__main__":
    main()
