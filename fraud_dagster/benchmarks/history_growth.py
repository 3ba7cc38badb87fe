"""How a batch's preprocess grows with what is already stored (the features' history read).

The 10-minute run at 1,000 tx/s showed `preprocess` growing with the stored rows. This isolates
it: a fresh SQLite database is filled, batch after batch through the pipeline's own functions,
with the stream the latency benchmark sends (`producer.synthetic_transactions`: 500 accounts,
1,000 merchants); at each `--stored` size, the next `--batch` messages of the stream are
prepared (validation, duplicate check, history read, features) and timed, without storing them.
The fill stores `--batch` messages at a time, and the last `--repeat` of those writes before
each size are timed too (`persist s`: the scored rows' insert into the grown indexes).
No broker: the messages are the bytes the broker would return.

By default the messages keep the simulator's dates (about 950 a simulated day, so a batch's
30-day windows hold a fixed ~28,000 rows); `--dated-at-rate 1000` dates them at their produce
time as the latency benchmark does, so that every stored row is inside the accounts' 1-day
window. `--cards 1000000` spreads the simulator's 500 customers over a million card numbers
(`producer.spread_over_cards`), so that an account holds a few transactions, as a bank's do.
`--storage postgresql` fills a throw-away PostgreSQL server (`local_services.postgres`) instead
of SQLite, and runs ANALYZE after each fill; `--time-rollup-fill` times, at the end, the one-off
fill of the account rollups an upgraded database gets (`storage.rollups.backfill_account_rollups`)
over everything stored.

Reproduce: python -m fraud_dagster.benchmarks.history_growth --stored 60000 300000 600000
           python -m fraud_dagster.benchmarks.history_growth --stored 60000 300000 600000 \
               --dated-at-rate 1000
           python -m fraud_dagster.benchmarks.history_growth --stored 60000 900000 1800000 \
               --dated-at-rate 1000 --cards 1000000
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import sqlalchemy as sa

from fraud_dagster import pipeline
from fraud_dagster.benchmarks.harness import add_cards_option, machine_description
from fraud_dagster.cli import print_line
from fraud_dagster.features import FEATURE_COLUMNS
from fraud_dagster.local_services.postgres import temporary_postgres
from fraud_dagster.messages import RawBatch
from fraud_dagster.model import LoadedModel, ModelEntry
from fraud_dagster.producer import spread_over_cards, synthetic_transactions
from fraud_dagster.simulator import to_messages
from fraud_dagster.storage.database import create_engine, ensure_schema
from fraud_dagster.storage.history import load_batch_history
from fraud_dagster.storage.rollups import BACKFILL_MARK, backfill_account_rollups
from fraud_dagster.storage.schema import account_rollups, schema_upgrades

COMMAND = "python -m fraud_dagster.benchmarks.history_growth"
TOPIC = "transactions"


class _NothingSuspicious:
    """The fill stores scored rows only: the history read does not look at scores."""

    def predict_proba(self, features: pd.DataFrame) -> np.ndarray:
        return np.tile([1.0, 0.0], (len(features), 1))


FILL_MODEL = LoadedModel(
    ModelEntry("fill", "unused.joblib", "0" * 64, 0.5, tuple(FEATURE_COLUMNS)),
    _NothingSuspicious(),
    0.5,
)


def raw_batch(values: list[bytes], first: int) -> RawBatch:
    offsets = list(range(first, first + len(values)))
    return RawBatch(TOPIC, 0, first, offsets[-1], offsets, [0] * len(values), values, None, 0)


def dated_at_rate(count: int, rate: int) -> pd.Series:
    """Dates of `count` messages produced at `rate` a second, the last one now."""
    end = pd.Timestamp.now(tz="UTC").tz_localize(None).floor("s")
    return pd.Series(end - pd.to_timedelta(np.arange(count)[::-1] / rate, unit="s"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stored", type=int, nargs="+", default=[60_000, 300_000, 600_000])
    parser.add_argument("--batch", type=int, default=5_000)
    parser.add_argument("--repeat", type=int, default=5, help="timed prepares per size")
    parser.add_argument(
        "--dated-at-rate",
        type=int,
        default=0,
        metavar="TX_PER_S",
        help="date the messages as the latency benchmark does, at their produce time, this many "
        "a second up to now (default 0: the simulator's dates, ~950 a simulated day)",
    )
    add_cards_option(parser)
    parser.add_argument("--storage", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument(
        "--time-rollup-fill",
        action="store_true",
        help="at the end, time the account rollups' one-off fill over everything stored",
    )
    args = parser.parse_args(argv)
    sizes = sorted(args.stored)
    transactions = synthetic_transactions(sizes[-1] + args.batch, seed=1000)
    if args.dated_at_rate:
        transactions["transaction_date"] = dated_at_rate(len(transactions), args.dated_at_rate)
    stream = to_messages(spread_over_cards(transactions, args.cards, seed=1000))
    values = [json.dumps(message).encode() for message in stream]
    del stream
    # The benchmark's own 600,000 messages are not a run's heap: keep them out of the garbage
    # collector's full passes, which otherwise land at random in the timed sections.
    gc.freeze()
    print_line(f"machine: {machine_description()}")
    print_line(
        f"batch {args.batch} messages, {args.cards or 'the simulated'} accounts; "
        f"median of {args.repeat} prepares and of the last {args.repeat} persists per size"
    )
    print_line(
        f"{'stored':>9} {'prepare s':>10} {'history s':>10} {'history rows':>13} {'summed':>9} "
        f"{'persist s':>10}"
    )
    with contextlib.ExitStack() as stack:
        if args.storage == "postgresql":
            url = stack.enter_context(temporary_postgres(prefix="fraud-history-pg-")).url()
        else:
            url = f"sqlite:///{Path(stack.enter_context(tempfile.TemporaryDirectory())) / 'h.db'}"
        engine = create_engine(url)
        ensure_schema(engine)
        stored = 0
        for size in sizes:
            persist_times: list[float] = []
            while stored < size:
                chunk = values[stored : min(size, stored + args.batch)]
                prepared = pipeline.prepare_batch(raw_batch(chunk, stored), engine)
                scored = pipeline.score_batch(prepared, FILL_MODEL)
                started = time.perf_counter()
                pipeline.store_batch(scored, engine, "fill")
                persist_times.append(time.perf_counter() - started)
                stored += len(chunk)
            if args.storage == "postgresql":
                # The planner's statistics as autovacuum keeps them on a live table; otherwise
                # whether its once-a-minute round happened to fall in the fill picks the plans.
                with engine.begin() as conn:
                    conn.execute(sa.text("ANALYZE"))
            batch = raw_batch(values[stored : stored + args.batch], stored)
            prepare_times, history_times = [], []
            for _ in range(args.repeat):
                started = time.perf_counter()
                prepared = pipeline.prepare_batch(batch, engine)
                prepare_times.append(time.perf_counter() - started)
                with engine.connect() as conn:
                    started = time.perf_counter()
                    history = load_batch_history(conn, prepared.transactions)
                    history_times.append(time.perf_counter() - started)
            rows = len(history.accounts) + len(history.merchants)
            summed = history.accounts_read.summed + history.merchants_read.summed
            print_line(
                f"{stored:>9} {statistics.median(prepare_times):>10.3f} "
                f"{statistics.median(history_times):>10.3f} {rows:>13} {summed:>9} "
                f"{statistics.median(persist_times[-args.repeat :] or [0.0]):>10.3f}"
            )
        if args.time_rollup_fill:
            time_rollup_fill(engine, stored)
        engine.dispose()
    dated = f" --dated-at-rate {args.dated_at_rate}" if args.dated_at_rate else ""
    dated += f" --cards {args.cards}" if args.cards else ""
    dated += " --storage postgresql" if args.storage == "postgresql" else ""
    dated += " --time-rollup-fill" if args.time_rollup_fill else ""
    print_line(
        f"reproduce: {COMMAND} --stored {' '.join(map(str, sizes))} --batch {args.batch}{dated}"
    )


def time_rollup_fill(engine: sa.Engine, stored: int) -> None:
    """Forget the rollups and their mark, as on a database an earlier version filled, and time
    the fill the first process to open it does."""
    with engine.begin() as conn:
        kept = conn.execute(sa.select(sa.func.count()).select_from(account_rollups)).scalar_one()
        conn.execute(sa.delete(schema_upgrades).where(schema_upgrades.c.name == BACKFILL_MARK))
        conn.execute(sa.delete(account_rollups))
    started = time.perf_counter()
    backfill_account_rollups(engine)
    seconds = time.perf_counter() - started
    with engine.connect() as conn:
        filled = conn.execute(sa.select(sa.func.count()).select_from(account_rollups)).scalar_one()
    print_line(
        f"rollups fill (once, on upgrade): {seconds:.1f} s over {stored} stored, "
        f"{filled} rollup rows (the batches had written {kept})"
    )


if __name__ == "__main__":
    main()
