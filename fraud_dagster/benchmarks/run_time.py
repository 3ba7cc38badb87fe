"""Time of one whole `score_transactions` run executed in process, repeated.

The messages are put on a topic of a real local broker once; then each repetition runs in a
fresh Python process (as a batch run does under the daemon), on a fresh SQLite database and a
fresh Dagster instance, and times `execute_in_process` of the job on the same offset range.
Step durations come from the run's own STEP_SUCCESS events. The first run of a process pays
the imports and the model load like every real batch run; nothing is warmed up.

With `--baseline DIR` (a copy of the project's files at another version, e.g. made with
`git archive`), repetitions alternate between that version and this one on the same topic, so
that both see the same load of a shared machine; the paired differences are printed.
Used to measure what the per-batch asset checks cost (see docs/benchmarks.md).
Reproduce: python -m fraud_dagster.benchmarks.run_time --size 1000 --repeat 7 [--baseline DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from fraud_dagster.benchmarks.harness import (
    Services,
    emit_json,
    fill_topic,
    local_services,
    machine_description,
    run_child,
)
from fraud_dagster.settings import PROJECT_ROOT

COMMAND = "python -m fraud_dagster.benchmarks.run_time"


def measure_run(services: Services, topic: str, size: int, repetition: int) -> dict:
    import dagster as dg

    from fraud_dagster.batching import PlannedBatch
    from fraud_dagster.definitions import build_definitions
    from fraud_dagster.jobs import batch_run_config

    database_url = services.sqlite_url(f"run-{topic}-{repetition}")
    os.environ.update(services.env(topic, database_url))  # EnvVar secrets resolve from here
    defs = build_definitions(services.settings(topic, database_url))
    job = defs.resolve_job_def("score_transactions")
    batch = PlannedBatch(topic, 0, 0, size - 1)
    with tempfile.TemporaryDirectory(prefix="bench-dagster-") as home:
        shutil.copyfile(PROJECT_ROOT / "dagster.yaml", Path(home) / "dagster.yaml")
        with dg.DagsterInstance.from_config(home) as instance:
            started = time.perf_counter()
            result = job.execute_in_process(
                run_config=batch_run_config(batch), instance=instance, tags=batch.tags()
            )
            seconds = time.perf_counter() - started
    if not result.success:
        raise SystemExit(f"the score_transactions run failed (repetition {repetition})")
    steps = {
        event.step_key.rsplit(".", 1)[-1]: event.event_specific_data.duration_ms / 1000
        for event in result.all_events
        if event.event_type_value == "STEP_SUCCESS"
    }
    return {
        "run_seconds": seconds,
        "steps_seconds": steps,
        "check_evaluations": sum(
            1 for event in result.all_events if event.event_type_value == "ASSET_CHECK_EVALUATION"
        ),
    }


def _child(
    services: Services, topic: str, size: int, repetition: int, tree: Path = PROJECT_ROOT
) -> dict:
    """One measurement in a fresh Python process running the code of `tree`; its JSON result."""
    fields = {
        "work_dir": str(services.work_dir),
        "bootstrap_servers": services.bootstrap_servers,
        "smtp_port": services.smtp_port,
        "mail_dir": str(services.mail_dir),
    }
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        json.dumps({"services": fields, "topic": topic, "size": size, "repetition": repetition}),
    ]
    return run_child(
        command,
        f"repetition {repetition}",
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=1000, help="messages in the batch")
    parser.add_argument("--repeat", type=int, default=7, help="runs, each in a fresh process")
    parser.add_argument(
        "--baseline", type=Path, default=None, help="another version's project dir to compare"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        spec = json.loads(args.child)
        fields = spec["services"]
        services = Services(
            work_dir=Path(fields["work_dir"]),
            bootstrap_servers=fields["bootstrap_servers"],
            smtp_port=fields["smtp_port"],
            mail_dir=Path(fields["mail_dir"]),
        )
        figures = measure_run(services, spec["topic"], spec["size"], spec["repetition"])
        sys.stdout.write(json.dumps(figures) + "\n")
        return

    rows: list[dict] = []
    baseline: list[dict] = []
    with local_services() as services:
        topic = f"bench-run-time-{args.size}"
        fill_topic(services, topic, args.size, seed=args.size)
        for i in range(args.repeat):
            if args.baseline:
                baseline.append(_child(services, topic, args.size, 2 * i, args.baseline))
            rows.append(_child(services, topic, args.size, 2 * i + 1))
    out = sys.stdout
    out.write(f"machine: {machine_description()}\n")
    if baseline:
        out.write(f"--- baseline {args.baseline}\n")
        _print(baseline, args.size)
        out.write(f"--- this version {PROJECT_ROOT}\n")
    _print(rows, args.size)
    if baseline:
        differences = sorted(
            row["run_seconds"] - base["run_seconds"]
            for row, base in zip(rows, baseline, strict=True)
        )
        quartiles = statistics.quantiles(differences, n=4)
        out.write(
            f"this version minus baseline, paired: median {statistics.median(differences):+.3f} s"
            f" (quartiles {quartiles[0]:+.3f} / {quartiles[2]:+.3f}); minimum run "
            f"{min(r['run_seconds'] for r in rows) - min(b['run_seconds'] for b in baseline):+.3f}"
            " s\n"
        )
    out.write(
        f"reproduce: {COMMAND} --size {args.size} --repeat {args.repeat}"
        + (f" --baseline {args.baseline}" if args.baseline else "")
        + "\n"
    )
    emit_json(
        args.json,
        {
            "machine": machine_description(),
            "command": COMMAND,
            "rows": rows,
            "baseline": baseline,
        },
    )


def _print(rows: list[dict], size: int) -> None:
    out = sys.stdout
    names = list(rows[0]["steps_seconds"])
    out.write(f"{'run':>4} {'run s':>7} " + " ".join(f"{n:>10}" for n in names) + " checks\n")
    for i, row in enumerate(rows):
        steps = " ".join(f"{row['steps_seconds'].get(n, 0.0):>10.3f}" for n in names)
        out.write(f"{i:>4} {row['run_seconds']:>7.3f} {steps} {row['check_evaluations']:>6}\n")
    seconds = sorted(row["run_seconds"] for row in rows)
    out.write(
        f"run seconds over {len(rows)} runs of {size} messages: median "
        f"{statistics.median(seconds):.3f}, min {seconds[0]:.3f}, max {seconds[-1]:.3f}\n"
    )
    for name in names:
        values = [row["steps_seconds"].get(name, 0.0) for row in rows]
        out.write(f"  step {name}: median {statistics.median(values):.3f} s\n")


if __name__ == "__main__":
    main()
