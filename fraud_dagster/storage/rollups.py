"""Per-account rollups: transaction counts and amount sums by day, and by hour and minute on
an account's busy days.

Why: an account's window band (see `features.history_plan`) used to be summed from every stored
transaction in it, so `preprocess` grew with how busy the batch's accounts were (the 1,000 tx/s
stress stream's 500 cards drifted). Now a busy account's band is its whole days from the day
rows, and the parts of days at its ends from the hour and minute rows (`split_band`) where that
day is busy, from the transactions where it is not; only the partial minutes at the ends are
always summed from the transactions. That is at most ~200 rollup rows per account and band
however dense the account (`plan_account_bands`). Quiet accounts (most of a bank's) cost one day
row per transaction to keep, and are read as before.

Written by `add_to_account_rollups` in the transaction that inserts the transactions they count
(`storage.batches.persist_batch`): a rerun inserts no row, so it adds nothing. Filled from the
stored transactions once, when a database first gets the table (`backfill_account_rollups`).
Merchants have no rollups yet: their windows also need the fraud labels, which arrive later.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from fraud_dagster.errors import StorageError
from fraud_dagster.storage.database import (
    datetime_at,
    frame_from_rows,
    in_chunks,
    insert_adding_on_conflict,
    utcnow,
)
from fraud_dagster.storage.schema import account_rollups, schema_upgrades, scored_transactions

logger = logging.getLogger(__name__)

DAY = 86_400
# Finer bucket sizes in seconds, coarser first; each divides a day and the one before it, and
# buckets are aligned to the epoch (days to UTC midnight).
FINE_LEVELS_SECONDS = (3_600, 60)
ROLLUP_LEVELS_SECONDS = (DAY, *FINE_LEVELS_SECONDS)
# An account's day gets hour and minute rollups once it holds more transactions than this; a
# sparser day is cheaper to sum from the transactions' index than to keep three rollup rows per
# transaction for (docs/benchmarks.md, "Stop 22").
FINE_FROM_DAY_COUNT = 200
BACKFILL_MARK = "account_rollups backfilled"
_BACKFILL_CHUNK = 200_000
_KEY = ["account_id", "level", "bucket"]


@dataclass(frozen=True)
class BandParts:
    """A closed interval of epoch seconds as whole rollup buckets and leftover edges.

    `buckets`: (level in seconds, first bucket, last bucket), bucket b of a level covering
    seconds [b * level, (b + 1) * level - 1]. `edges`: closed second intervals, to be summed
    from the stored transactions: shorter than the finest level on each side, or one edge
    shorter than two of it where no whole bucket fits.
    """

    buckets: list[tuple[int, int, int]] = field(default_factory=list)
    edges: list[tuple[int, int]] = field(default_factory=list)


def split_band(first: int, last: int, levels: Sequence[int] = ROLLUP_LEVELS_SECONDS) -> BandParts:
    """[first, last] as whole buckets (the coarsest level that fits, finer ones towards the
    ends) and at most two edges; the parts cover it exactly once."""
    if first > last:
        return BandParts()
    if not levels:
        return BandParts(edges=[(first, last)])
    size, finer = levels[0], levels[1:]
    first_bucket = -(-first // size)
    last_bucket = (last + 1) // size - 1
    if first_bucket > last_bucket:
        return split_band(first, last, finer)
    before = split_band(first, first_bucket * size - 1, finer)
    after = split_band((last_bucket + 1) * size, last, finer)
    return BandParts(
        buckets=[*before.buckets, (size, first_bucket, last_bucket), *after.buckets],
        edges=[*before.edges, *after.edges],
    )


def _epoch_seconds(transactions: pd.DataFrame) -> np.ndarray:
    dates = pd.to_datetime(transactions["transaction_date"])
    return dates.astype("datetime64[s]").to_numpy().astype(np.int64)


def _increments_frame(
    transactions: pd.DataFrame, levels: Sequence[int] = ROLLUP_LEVELS_SECONDS
) -> pd.DataFrame:
    """Count and amount sum of `transactions` per account_id, level and bucket, sorted."""
    seconds = _epoch_seconds(transactions)
    accounts = transactions["account_id"].to_numpy()
    amounts = transactions["transaction_amount"].to_numpy(dtype=np.float64)
    parts = pd.concat(
        [
            pd.DataFrame(
                {
                    "account_id": accounts,
                    "level": level,
                    "bucket": seconds // level,
                    "amount": amounts,
                }
            )
            for level in levels
        ],
        ignore_index=True,
    )
    return (
        parts.groupby(_KEY, sort=True)["amount"]
        .agg(tx_count="count", amount_sum="sum")
        .reset_index()
    )


def _day_of(frame: pd.DataFrame) -> pd.Series:
    """The day bucket each rollup row of `frame` falls in."""
    return frame["bucket"] * frame["level"] // DAY


def _kept(increments: pd.DataFrame) -> pd.DataFrame:
    """Of the increments of every stored transaction, the rollup rows the table keeps: every
    day, and the hours and minutes of days with more than `FINE_FROM_DAY_COUNT`."""
    days = increments.loc[increments["level"] == DAY]
    busy = days.loc[days["tx_count"] > FINE_FROM_DAY_COUNT, ["account_id", "bucket"]]
    fine = increments.loc[increments["level"] != DAY]
    fine = fine.loc[
        _pairs(fine["account_id"], _day_of(fine)).isin(_pairs(busy["account_id"], busy["bucket"]))
    ]
    return pd.concat([days, fine]).sort_values(_KEY, ignore_index=True)


def _pairs(accounts: Any, days: Any) -> pd.Index:
    return pd.MultiIndex.from_arrays([np.asarray(accounts), np.asarray(days, dtype=np.int64)])


def _rollup_records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return [
        {
            "account_id": account,
            "level": int(level),
            "bucket": int(bucket),
            "tx_count": int(count),
            "amount_sum": float(total),
        }
        for account, level, bucket, count, total in zip(
            frame["account_id"],
            frame["level"],
            frame["bucket"],
            frame["tx_count"],
            frame["amount_sum"],
            strict=True,
        )
    ]


def rollup_rows_of(transactions: pd.DataFrame) -> list[dict[str, Any]]:
    """The rollup rows the table holds when `transactions` (account_id, transaction_amount,
    transaction_date) are all that is stored, sorted by key."""
    if transactions.empty:
        return []
    return _rollup_records(_kept(_increments_frame(transactions)))


def add_to_account_rollups(conn: Connection, transactions: pd.DataFrame) -> int:
    """Add newly inserted `transactions` to the rollups, in the caller's transaction; returns
    the rollup rows written. Call it only with rows this transaction inserted.

    Days first, then hours and minutes, each in key order: concurrent writers lock rollup rows
    in one order and cannot deadlock. The day rows' new counts say which days are busy: a day
    that becomes busy with this write gets its hours and minutes from all its stored
    transactions (this write's included), one that was busy before gets this write's increments.
    A writer waiting on a day row's lock counts on from what the other one committed.
    """
    if transactions.empty:
        return 0
    days = _increments_frame(transactions, (DAY,))
    add = insert_adding_on_conflict(account_rollups, conn.dialect.name, ["tx_count", "amount_sum"])
    conn.execute(add, _rollup_records(days))
    counted = days.merge(_day_counts(conn, days))  # this write's days only
    busy = counted["after"] > FINE_FROM_DAY_COUNT
    before = counted["after"] - counted["tx_count"]
    became_busy = counted.loc[busy & (before <= FINE_FROM_DAY_COUNT)]
    busy_before = counted.loc[busy & (before > FINE_FROM_DAY_COUNT)]
    parts = []
    if len(busy_before):
        day = _epoch_seconds(transactions) // DAY
        on_busy_days = _pairs(transactions["account_id"], day).isin(
            _pairs(busy_before["account_id"], busy_before["bucket"])
        )
        parts.append(_increments_frame(transactions.loc[on_busy_days], FINE_LEVELS_SECONDS))
    if len(became_busy):
        parts.append(_stored_fine_increments(conn, became_busy))
    fine = pd.concat(parts).sort_values(_KEY) if parts else days.iloc[:0]
    if len(fine):
        conn.execute(add, _rollup_records(fine))
    return len(days) + len(fine)


def _day_counts(conn: Connection, days: pd.DataFrame) -> pd.DataFrame:
    """The stored day rows of `days`' accounts over its days (account_id, bucket, after).

    Read back after this transaction's upsert of them, not returned by it (cheaper than RETURNING
    per row here): its row locks keep every other writer off them until it commits, so the
    counts are this write's plus what was committed before it."""
    r = account_rollups
    first, last = int(days["bucket"].min()), int(days["bucket"].max())
    counts = []
    for accounts in in_chunks(days["account_id"].unique().tolist()):
        query = sa.select(r.c.account_id, r.c.bucket, r.c.tx_count).where(
            r.c.account_id.in_(accounts), r.c.level == DAY, r.c.bucket.between(first, last)
        )
        counts.extend(conn.execute(query).all())
    return frame_from_rows(counts, ["account_id", "bucket", "after"])


def _stored_fine_increments(conn: Connection, days: pd.DataFrame) -> pd.DataFrame:
    """Hour and minute rollups of every stored transaction of the (account_id, bucket) days."""
    s = scored_transactions
    wanted = _pairs(days["account_id"], days["bucket"])
    first, last = int(days["bucket"].min()), int(days["bucket"].max())
    found = []
    for accounts in in_chunks(days["account_id"].unique().tolist()):
        query = sa.select(s.c.account_id, s.c.transaction_amount, s.c.transaction_date).where(
            s.c.account_id.in_(accounts),
            s.c.transaction_date >= datetime_at(first * DAY),
            s.c.transaction_date < datetime_at((last + 1) * DAY),
        )
        found.extend(conn.execute(query).all())
    rows = frame_from_rows(found, ["account_id", "transaction_amount", "transaction_date"])
    increments = _increments_frame(rows, FINE_LEVELS_SECONDS)
    return increments.loc[_pairs(increments["account_id"], _day_of(increments)).isin(wanted)]


@dataclass
class AccountBands:
    """How the accounts' band sums are read (`plan_account_bands`): `sums` taken from the
    rollups per (account, band index) as [count, amount sum]; `from_rows` (accounts, band index,
    interval) left to sum from the stored transactions; `accounts` holding anything in reach;
    `rollup_rows` read."""

    sums: dict[tuple[str, int], list[float]] = field(default_factory=dict)
    from_rows: list[tuple[list[str], int, tuple[int, int]]] = field(default_factory=list)
    accounts: list[str] = field(default_factory=list)
    rollup_rows: int = 0

    def add(self, account: str, band: int, count: float, total: float) -> None:
        both = self.sums.setdefault((account, band), [0, 0.0])
        both[0] += count
        both[1] += total


def _by_day(first: int, last: int) -> tuple[tuple[int, int] | None, list[tuple[int, int, int]]]:
    """[first, last] as a range of whole days (or None) and the parts of days at its ends, each
    (day, first second, last second) within one day."""
    whole = split_band(first, last, (DAY,))
    days = [(b0, b1) for _, b0, b1 in whole.buckets]
    partial = []
    for start, end in whole.edges:
        for day in range(start // DAY, end // DAY + 1):
            partial.append((day, max(start, day * DAY), min(end, (day + 1) * DAY - 1)))
    return (days[0] if days else None), partial


def plan_account_bands(
    conn: Connection,
    accounts: Sequence[str],
    bands: Sequence[tuple[int, tuple[int, int]]],
    reach: tuple[int, int],
    dense_from: int,
) -> AccountBands:
    """Read what the rollups hold of `bands` ((index, closed epoch-second interval) each) for
    `accounts`, and say what must be summed from the stored transactions instead.

    The day rollups of `reach` come first: accounts with nothing there need no read at all, and
    those with at most `dense_from` transactions are cheaper summed from the transactions. A
    denser account's band is its whole days (from those day rows), and at each end the part of a
    day: from the hour and minute rollups if that day has them (busy), else from the rows.
    """
    r = account_rollups
    plan = AccountBands()
    day_rows: dict[str, list[tuple[int, int, float]]] = {}
    query = sa.select(r.c.account_id, r.c.bucket, r.c.tx_count, r.c.amount_sum).where(
        r.c.account_id.in_(accounts),
        r.c.level == DAY,
        r.c.bucket.between(reach[0] // DAY, reach[1] // DAY),
    )
    for account, day, count, total in conn.execute(query):
        day_rows.setdefault(account, []).append((int(day), int(count), float(total)))
        plan.rollup_rows += 1
    plan.accounts = [a for a in accounts if a in day_rows]
    in_reach = {a: sum(count for _, count, _ in rows) for a, rows in day_rows.items()}
    dense = [a for a in plan.accounts if in_reach[a] > dense_from]
    sparse = [a for a in plan.accounts if in_reach[a] <= dense_from]
    busy = {(a, day) for a in dense for day, count, _ in day_rows[a] if count > FINE_FROM_DAY_COUNT}
    for band, (first, last) in bands:
        if sparse:
            plan.from_rows.append((sparse, band, (first, last)))
        if not dense:
            continue
        whole, partial = _by_day(first, last)
        if whole:
            for account in dense:
                for day, count, total in day_rows[account]:
                    if whole[0] <= day <= whole[1]:
                        plan.add(account, band, count, total)
        for day, start, end in partial:
            fine = [a for a in dense if (a, day) in busy]
            rows_only = [a for a in dense if (a, day) not in busy]
            if rows_only:
                plan.from_rows.append((rows_only, band, (start, end)))
            if fine:
                _read_fine(conn, plan, fine, band, split_band(start, end, FINE_LEVELS_SECONDS))
    return plan


def _read_fine(
    conn: Connection, plan: AccountBands, accounts: list[str], band: int, parts: BandParts
) -> None:
    r = account_rollups
    for level, first_bucket, last_bucket in parts.buckets:
        query = (
            sa.select(
                r.c.account_id,
                sa.func.sum(r.c.tx_count),
                sa.func.sum(r.c.amount_sum),
                sa.func.count(),
            )
            .where(
                r.c.account_id.in_(accounts),
                r.c.level == level,
                r.c.bucket.between(first_bucket, last_bucket),
            )
            .group_by(r.c.account_id)
        )
        for account, count, total, rows in conn.execute(query):
            plan.add(account, band, int(count), float(total or 0.0))
            plan.rollup_rows += int(rows)
    for edge in parts.edges:
        plan.from_rows.append((accounts, band, edge))


def backfill_account_rollups(engine: Engine) -> None:
    """Fill the rollups from the stored transactions, once per database (`BACKFILL_MARK`).

    A new database fills nothing and only records the mark. A database an earlier version wrote
    is summed once, in one transaction with the mark, so a failure leaves no half-filled rollups
    behind: the next process tries again. Upgrade with the daemon stopped: a run of the earlier
    version that stores rows after this fill leaves them out of the rollups.
    """
    marks = schema_upgrades
    try:
        with engine.begin() as conn:
            if conn.execute(sa.select(marks.c.name).where(marks.c.name == BACKFILL_MARK)).first():
                return
            conn.execute(sa.delete(account_rollups))
            rows = _stored_rollup_rows(conn)
            if rows:
                logger.info("filling account rollups: %d rollup rows (once)", len(rows))
                conn.execute(sa.insert(account_rollups), rows)
            conn.execute(sa.insert(marks), [{"name": BACKFILL_MARK, "done_at": utcnow()}])
    except SQLAlchemyError as exc:
        # Another process may have filled them meanwhile (its mark then clashed with ours).
        with engine.connect() as conn:
            done = conn.execute(
                sa.select(marks.c.name).where(marks.c.name == BACKFILL_MARK)
            ).first()
        if not done:
            raise StorageError(f"cannot fill the account rollups: {exc}") from exc


def _stored_rollup_rows(conn: Connection) -> list[dict[str, Any]]:
    """The rollup rows of everything stored, read in chunks and summed per key."""
    s = scored_transactions
    query = sa.select(s.c.account_id, s.c.transaction_amount, s.c.transaction_date)
    result = conn.execute(query.execution_options(yield_per=_BACKFILL_CHUNK))
    partial = [
        _increments_frame(
            pd.DataFrame(chunk, columns=["account_id", "transaction_amount", "transaction_date"])
        )
        for chunk in result.partitions()
    ]
    if not partial:
        return []
    summed = (
        pd.concat(partial, ignore_index=True)
        .groupby(_KEY, sort=True)[["tx_count", "amount_sum"]]
        .sum()
        .reset_index()
    )
    return _rollup_records(_kept(summed))
