"""What the sensor's one-off set-aside costs when a topic with many stored rows is recreated.

`set_aside_previous_topic` moves the previous topic's stored ranges, and (a new topic id) its
scored and rejected rows, to `<topic>@before-<tag>` in one transaction, during the sensor tick
that first sees the new topic. This fills a fresh application database with `--rows` scored
rows (1 % more rejected, one stored range per 1,000 offsets) and times the move once, on SQLite
or on a throw-away local PostgreSQL server.

Reproduce: python -m fraud_dagster.benchmarks.topic_set_aside --rows 1000000 --storage sqlite
"""

from __future__ import annotations

import argparse
import tempfile
import time
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path

import sqlalchemy as sa

from fraud_dagster.benchmarks.harness import machine_description
from fraud_dagster.cli import print_line
from fraud_dagster.local_services.postgres import temporary_postgres
from fraud_dagster.storage.batches import set_aside_previous_topic
from fraud_dagster.storage.database import create_engine, ensure_schema
from fraud_dagster.storage.schema import rejected_transactions, scored_transactions, stored_ranges

COMMAND = "python -m fraud_dagster.benchmarks.topic_set_aside"
TOPIC = "transactions"
RANGE = 1_000
CHUNK = 20_000


def fill(engine: sa.Engine, rows: int) -> None:
    """`rows` scored rows at offsets 0.., rows // 100 rejected ones after them, their ranges."""
    when = datetime(2026, 11, 1)
    rejected = rows // 100
    with engine.begin() as conn:
        for start in range(0, rows, CHUNK):
            conn.execute(
                sa.insert(scored_transactions),
                [
                    {
                        "transaction_id": f"T{offset}",
                        "account_id": f"A{offset % 5000}",
                        "merchant": f"M{offset % 300}",
                        "transaction_amount": 42.0,
                        "transaction_date": when,
                        "source_topic": TOPIC,
                        "source_partition": 0,
                        "source_offset": offset,
                        "fraud_probability": 0.1,
                        "is_suspicious": False,
                        "model_version": "v1",
                        "scored_at": when,
                    }
                    for offset in range(start, min(start + CHUNK, rows))
                ],
            )
        conn.execute(
            sa.insert(rejected_transactions),
            [
                {
                    "source_topic": TOPIC,
                    "source_partition": 0,
                    "source_offset": rows + i,
                    "raw_value": b"{not json",
                    "reason": "malformed JSON",
                    "rejected_at": when,
                }
                for i in range(rejected)
            ],
        )
        total = rows + rejected
        conn.execute(
            sa.insert(stored_ranges),
            [
                {
                    "source_topic": TOPIC,
                    "source_partition": 0,
                    "first_offset": first,
                    "last_offset": min(first + RANGE, total) - 1,
                    "stored_at": when,
                }
                for first in range(0, total, RANGE)
            ],
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000, help="scored rows of the topic")
    parser.add_argument("--storage", choices=["sqlite", "postgresql"], default="sqlite")
    args = parser.parse_args(argv)
    with ExitStack() as stack:
        if args.storage == "postgresql":
            url = stack.enter_context(temporary_postgres(prefix="fraud-set-aside-")).url()
        else:
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            url = f"sqlite:///{directory / 'set-aside.db'}"
        engine = create_engine(url)
        stack.callback(engine.dispose)
        ensure_schema(engine)
        started = time.perf_counter()
        fill(engine, args.rows)
        fill_seconds = time.perf_counter() - started
        started = time.perf_counter()
        moved = set_aside_previous_topic(engine, TOPIC, "8aae0904", with_rows=True)
        move_seconds = time.perf_counter() - started
    print_line(f"machine: {machine_description()}")
    print_line(f"command: {COMMAND} --rows {args.rows} --storage {args.storage}")
    print_line(f"filled in {fill_seconds:.1f} s (not part of the figure)")
    print_line(
        f"set aside {moved.scored:,} scored, {moved.rejected:,} rejected rows and "
        f"{moved.ranges:,} stored ranges in {move_seconds:.2f} s "
        f"({args.storage}, one transaction)"
    )


if __name__ == "__main__":
    main()
