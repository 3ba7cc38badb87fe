"""What a batch reads before it is scored: stored history for its features, and its ids.

Reads only; one IN list per `IN_CHUNK` keys. The history is compact (see `load_batch_history`),
so a batch reads about as many rows as it has, however much is stored.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from fraud_dagster.features import (
    ACCOUNT_EDGES_DAYS,
    ACCOUNT_HISTORY_COLUMNS,
    MERCHANT_EDGES_DAYS,
    MERCHANT_HISTORY_COLUMNS,
    WEIGHT,
    BatchHistory,
    HistoryPlan,
    HistoryRead,
    history_plan,
)
from fraud_dagster.messages import Rejection
from fraud_dagster.storage.database import datetime_at, frame_from_rows, in_chunks, within_seconds
from fraud_dagster.storage.rollups import plan_account_bands
from fraud_dagster.storage.schema import fraud_labels, scored_transactions

# Accounts with more stored transactions than this within their windows' reach have their band
# sums read from the rollups; fewer are cheaper to sum from the transactions' index (a rollup
# band costs about as much as summing a few hundred index entries, docs/benchmarks.md).
DENSE_ACCOUNT_TRANSACTIONS = 1_000


def _not_from(source: tuple[str, int, int, int] | None) -> sa.ColumnElement[bool]:
    s = scored_transactions
    if source is None:
        return sa.true()
    topic, partition, first, last = source
    return sa.not_(
        sa.and_(
            s.c.source_topic == topic,
            s.c.source_partition == partition,
            s.c.source_offset.between(first, last),
        )
    )


def _overlaps(interval: tuple[int, int], span: tuple[int, int]) -> bool:
    return interval[0] <= span[1] and span[0] <= interval[1]


def _history_part(
    conn: Connection,
    source: sa.FromClause,
    key: sa.Column,
    keys: Sequence[str],
    plan: HistoryPlan,
    value: sa.ColumnElement,
    batch_span: tuple[int, int],
    exclude_source: tuple[str, int, int, int] | None,
    *,
    dense_accounts_from: int | None = None,
) -> tuple[pd.DataFrame, HistoryRead]:
    """Rows of `plan.rows` and one aggregate row per key and band of `plan.bands`, read from
    `source` (scored_transactions, joined to what `value` needs), and how much that was.

    With `dense_accounts_from` (`key` is the account, `value` the amount) the accounts' bands
    are planned by `storage.rollups.plan_account_bands`: the bands of accounts with more than
    that many transactions on busy days in reach come from their rollups, all but their quiet
    days and partial minutes. Bands that overlap the batch's
    own span (`history_plan` makes none for the accounts' edges, which start at 0) are summed
    from `source`, where a rerun's stored rows can be left out.
    """
    s = scored_transactions
    date = s.c.transaction_date
    rows: list[Any] = []
    bands: list[Any] = []
    rollup_rows = 0

    def selected(chunk: Sequence[str], interval: tuple[int, int]) -> sa.ColumnElement[bool]:
        # One query per interval: a plain date range lets the database seek the (key, date)
        # index by both columns (under one OR of all intervals SQLite sought by key only and
        # read every row the key ever had). The batch's own stored messages carry its dates,
        # so only an interval overlapping `batch_span` needs them excluded; the others can
        # then be summed from an index alone.
        exclude = exclude_source if _overlaps(interval, batch_span) else None
        return sa.and_(key.in_(chunk), within_seconds(date, interval), _not_from(exclude))

    def add_sums(
        sums: dict[tuple[str, int], list[float]],
        chunk: Sequence[str],
        band_index: int,
        interval: tuple[int, int],
    ) -> None:
        query = (
            sa.select(key, sa.func.count(), sa.func.sum(value))
            .select_from(source)
            .where(selected(chunk, interval))
            .group_by(key)
        )
        for k, n, total in conn.execute(query):
            both = sums.setdefault((k, band_index), [0, 0.0])
            both[0] += n
            both[1] += total or 0.0

    reach = (min(a for a, _ in plan.rows + plan.bands), max(b for _, b in plan.rows + plan.bands))
    for chunk in in_chunks(list(keys)):
        sums: dict[tuple[str, int], list[float]] = {}
        from_rows = [(chunk, index, interval) for index, interval in enumerate(plan.bands)]
        if dense_accounts_from is not None:
            own = [
                (index, interval)
                for index, interval in enumerate(plan.bands)
                if exclude_source and _overlaps(interval, batch_span)
            ]
            others = [band for band in enumerate(plan.bands) if band not in own]
            accounts = plan_account_bands(conn, chunk, others, reach, dense_accounts_from)
            rollup_rows += accounts.rollup_rows
            sums = accounts.sums
            from_rows = [*accounts.from_rows, *((chunk, index, band) for index, band in own)]
        for interval in plan.rows:
            query = (
                sa.select(s.c.transaction_id, key, date, value, sa.literal(1.0))
                .select_from(source)
                .where(selected(chunk, interval))
            )
            rows.extend(conn.execute(query).all())
        for part, band_index, interval in from_rows:
            if part:
                add_sums(sums, part, band_index, interval)
        bands.extend((k, band_index, n, total) for (k, band_index), (n, total) in sums.items() if n)
    names = ["transaction_id", "key", "transaction_date", "value", WEIGHT]
    aggregates = [
        # One row for the n transactions of a key in a band, at the band's last second;
        # the NUL in its id cannot clash with a real id (identifiers exclude control characters).
        (
            f"\x00band{band_index}:{key_value}",
            key_value,
            datetime_at(plan.bands[band_index][1]),
            total,
            count,
        )
        for key_value, band_index, count, total in bands
    ]
    frame = frame_from_rows([*rows, *aggregates], names)
    frame["transaction_date"] = pd.to_datetime(frame["transaction_date"])
    frame["value"] = frame["value"].astype(float).fillna(0.0)
    frame[WEIGHT] = frame[WEIGHT].astype(float)
    read = HistoryRead(
        rows=len(rows),
        sums=len(bands),
        summed=sum(n for _, _, n, _ in bands),
        rollup_rows=rollup_rows,
    )
    return frame, read


def load_batch_history(
    conn: Connection,
    batch: pd.DataFrame,
    exclude_source: tuple[str, int, int, int] | None = None,
    dense_accounts_from: int = DENSE_ACCOUNT_TRANSACTIONS,
) -> BatchHistory:
    """What the windows of `batch` (account_id, merchant, transaction_date) need from storage.

    Near the windows' edges stored transactions come as rows, elsewhere as one aggregate row
    per key and band (see `features.history_plan`), so the history of a batch stays about as
    large as the batch however much is stored. The aggregates of accounts with more than
    `dense_accounts_from` stored transactions on busy days in reach are summed from their rollups
    (`storage.rollups`), so they cost about the same however busy the accounts are.
    `exclude_source` = (topic, partition, first, last) leaves out the batch's own messages,
    which a rerun finds stored already.
    """
    seconds = pd.to_datetime(batch["transaction_date"]).astype("datetime64[s]").astype("int64")
    first, last = int(seconds.min()), int(seconds.max())
    s, labels = scored_transactions, fraud_labels
    accounts, accounts_read = _history_part(
        conn,
        s,
        s.c.account_id,
        batch["account_id"].unique().tolist(),
        history_plan(first, last, ACCOUNT_EDGES_DAYS),
        s.c.transaction_amount,
        (first, last),
        exclude_source,
        dense_accounts_from=dense_accounts_from,
    )
    accounts = accounts.rename(columns={"key": "account_id", "value": "transaction_amount"})
    fraud = sa.case((labels.c.is_fraud == sa.true(), 1.0), else_=0.0)
    merchants, merchants_read = _history_part(
        conn,
        s.outerjoin(labels, labels.c.transaction_id == s.c.transaction_id),
        s.c.merchant,
        batch["merchant"].unique().tolist(),
        history_plan(first, last, MERCHANT_EDGES_DAYS),
        fraud,
        (first, last),
        exclude_source,
    )
    merchants = merchants.rename(columns={"key": "merchant", "value": "is_fraud"})
    return BatchHistory(
        accounts=accounts[[*ACCOUNT_HISTORY_COLUMNS, WEIGHT]],
        merchants=merchants[[*MERCHANT_HISTORY_COLUMNS, WEIGHT]],
        accounts_read=accounts_read,
        merchants_read=merchants_read,
    )


def stored_sources(conn: Connection, transaction_ids: Sequence[str]) -> pd.DataFrame:
    """Where already-stored transaction ids came from: one row per stored id, with
    stored_topic, stored_partition and stored_offset."""
    s = scored_transactions
    rows: list[Any] = []
    for ids in in_chunks(list(transaction_ids)):
        query = sa.select(
            s.c.transaction_id, s.c.source_topic, s.c.source_partition, s.c.source_offset
        ).where(s.c.transaction_id.in_(ids))
        rows.extend(conn.execute(query).all())
    return frame_from_rows(
        rows, ["transaction_id", "stored_topic", "stored_partition", "stored_offset"]
    )


def classify_stored(conn: Connection, frame: pd.DataFrame) -> tuple[pd.Series, list[Rejection]]:
    """Check `frame`'s rows against what is stored: (already stored here, duplicates).

    A row whose transaction id is stored from the same Kafka coordinates is the same message
    read again (a rerun): the boolean Series marks those. A row whose id is stored from other
    coordinates is a duplicate and becomes a rejection. Rows that match nothing stored are
    neither. One query per 5,000 ids; the comparison is vectorized.
    """
    rerun = pd.Series(False, index=frame.index)
    if frame.empty:
        return rerun, []
    stored = stored_sources(conn, frame["transaction_id"].tolist())
    if stored.empty:
        return rerun, []
    matched = frame[["transaction_id", "source_topic", "source_partition", "source_offset"]].merge(
        stored, on="transaction_id", how="left"
    )
    matched.index = frame.index
    found = matched["stored_topic"].notna()
    same_place = (
        found
        & (matched["source_topic"] == matched["stored_topic"])
        & (matched["source_partition"] == matched["stored_partition"])
        & (matched["source_offset"] == matched["stored_offset"])
    )
    rerun = same_place.astype(bool)
    rejections = [
        Rejection(
            frame.at[pos, "source_topic"],
            int(frame.at[pos, "source_partition"]),
            int(frame.at[pos, "source_offset"]),
            frame.at[pos, "raw_value"],
            "duplicate transaction_id, first stored from "
            f"{matched.at[pos, 'stored_topic']}/{int(matched.at[pos, 'stored_partition'])} "
            f"offset {int(matched.at[pos, 'stored_offset'])}",
            frame.at[pos, "transaction_id"],
        )
        for pos in frame.index[found & ~same_place]
    ]
    return rerun, rejections
