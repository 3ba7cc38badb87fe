"""Batch throughput: time of each stage and of a whole `score_transactions` run, per batch size.

For each size, the messages are first put on a topic of a real local broker; then, each in a
fresh process (so that peak memory is the batch's own):
* `stages`: the pipeline functions called one after another (fetch, preprocess, score, persist,
  alert), timed separately, on a fresh SQLite database;
* `run`: the Dagster job `score_transactions` executed in process on a real instance, on another
  fresh database, as a batch run would be.

Reproduce: python -m fraud_dagster.benchmarks.batch_throughput --sizes 1000 10000 100000
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
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


def measure_stages(services: Services, topic: str, size: int) -> dict:
    from fraud_dagster import kafka_io, pipeline
    from fraud_dagster.resources import resolved_resources

    database_url = services.sqlite_url(f"stages-{topic}")
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
        report = pipeline.deliver_alerts(
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


def measure_run(services: Services, topic: str, size: int) -> dict:
    import dagster as dg

    from fraud_dagster.batching import PlannedBatch
    from fraud_dagster.definitions import build_definitions
    from fraud_dagster.jobs import batch_run_config

    database_url = services.sqlite_url(f"run-{topic}")
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


def _profiled(measure, services: Services, topic: str, size: int, directory: Path) -> dict:
    """The stages under pyinstrument (a sampling profiler: a few % of overhead)."""
    from pyinstrument import Profiler

    directory.mkdir(parents=True, exist_ok=True)
    with Profiler(interval=0.001) as profiler:
        result = measure(services, topic, size)
    (directory / f"stages-{size}.txt").write_text(profiler.output_text(show_all=False))
    profiler.write_html(directory / f"stages-{size}.html")
    return result


def _child(
    services: Services, topic: str, size: int, mode: str, profile: Path | None = None
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
            result = _profiled(measure, services, args.topic, args.size, args.profile)
        else:
            result = measure(services, args.topic, args.size)
        sys.stdout.write(json.dumps(result) + "\n")
        return

    with tempfile.TemporaryDirectory() as logs:
        configure_logging(Path(logs), "WARNING")
    rows = []
    with local_services() as services:
        for size in args.sizes:
            topic = f"bench-throughput-{size}"
            fill_topic(services, topic, size, seed=size)
            stages = _child(services, topic, size, "stages", args.profile)
            run = _child(services, topic, size, "run")
            rows.append({**stages, "run": run})
    _print(rows)
    emit_json(args.json, {"machine": machine_description(), "command": COMMAND, "rows": rows})


def _print(rows: list[dict]) -> None:
    out = sys.stdout
    out.write(f"machine: {machine_description()}\n")
    out.write(
        f"{'size':>8} {'fetch':>7} {'prep':>7} {'score':>7} {'persist':>8} {'alert':>7} "
        f"{'stages':>7} {'stage tx/s':>11} {'run s':>7} {'run tx/s':>9} {'susp':>6} "
        f"{'peak MiB':>9}\n"
    )
    for row in rows:
        s = row["stages_seconds"]
        run = row["run"]
        out.write(
            f"{row['size']:>8} {s['fetch']:>7.2f} {s['preprocess']:>7.2f} {s['score']:>7.2f} "
            f"{s['persist']:>8.2f} {s['alert']:>7.2f} {row['stages_total_seconds']:>7.2f} "
            f"{row['stages_tx_per_second']:>11.0f} {run['run_seconds']:>7.2f} "
            f"{run['run_tx_per_second']:>9.0f} {row['suspicious']:>6} {run['peak_rss_mib']:>9.0f}\n"
        )
    out.write(f"reproduce: {COMMAND} --sizes {' '.join(str(r['size']) for r in rows)}\n")


if __name__ == "__main__":
    main()
