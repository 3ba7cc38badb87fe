"""Per-account rollups: transaction counts and amount sums by day, hour and minute.

Why: an account's window band (see `features.history_plan`) used to be summed from every stored
transaction in it, so `preprocess` grew with how busy the batch's accounts were (the 1,000 tx/s
stress stream's 500 cards drifted). From the rollups a band is whole days, hours and minutes
(`split_band`: at most ~200 rollup rows per key however dense the key) plus two partial minutes
summed from the transactions themselves.

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
from fraud_dagster.storage.database import insert_adding_on_conflict, utcnow
from fraud_dagster.storage.schema import account_rollups, schema_upgrades, scored_transactions

logger = logging.getLogger(__name__)

# Bucket sizes in seconds, coarsest first; each divides the one before it, and buckets are
# aligned to the epoch (days to UTC midnight).
ROLLUP_LEVELS_SECONDS = (86_400, 3_600, 60)
BACKFILL_MARK = "account_rollups backfilled"
_BACKFILL_CHUNK = 200_000


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


def _increments_frame(transactions: pd.DataFrame) -> pd.DataFrame:
    """Count and amount sum of `transactions` per account_id, level and bucket, sorted."""
    seconds = (
        pd.to_datetime(transactions["transaction_date"])
        .astype("datetime64[s]")
        .to_numpy()
        .astype(np.int64)
    )
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
            for level in ROLLUP_LEVELS_SECONDS
        ],
        ignore_index=True,
    )
    return (
        parts.groupby(["account_id", "level", "bucket"], sort=True)["amount"]
        .agg(tx_count="count", amount_sum="sum")
        .reset_index()
    )


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


def rollup_increments(transactions: pd.DataFrame) -> list[dict[str, Any]]:
    """What `transactions` (account_id, transaction_amount, transaction_date) add to the
    rollups: one row per account, level and bucket, sorted by that key (so that concurrent
    writers lock rollup rows in the same order and cannot deadlock)."""
    if transactions.empty:
        return []
    return _rollup_records(_increments_frame(transactions))


def add_to_account_rollups(conn: Connection, transactions: pd.DataFrame) -> int:
    """Add newly inserted `transactions` to the rollups, in the caller's transaction; returns
    the rollup rows written. Call it only with rows this transaction inserted."""
    increments = rollup_increments(transactions)
    if increments:
        statement = insert_adding_on_conflict(
            account_rollups, conn.dialect.name, ["tx_count", "amount_sum"]
        )
        conn.execute(statement, increments)
    return len(increments)


@dataclass(frozen=True)
class BandSum:
    """One key's transactions in one band: how many, their amounts' sum, and the rollup rows
    that took."""

    count: int
    total: float
    rollup_rows: int


def sum_account_bands(
    conn: Connection, accounts: Sequence[str], band: tuple[int, int]
) -> tuple[dict[str, BandSum], list[tuple[int, int]]]:
    """The rollups' share of `band` per account (keys with nothing there are left out), and the
    edges of the band the caller must sum from the stored transactions."""
    r = account_rollups
    parts = split_band(*band)
    sums: dict[str, list[float]] = {}
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
            acc = sums.setdefault(account, [0, 0.0, 0])
            acc[0] += int(count)
            acc[1] += float(total or 0.0)
            acc[2] += int(rows)
    result = {
        account: BandSum(int(count), total, int(rows))
        for account, (count, total, rows) in sums.items()
        if count
    }
    return result, parts.edges


def accounts_in_reach(
    conn: Connection, accounts: Sequence[str], reach: tuple[int, int]
) -> tuple[dict[str, int], int]:
    """Per account, how many stored transactions the days overlapping `reach` (closed epoch
    seconds) hold, at least as many as `reach` itself holds (accounts with none left out); and
    the rollup rows that took (one per account and day)."""
    r = account_rollups
    day = ROLLUP_LEVELS_SECONDS[0]
    query = (
        sa.select(r.c.account_id, sa.func.sum(r.c.tx_count), sa.func.count())
        .where(
            r.c.account_id.in_(accounts),
            r.c.level == day,
            r.c.bucket.between(reach[0] // day, reach[1] // day),
        )
        .group_by(r.c.account_id)
    )
    counts: dict[str, int] = {}
    read = 0
    for account, count, rows in conn.execute(query):
        counts[account] = int(count)
        read += int(rows)
    return counts, read


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
            rows = _stored_increments(conn)
            if rows:
                logger.info("filling account rollups from %d stored rollup rows (once)", len(rows))
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


def _stored_increments(conn: Connection) -> list[dict[str, Any]]:
    """The rollups of everything stored, read in chunks and summed per key."""
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
        .groupby(["account_id", "level", "bucket"], sort=True)[["tx_count", "amount_sum"]]
        .sum()
        .reset_index()
    )
    return _rollup_records(summed)
