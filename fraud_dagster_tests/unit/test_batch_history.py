"""Online history from the database (rows near window edges, aggregates elsewhere) against the
offline feature pass over everything: the same numbers, for short and long batches."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from fraud_dagster.features import (
    ACCOUNT_EDGES_DAYS,
    MERCHANT_EDGES_DAYS,
    compute_batch_features,
    compute_features,
    history_plan,
)
from fraud_dagster.storage.database import create_engine, ensure_schema, utcnow
from fraud_dagster.storage.history import DENSE_ACCOUNT_TRANSACTIONS, load_batch_history
from fraud_dagster.storage.rollups import FINE_FROM_DAY_COUNT, add_to_account_rollups
from fraud_dagster.storage.schema import fraud_labels, scored_transactions


def transactions(
    n: int, seed: int, *, accounts: int = 25, merchants: int = 35, days: int = 60
) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    micros = np.sort(rng.integers(0, 86_400 * days * 1_000_000, n))
    micros[10:20] = micros[10]  # ties within one second
    frame = pd.DataFrame(
        {
            "transaction_id": [f"t{i:06d}" for i in range(n)],
            "account_id": rng.integers(0, accounts, n).astype(str),
            "merchant": rng.integers(0, merchants, n).astype(str),
            "transaction_amount": rng.gamma(2, 30, n).round(2),
            "transaction_date": pd.Timestamp("2025-01-01") + pd.to_timedelta(micros, unit="us"),
            "is_fraud": (rng.random(n) < 0.1).astype(float),
        }
    )
    return frame


def store(engine: sa.Engine, frame: pd.DataFrame, busy_from: int = FINE_FROM_DAY_COUNT) -> None:
    """Insert `frame` as scored transactions (offsets from 0) with their rollups: days with
    more than `busy_from` transactions get them."""
    now = utcnow()
    rows = [
        {
            "transaction_id": r.transaction_id,
            "account_id": r.account_id,
            "merchant": r.merchant,
            "transaction_amount": r.transaction_amount,
            "transaction_date": r.transaction_date.to_pydatetime(),
            "source_topic": "t",
            "source_partition": 0,
            "source_offset": i,
            "fraud_probability": 0.0,
            "is_suspicious": False,
            "model_version": "v",
            "scored_at": now,
        }
        for i, r in enumerate(frame.itertuples(index=False))
    ]
    labels = [
        {
            "transaction_id": r.transaction_id,
            "is_fraud": bool(r.is_fraud),
            "labeled_by": "test",
            "labeled_at": now,
            "source": "replay",
        }
        for r in frame.itertuples(index=False)
        if r.is_fraud
    ]
    with engine.begin() as conn:
        conn.execute(sa.insert(scored_transactions), rows)
        add_to_account_rollups(conn, frame, may_start=True, busy_from=busy_from)
        if labels:
            conn.execute(sa.insert(fraud_labels), labels)


# The accounts here hold ~2.7 transactions a day. "rollups": days with more than 2 get rollups
# (about a third), and dense from 0 sends every account that has any through the rollups: its
# bands mix busy days (rollups) and quiet ones (transactions). "index": the defaults, no day is
# busy and every band is summed from the transactions' index.
ROLLUPS_AND_ROWS = (2, 0)
BOTH_ACCOUNT_PATHS = pytest.mark.parametrize(
    ("busy_from", "dense_from"),
    [ROLLUPS_AND_ROWS, (FINE_FROM_DAY_COUNT, DENSE_ACCOUNT_TRANSACTIONS)],
    ids=["rollups", "index"],
)


@BOTH_ACCOUNT_PATHS
@pytest.mark.parametrize(
    ("batch_size", "stored_batch_too"),
    # 900 of 60 days span ~13 days: merchant bands (7+ days back) then hold batch rows too.
    [(5, False), (60, False), (900, False), (60, True), (900, True)],
)
def test_database_history_gives_offline_features(
    tmp_path: Path, batch_size: int, stored_batch_too: bool, busy_from: int, dense_from: int
) -> None:
    frame = transactions(4000, seed=batch_size)
    engine = create_engine(f"sqlite:///{tmp_path / 'h.db'}")
    ensure_schema(engine)
    split = len(frame) - batch_size
    store(engine, frame.iloc[:split] if not stored_batch_too else frame, busy_from)
    batch = frame.iloc[split:]
    with engine.connect() as conn:
        exclude = ("t", 0, split, len(frame) - 1) if stored_batch_too else None
        history = load_batch_history(
            conn, batch, exclude_source=exclude, dense_accounts_from=dense_from
        )
    online = compute_batch_features(batch, history)
    offline = compute_features(frame).iloc[split:]
    pd.testing.assert_frame_equal(
        online, offline, check_exact=False, rtol=1e-9, atol=1e-9, check_dtype=False
    )
    if batch_size <= 60:
        # A short batch needs few rows: most of the history comes as aggregates.
        assert (history.accounts["weight"] > 1).any()
        assert len(history.accounts) < split / 4
        # Busy days come from the accounts' rollups; merchants have none.
        assert (history.accounts_read.rollup_rows > 0) == (busy_from < FINE_FROM_DAY_COUNT)
        assert history.merchants_read.rollup_rows == 0
    # What the run reports it read: every stored transaction its windows can reach, once.
    stored = frame.iloc[:split]
    for read, part, key, edges in (
        (history.accounts_read, history.accounts, "account_id", ACCOUNT_EDGES_DAYS),
        (history.merchants_read, history.merchants, "merchant", MERCHANT_EDGES_DAYS),
    ):
        assert read.rows + read.summed == within_reach(stored, batch, key, edges)
        assert read.rows + read.sums == len(part)


@pytest.mark.parametrize("stored_batch_too", [False, True])
def test_busy_accounts_read_hours_and_minutes_and_give_offline_features(
    tmp_path: Path, stored_batch_too: bool
) -> None:
    """Three accounts with ~600 transactions a day: every day has hour and minute rollups, and
    the bands' ends are read from them (the part of the read that grew with a dense stream)."""
    n = 3 * 600 * 35
    frame = transactions(n, seed=5, accounts=3, merchants=50, days=35)
    engine = create_engine(f"sqlite:///{tmp_path / 'busy.db'}")
    ensure_schema(engine)
    split = n - 60
    store(engine, frame if stored_batch_too else frame.iloc[:split])
    batch = frame.iloc[split:]
    exclude = ("t", 0, split, n - 1) if stored_batch_too else None
    with engine.connect() as conn:
        history = load_batch_history(conn, batch, exclude_source=exclude)
    online = compute_batch_features(batch, history)
    offline = compute_features(frame).iloc[split:]
    pd.testing.assert_frame_equal(
        online, offline, check_exact=False, rtol=1e-9, atol=1e-9, check_dtype=False
    )
    # More rollup rows than the 3 accounts' days in reach: hours and minutes were read too.
    assert history.accounts_read.rollup_rows > 3 * 31
    # ... instead of the ~18,000 transactions a day's band holds per account, one by one.
    assert history.accounts_read.summed > 3 * 30 * 500
    assert len(history.accounts) < 3 * 60 + 3 * 3 + 60


def within_reach(stored: pd.DataFrame, batch: pd.DataFrame, key: str, edges: tuple) -> int:
    """Stored transactions of the batch's keys in the time its windows with `edges` cover."""
    seconds = stored["transaction_date"].astype("datetime64[s]").astype("int64")
    batch_seconds = batch["transaction_date"].astype("datetime64[s]").astype("int64")
    low = batch_seconds.min() - max(edges) * 86_400 + 1
    high = batch_seconds.max() - min(edges) * 86_400
    return int((stored[key].isin(batch[key]) & seconds.between(low, high)).sum())


def test_history_plan_covers_the_reach_without_overlap() -> None:
    day = 86_400
    plan = history_plan(100 * day, 100 * day + 60, (0, 1, 7, 30))
    intervals = sorted(plan.rows + plan.bands)
    assert intervals[0][0] == 70 * day + 1
    assert intervals[-1][1] == 100 * day + 60
    for (_, end), (start, _) in itertools.pairwise(intervals):
        assert start == end + 1
    assert (100 * day, 100 * day + 60) in plan.rows
    assert (93 * day, 93 * day + 60) in plan.rows
    long = history_plan(100 * day, 140 * day, (7, 8, 14, 37))
    assert long.bands == []


@BOTH_ACCOUNT_PATHS
def test_transactions_exactly_on_window_edges(
    tmp_path: Path, busy_from: int, dense_from: int
) -> None:
    """Stored transactions a second before, on and after every window edge of every batch row."""
    start = pd.Timestamp("2025-03-01 12:00:00")
    offsets = pd.to_timedelta([0, 10, 20], unit="s")
    batch = pd.DataFrame(
        {
            "transaction_id": ["b0", "b1", "b2"],
            "account_id": "a",
            "merchant": "m",
            "transaction_amount": [5.0, 6.0, 7.0],
            "transaction_date": start + offsets,
            "is_fraud": 0.0,
        }
    )
    times = [
        start - pd.Timedelta(days=edge) + pd.Timedelta(seconds=delta)
        for edge in (0, 1, 7, 8, 14, 30, 37, 38)
        for delta in (-21, -20, -11, -10, -1, 0, 1, 9, 10, 11, 19, 20, 21)
    ]
    history = pd.DataFrame(
        {
            "transaction_id": [f"h{i:04d}" for i in range(len(times))],
            "account_id": "a",
            "merchant": "m",
            "transaction_amount": np.arange(len(times), dtype=float) + 1,
            "transaction_date": times,
            "is_fraud": (np.arange(len(times)) % 3 == 0).astype(float),
        }
    )
    history = history.loc[history["transaction_date"] < start].reset_index(drop=True)
    engine = create_engine(f"sqlite:///{tmp_path / 'edges.db'}")
    ensure_schema(engine)
    store(engine, history, busy_from)
    with engine.connect() as conn:
        read = load_batch_history(conn, batch, dense_accounts_from=dense_from)
        online = compute_batch_features(batch, read)
    everything = pd.concat([history, batch], ignore_index=True)
    offline = compute_features(everything).iloc[len(history) :].set_axis(batch.index)
    pd.testing.assert_frame_equal(online, offline, check_dtype=False)


def test_history_reads_seek_the_index_by_key_and_date(tmp_path: Path) -> None:
    """Each history query must bound its index seek by date, not only by key: otherwise it reads
    every row its accounts and merchants ever had, and preprocess grows with the table (the
    10-minute 1,000 tx/s benchmark's lag did). Checked on the query plans SQLite chooses."""
    frame = transactions(4000, seed=7)
    engine = create_engine(f"sqlite:///{tmp_path / 'plans.db'}")
    ensure_schema(engine)
    store(engine, frame.iloc[:-60], busy_from=ROLLUPS_AND_ROWS[0])
    statements: list[tuple[str, tuple]] = []

    @sa.event.listens_for(engine, "before_cursor_execute")
    def record(conn, cursor, statement, parameters, context, executemany) -> None:
        statements.append((statement, parameters))

    with engine.connect() as conn:
        # As a run calls it: its own offsets excluded (a rerun finds them stored).
        for dense_from in (ROLLUPS_AND_ROWS[1], DENSE_ACCOUNT_TRANSACTIONS):  # both ways
            load_batch_history(
                conn,
                frame.iloc[-60:],
                exclude_source=("t", 0, 3940, 3999),
                dense_accounts_from=dense_from,
            )
        sqlite = conn.connection.driver_connection
        plans = {
            statement: [
                row[3] for row in sqlite.execute(f"EXPLAIN QUERY PLAN {statement}", parameters)
            ]
            for statement, parameters in statements
        }
    assert len(plans) >= 4  # rows and bands, for accounts and merchants
    rollup_plans = {st: plan for st, plan in plans.items() if "account_rollups" in st}
    for statement, plan in plans.items():
        if statement in rollup_plans:
            continue
        seek = next(step for step in plan if "scored_transactions" in step)
        assert "transaction_date>" in seek and "transaction_date<" in seek, (statement, plan)
    # The accounts' busy days in reach (their day rollups), and the dense accounts' bands, the
    # part that grows with a dense stream: whole days, hours and minutes from the rollups, each
    # a seek by key, level and bucket range...
    assert any("sum(account_rollups.amount_sum)" in statement for statement in rollup_plans)
    for plan in rollup_plans.values():
        assert plan == [
            "SEARCH account_rollups USING PRIMARY KEY "
            "(account_id=? AND level=? AND bucket>? AND bucket<?)"
        ]
    # ... and the partial minutes at their ends summed from an index alone.
    account_sums = [
        plan
        for statement, plan in plans.items()
        if "count(*)" in statement and "account_id" in statement and statement not in rollup_plans
    ]
    assert account_sums
    for plan in account_sums:
        assert plan == [
            "SEARCH scored_transactions USING COVERING INDEX ix_scored_account_date_amount "
            "(account_id=? AND transaction_date>? AND transaction_date<?)"
        ]
