"""Per-account rollups of busy days: transaction counts and amount sums by day, hour and minute.

Why: an account's window band (see `features.history_plan`) used to be summed from every stored
transaction in it, so `preprocess` grew with how busy the batch's accounts were (the 1,000 tx/s
stress stream's 500 cards drifted). Now a dense account's band is its busy whole days from the
day rows, and the parts of days at its ends from the hour and minute rows (`split_band`) where
that day is busy; quiet days and the partial minutes at the ends are summed from the
transactions. That is at most ~200 rollup rows per account and band however dense the account
(`plan_account_bands`).

Only days with more than `FINE_FROM_DAY_COUNT` transactions have rollups. A quiet day costs no
more to sum from the transactions' index than to read from rollups, and most of a bank's cards
have only quiet days: their transactions write nothing here (an earlier version kept a day row
for every account-day, and its random writes cost those cards more than the rollups saved,
docs/benchmarks.md "Stop 23").

Written by `add_to_account_rollups` in the transaction that inserts the transactions they count
(`storage.batches.persist_batch`): a rerun inserts no row, so it adds nothing. Filled from the
stored transactions once per database and version of these rules (`backfill_account_rollups`).
Merchants have no rollups yet: their windows also need the fraud labels, which arrive later.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Container, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from fraud_dagster.errors import StorageError
from fraud_dagster.features import SECONDS_PER_DAY, epoch_seconds
from fraud_dagster.storage.database import (
    frame_from_rows,
    in_chunks,
    insert_adding_on_conflict,
    utcnow,
    within_seconds,
)
from fraud_dagster.storage.schema import account_rollups, schema_upgrades, scored_transactions

logger = logging.getLogger(__name__)

DAY = SECONDS_PER_DAY
# Finer bucket sizes in seconds, coarser first; each divides a day and the one before it, and
# buckets are aligned to the epoch (days to UTC midnight).
FINE_LEVELS_SECONDS = (3_600, 60)
ROLLUP_LEVELS_SECONDS = (DAY, *FINE_LEVELS_SECONDS)
# An account's day gets rollups (day, hours, minutes) once it holds more transactions than
# this; a sparser day is cheaper to sum from the transactions' index than to keep rollup rows
# for (docs/benchmarks.md, "Stop 22" and "Stop 23").
FINE_FROM_DAY_COUNT = 200
# The fill's mark names the rules it filled by: a database filled by other rules (stop 22 kept
# a day row for every account-day) is filled again once.
BACKFILL_MARK = "account_rollups of busy days filled"
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


def _days_of(transactions: pd.DataFrame) -> np.ndarray:
    """The epoch day (UTC) of each transaction."""
    return epoch_seconds(transactions["transaction_date"]) // DAY


def _increments_frame(
    transactions: pd.DataFrame, levels: Sequence[int] = ROLLUP_LEVELS_SECONDS
) -> pd.DataFrame:
    """Count and amount sum of `transactions` per account_id, level and bucket, sorted."""
    seconds = epoch_seconds(transactions["transaction_date"])
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


def _kept(increments: pd.DataFrame, busy_from: int = FINE_FROM_DAY_COUNT) -> pd.DataFrame:
    """Of the increments of every stored transaction, the rollup rows the table keeps: the days
    with more than `busy_from` transactions, and their hours and minutes."""
    days = increments.loc[increments["level"] == DAY]
    busy = days.loc[days["tx_count"] > busy_from, ["account_id", "bucket"]]
    on_busy_days = _pairs(increments["account_id"], _day_of(increments)).isin(
        _pairs(busy["account_id"], busy["bucket"])
    )
    return increments.loc[on_busy_days].sort_values(_KEY, ignore_index=True)


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


def rollup_rows_of(
    transactions: pd.DataFrame, busy_from: int = FINE_FROM_DAY_COUNT
) -> list[dict[str, Any]]:
    """The rollup rows the table holds when `transactions` (account_id, transaction_amount,
    transaction_date) are all that is stored, sorted by key."""
    if transactions.empty:
        return []
    return _rollup_records(_kept(_increments_frame(transactions), busy_from))


def _account_days(transactions: pd.DataFrame) -> pd.DataFrame:
    """The (account_id, bucket) days `transactions` fall on, with their count (tx_count)."""
    days = pd.DataFrame(
        {"account_id": transactions["account_id"], "bucket": _days_of(transactions)}
    )
    return days.groupby(["account_id", "bucket"], sort=True).size().rename("tx_count").reset_index()


def _rolled_up_days(conn: Connection, days: pd.DataFrame) -> pd.Index:
    """Which of the (account_id, bucket) `days` have a day rollup row."""
    r = account_rollups
    first, last = int(days["bucket"].min()), int(days["bucket"].max())
    found = []
    for accounts in in_chunks(days["account_id"].unique().tolist()):
        query = sa.select(r.c.account_id, r.c.bucket).where(
            r.c.account_id.in_(accounts), r.c.level == DAY, r.c.bucket.between(first, last)
        )
        found.extend(conn.execute(query).all())
    return _pairs([a for a, _ in found], [b for _, b in found])


def _per_day(
    days: pd.DataFrame, query_of_day: Callable[[Sequence[str], int], Iterable[Any]]
) -> list[Any]:
    """The rows `query_of_day(accounts, day)` returns for each day of the (account_id, bucket)
    `days`, with that day's accounts in chunks: one date range per query, so an account's other
    days, busy ones included, are not read."""
    found: list[Any] = []
    for day, of_day in days.groupby("bucket", sort=True):
        for accounts in in_chunks(of_day["account_id"].tolist()):
            found.extend(query_of_day(accounts, int(day)))
    return found


def _of_accounts_on(accounts: Sequence[str], day: int) -> sa.ColumnElement[bool]:
    s = scored_transactions
    return sa.and_(
        s.c.account_id.in_(accounts),
        within_seconds(s.c.transaction_date, (day * DAY, (day + 1) * DAY - 1)),
    )


def _stored_counts(conn: Connection, days: pd.DataFrame) -> pd.DataFrame:
    """How many transactions are stored (stored) on each of the (account_id, bucket) `days`,
    those with none left out; from the transactions' index alone."""
    s = scored_transactions

    def counts(accounts: Sequence[str], day: int) -> Iterable[Any]:
        query = (
            sa.select(s.c.account_id, sa.func.count())
            .where(_of_accounts_on(accounts, day))
            .group_by(s.c.account_id)
        )
        return [(account, day, count) for account, count in conn.execute(query)]

    return frame_from_rows(_per_day(days, counts), ["account_id", "bucket", "stored"])


def _stored_on_days(conn: Connection, days: pd.DataFrame) -> pd.DataFrame:
    """The stored transactions (account_id, transaction_amount, transaction_date) of the
    (account_id, bucket) `days`."""
    s = scored_transactions

    def rows(accounts: Sequence[str], day: int) -> Iterable[Any]:
        columns = (s.c.account_id, s.c.transaction_amount, s.c.transaction_date)
        return conn.execute(sa.select(*columns).where(_of_accounts_on(accounts, day))).all()

    columns = ["account_id", "transaction_amount", "transaction_date"]
    return frame_from_rows(_per_day(days, rows), columns)


def may_start_rollups(
    conn: Connection, candidates: pd.DataFrame, busy_from: int = FINE_FROM_DAY_COUNT
) -> bool:
    """Call before the batch's transactions are inserted: whether this write may start the
    rollups of days that become busy (see `add_to_account_rollups`).

    A day's rollups are started from its stored transactions, so no other writer may hold
    uncommitted transactions of that day meanwhile. SQLite has one writer at a time, from its
    first insert to its commit: always. PostgreSQL: only if the batch would make a day busy that
    has no rollups yet (its committed transactions and the batch's `candidates` together); the
    write then takes a SHARE ROW EXCLUSIVE lock on the transactions table, which waits for the
    other writers to commit and keeps new ones waiting until this one does. A day becomes busy
    once per account, so this lock is rare; a write that does not take it leaves such a day
    without rollups (read from the transactions, exactly) for the next write to start.
    """
    if conn.dialect.name == "sqlite":
        return True
    if candidates.empty:
        return False
    days = _account_days(candidates)
    quiet = days.loc[~_pairs(days["account_id"], days["bucket"]).isin(_rolled_up_days(conn, days))]
    if quiet.empty:
        return False
    together = quiet.merge(_stored_counts(conn, quiet), on=["account_id", "bucket"], how="left")
    if not (together["tx_count"] + together["stored"].fillna(0) > busy_from).any():
        return False
    conn.execute(sa.text(f"LOCK TABLE {scored_transactions.name} IN SHARE ROW EXCLUSIVE MODE"))
    return True


def add_to_account_rollups(
    conn: Connection,
    transactions: pd.DataFrame,
    *,
    may_start: bool,
    busy_from: int = FINE_FROM_DAY_COUNT,
) -> int:
    """Add newly inserted `transactions` to the rollups, in the caller's transaction; returns
    the rollup rows written. Call it only with rows this transaction inserted, and `may_start`
    as `may_start_rollups` said before they were.

    Only busy days (more than `busy_from` transactions) have rollups: a quiet day is summed
    from the transactions' index as cheaply, and most of a bank's cards have only quiet days, so
    their transactions write no rollup row at all. A day with rollups gets this write's
    increments, days first, then hours and minutes, each in key order (concurrent writers lock
    rollup rows in one order and cannot deadlock). If `may_start`, a day without them that this
    write makes busy gets its day, hour and minute rows from all its stored transactions (this
    write's included).
    """
    if transactions.empty:
        return 0
    days = _account_days(transactions)
    rolled = _pairs(days["account_id"], days["bucket"]).isin(_rolled_up_days(conn, days))
    on_rolled = _pairs(transactions["account_id"], _days_of(transactions)).isin(
        _pairs(days.loc[rolled, "account_id"], days.loc[rolled, "bucket"])
    )
    increments = _increments_frame(transactions.loc[on_rolled])
    add = insert_adding_on_conflict(account_rollups, conn.dialect.name, ["tx_count", "amount_sum"])
    written = 0
    for part in (increments["level"] == DAY, increments["level"] != DAY):
        if part.any():
            records = _rollup_records(increments.loc[part])  # sorted by key
            conn.execute(add, records)
            written += len(records)
    if may_start and not rolled.all():
        counted = _stored_counts(conn, days.loc[~rolled])  # this write's rows included
        busy = counted.loc[counted["stored"] > busy_from]
        if len(busy):
            # No other writer can hold rows of these days (see `may_start_rollups`), so none
            # can have started them meanwhile: a clash would be an error, not a sum.
            records = _rollup_records(_increments_frame(_stored_on_days(conn, busy)))
            conn.execute(sa.insert(account_rollups), records)
            written += len(records)
    return written


@dataclass
class AccountBands:
    """How the accounts' band sums are read (`plan_account_bands`): `sums` taken from the
    rollups per (account, band index) as [count, amount sum]; `from_rows` (accounts, band index,
    interval) left to sum from the stored transactions; `rollup_rows` read."""

    sums: dict[tuple[str, int], list[float]] = field(default_factory=dict)
    from_rows: list[tuple[list[str], int, tuple[int, int]]] = field(default_factory=list)
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

    The day rollups of `reach` come first (busy days only): accounts with at most `dense_from`
    transactions on them are cheaper summed from the transactions. A denser account's band is
    its busy whole days from those day rows, its quiet whole days from the transactions, and at
    each end the part of a day: from the hour and minute rollups on a busy day, else from the
    transactions.
    """
    r = account_rollups
    plan = AccountBands()
    busy_days: dict[str, dict[int, tuple[int, float]]] = {}
    query = sa.select(r.c.account_id, r.c.bucket, r.c.tx_count, r.c.amount_sum).where(
        r.c.account_id.in_(accounts),
        r.c.level == DAY,
        r.c.bucket.between(reach[0] // DAY, reach[1] // DAY),
    )
    for account, day, count, total in conn.execute(query):
        busy_days.setdefault(account, {})[int(day)] = (int(count), float(total))
        plan.rollup_rows += 1
    on_busy_days = {a: sum(count for count, _ in days.values()) for a, days in busy_days.items()}
    dense = [a for a in accounts if on_busy_days.get(a, 0) > dense_from]
    sparse = [a for a in accounts if on_busy_days.get(a, 0) <= dense_from]
    for band, (first, last) in bands:
        if sparse:
            plan.from_rows.append((sparse, band, (first, last)))
        if not dense:
            continue
        whole, partial = _by_day(first, last)
        quiet: dict[tuple[int, int], list[str]] = {}
        if whole:
            for account in dense:
                days = busy_days[account]
                for day in range(whole[0], whole[1] + 1):
                    if day in days:
                        plan.add(account, band, *days[day])
                for start, end in _quiet_stretches(days, whole):
                    quiet.setdefault((start * DAY, (end + 1) * DAY - 1), []).append(account)
        for interval, of_accounts in quiet.items():
            plan.from_rows.append((of_accounts, band, interval))
        for day, start, end in partial:
            fine = [a for a in dense if day in busy_days[a]]
            rows_only = [a for a in dense if day not in busy_days[a]]
            if rows_only:
                plan.from_rows.append((rows_only, band, (start, end)))
            if fine:
                _read_fine(conn, plan, fine, band, split_band(start, end, FINE_LEVELS_SECONDS))
    return plan


def _quiet_stretches(busy: Container[int], days: tuple[int, int]) -> list[tuple[int, int]]:
    """The runs of days in the closed range `days` that are not in `busy`, as (first, last)."""
    stretches: list[tuple[int, int]] = []
    start = None
    for day in range(days[0], days[1] + 2):
        if day <= days[1] and day not in busy:
            start = day if start is None else start
        elif start is not None:
            stretches.append((start, day - 1))
            start = None
    return stretches


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
    (no rollups, or rollups kept by other rules) is summed once, in one transaction with the
    mark, so a failure leaves no half-filled rollups behind: the next process tries again.
    Upgrade with the daemon stopped: a run of the earlier version that stores rows after this
    fill leaves them out of the rollups.
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
