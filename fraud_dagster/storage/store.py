"""Reads and writes of the application database, one function per question or write.

All SQL goes through SQLAlchemy Core with bound parameters; the only dialect-specific piece is
`insert_ignoring_conflicts`, which picks SQLite's or PostgreSQL's `ON CONFLICT DO NOTHING`.
Writes of a batch happen in one database transaction: a failure leaves nothing half-written,
and a rerun of the same batch finds its rows stored and writes nothing twice.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from fraud_dagster.errors import StorageError
from fraud_dagster.features import (
    ACCOUNT_EDGES_DAYS,
    ACCOUNT_HISTORY_COLUMNS,
    MERCHANT_EDGES_DAYS,
    MERCHANT_HISTORY_COLUMNS,
    WEIGHT,
    BatchHistory,
    HistoryPlan,
    history_plan,
)
from fraud_dagster.messages import Rejection
from fraud_dagster.storage.schema import (
    fraud_alerts,
    fraud_labels,
    metadata,
    model_promotions,
    rejected_transactions,
    scored_transactions,
    stored_ranges,
    suspicious_transactions,
)

logger = logging.getLogger(__name__)

# Bound parameters per IN list; stays under SQLite's 32,766-variable limit with room to spare.
IN_CHUNK = 5000


def utcnow() -> datetime:
    """Naive UTC now: the convention of every DateTime column."""
    return datetime.now(UTC).replace(tzinfo=None)


def create_engine(url: str) -> Engine:
    """An engine for `url`, with the settings each backend needs for concurrent batch runs."""
    if url.startswith("sqlite"):
        database = sa.engine.make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        # hide_parameters: driver errors must not echo transaction data (account ids) into
        # logs, run failures or operator emails.
        engine = sa.create_engine(url, connect_args={"timeout": 60}, hide_parameters=True)

        @sa.event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return sa.create_engine(url, pool_pre_ping=True, hide_parameters=True)


def ensure_schema(engine: Engine) -> None:
    """Create missing tables; existing ones are left as they are."""
    try:
        metadata.create_all(engine)
    except SQLAlchemyError as exc:
        raise StorageError(
            f"cannot create the schema on {engine.url!r} (is the database running and "
            f"reachable?); batches fail until it is, rerun them afterwards: {exc}"
        ) from exc


def insert_ignoring_conflicts(table: sa.Table, dialect_name: str) -> sa.Insert:
    """`INSERT ... ON CONFLICT DO NOTHING` for SQLite and PostgreSQL alike."""
    if dialect_name == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing()
    if dialect_name == "sqlite":
        return sqlite.insert(table).on_conflict_do_nothing()
    raise StorageError(f"unsupported database dialect {dialect_name!r}: use SQLite or PostgreSQL")


def _chunks(values: Sequence[Any], size: int = IN_CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


# --- history for online features ------------------------------------------------------------

_EPOCH = datetime(1970, 1, 1)


def _second(second: int) -> datetime:
    return _EPOCH + timedelta(seconds=second)


def _within(column: sa.Column, interval: tuple[int, int]) -> sa.ColumnElement[bool]:
    """`column` falls in the closed interval of whole epoch seconds [first, last]."""
    first, last = interval
    return sa.and_(column >= _second(first), column < _second(last + 1))


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


def _history_part(
    conn: Connection,
    key: sa.Column,
    keys: Sequence[str],
    plan: HistoryPlan,
    value: sa.ColumnElement,
    exclude_source: tuple[str, int, int, int] | None,
) -> pd.DataFrame:
    """Rows of `plan.rows` and one aggregate row per key and band of `plan.bands`."""
    s, labels = scored_transactions, fraud_labels
    joined = s.outerjoin(labels, labels.c.transaction_id == s.c.transaction_id)
    date = s.c.transaction_date
    rows: list[Any] = []
    bands: list[Any] = []
    for chunk in _chunks(list(keys)):
        selected = sa.and_(key.in_(chunk), _not_from(exclude_source))
        if plan.rows:
            query = (
                sa.select(s.c.transaction_id, key, date, value, sa.literal(1.0))
                .select_from(joined)
                .where(selected, sa.or_(*(_within(date, interval) for interval in plan.rows)))
            )
            rows.extend(conn.execute(query).all())
        if plan.bands:
            band = sa.case(
                *((_within(date, interval), i) for i, interval in enumerate(plan.bands)),
                else_=-1,
            ).label("band")
            query = (
                sa.select(key, band, sa.func.count(), sa.func.sum(value))
                .select_from(joined)
                .where(selected, sa.or_(*(_within(date, interval) for interval in plan.bands)))
                .group_by(key, band)
            )
            bands.extend(conn.execute(query).all())
    names = ["transaction_id", "key", "transaction_date", "value", WEIGHT]
    aggregates = [
        # One row for the n transactions of a key in a band, at the band's last second;
        # the NUL in its id cannot clash with a real id (identifiers exclude control characters).
        (
            f"\x00band{band_index}:{key_value}",
            key_value,
            _second(plan.bands[band_index][1]),
            total,
            count,
        )
        for key_value, band_index, count, total in bands
    ]
    frame = _frame([*rows, *aggregates], names)
    frame["transaction_date"] = pd.to_datetime(frame["transaction_date"])
    frame["value"] = frame["value"].astype(float).fillna(0.0)
    frame[WEIGHT] = frame[WEIGHT].astype(float)
    return frame


def load_batch_history(
    conn: Connection,
    batch: pd.DataFrame,
    exclude_source: tuple[str, int, int, int] | None = None,
) -> BatchHistory:
    """What the windows of `batch` (account_id, merchant, transaction_date) need from storage.

    Near the windows' edges stored transactions come as rows, elsewhere as one aggregate row
    per key and band (see `features.history_plan`), so the history of a batch stays about as
    large as the batch however much is stored. `exclude_source` = (topic, partition, first,
    last) leaves out the batch's own messages, which a rerun finds stored already.
    """
    seconds = pd.to_datetime(batch["transaction_date"]).astype("datetime64[s]").astype("int64")
    first, last = int(seconds.min()), int(seconds.max())
    s, labels = scored_transactions, fraud_labels
    accounts = _history_part(
        conn,
        s.c.account_id,
        batch["account_id"].unique().tolist(),
        history_plan(first, last, ACCOUNT_EDGES_DAYS),
        s.c.transaction_amount,
        exclude_source,
    ).rename(columns={"key": "account_id", "value": "transaction_amount"})
    fraud = sa.case((labels.c.is_fraud == sa.true(), 1.0), else_=0.0)
    merchants = _history_part(
        conn,
        s.c.merchant,
        batch["merchant"].unique().tolist(),
        history_plan(first, last, MERCHANT_EDGES_DAYS),
        fraud,
        exclude_source,
    ).rename(columns={"key": "merchant", "value": "is_fraud"})
    return BatchHistory(
        accounts=accounts[[*ACCOUNT_HISTORY_COLUMNS, WEIGHT]],
        merchants=merchants[[*MERCHANT_HISTORY_COLUMNS, WEIGHT]],
    )


def load_labels(conn: Connection, transaction_ids: Sequence[str]) -> dict[str, bool]:
    labels: dict[str, bool] = {}
    for ids in _chunks(list(transaction_ids)):
        query = sa.select(fraud_labels.c.transaction_id, fraud_labels.c.is_fraud).where(
            fraud_labels.c.transaction_id.in_(ids)
        )
        labels.update({row.transaction_id: bool(row.is_fraud) for row in conn.execute(query)})
    return labels


def stored_sources(conn: Connection, transaction_ids: Sequence[str]) -> pd.DataFrame:
    """Where already-stored transaction ids came from: one row per stored id, with
    stored_topic, stored_partition and stored_offset."""
    s = scored_transactions
    rows: list[Any] = []
    for ids in _chunks(list(transaction_ids)):
        query = sa.select(
            s.c.transaction_id, s.c.source_topic, s.c.source_partition, s.c.source_offset
        ).where(s.c.transaction_id.in_(ids))
        rows.extend(conn.execute(query).all())
    return _frame(rows, ["transaction_id", "stored_topic", "stored_partition", "stored_offset"])


def _frame(rows: Sequence[Sequence[Any]], columns: list[str]) -> pd.DataFrame:
    """A DataFrame from result rows, built column-wise (much faster than from row objects)."""
    if not rows:
        return pd.DataFrame({name: pd.Series(dtype=object) for name in columns})
    columns_of_rows = zip(*rows, strict=True)
    return pd.DataFrame(
        {name: list(values) for name, values in zip(columns, columns_of_rows, strict=True)}
    )


# --- persisting a scored batch ---------------------------------------------------------------


@dataclass
class PersistResult:
    """What one batch write did."""

    inserted: int = 0
    already_stored: int = 0
    suspicious_inserted: int = 0
    rejected_inserted: int = 0
    duplicates_rejected: int = 0
    alerts_queued: list[str] = field(default_factory=list)
    suspicious_ids: list[str] = field(default_factory=list)


def _records(frame: pd.DataFrame, columns: Iterable[str]) -> list[dict[str, Any]]:
    """Rows as dicts of plain Python values (NaN/NaT -> None), converted column by column."""
    names = list(columns)
    values = []
    for name in names:
        column = frame[name]
        if pd.api.types.is_datetime64_any_dtype(column):
            converted = np.where(column.isna().to_numpy(), None, column.dt.to_pydatetime())
            values.append(converted.tolist())
        elif pd.api.types.is_numeric_dtype(column) and not column.isna().any():
            values.append(column.tolist())
        else:
            values.append(column.astype(object).where(column.notna(), None).tolist())
    return [dict(zip(names, row, strict=True)) for row in zip(*values, strict=True)]


def _rejection_rows(
    rejections: Iterable[Rejection], run_id: str | None, now: datetime
) -> list[dict]:
    return [
        {
            "source_topic": r.topic,
            "source_partition": r.partition,
            "source_offset": r.offset,
            "raw_value": r.raw_value,
            "reason": r.reason,
            "transaction_id": r.transaction_id,
            "rejected_at": now,
            "run_id": run_id,
        }
        for r in rejections
    ]


SCORED_COLUMNS = [c.name for c in scored_transactions.columns]


def persist_batch(
    engine: Engine,
    scored: pd.DataFrame,
    rejections: Sequence[Rejection],
    *,
    threshold: float,
    run_id: str | None,
    batch_range: tuple[str, int, int, int],
) -> PersistResult:
    """Store a scored batch, its suspicious rows, their alert outbox rows and its rejections.

    `batch_range` = (topic, partition, first, last) holds every row of `scored` and is recorded
    as stored in the same transaction (see `contiguous_end`).

    One transaction: either everything is written or nothing is. Rows whose Kafka coordinates
    are already stored (a rerun) are left as they are, with their first score and alert. A
    transaction id already stored from other coordinates is a duplicate: it goes to
    `rejected_transactions` with the place it was first seen.
    """
    now = utcnow()
    result = PersistResult()
    dialect = engine.dialect.name
    topic, partition, first, last = batch_range
    outside = (
        (scored["source_topic"] != topic)
        | (scored["source_partition"] != partition)
        | ~scored["source_offset"].between(first, last)
    )
    if outside.any():
        raise ValueError(f"{int(outside.sum())} scored rows lie outside the batch {batch_range}")
    scored = scored.copy()
    scored["scored_at"] = now
    scored["run_id"] = run_id
    s = scored_transactions
    try:
        with engine.begin() as conn:
            inserted_ids: set[str] = set()
            if len(scored):
                # A plain multi-row insert (no RETURNING: a third faster); the rows this write
                # inserted are then the batch's rows carrying this write's `scored_at`.
                conn.execute(
                    insert_ignoring_conflicts(s, dialect), _records(scored, SCORED_COLUMNS)
                )
                inserted_ids = set(
                    conn.execute(
                        sa.select(s.c.transaction_id).where(
                            s.c.source_topic == topic,
                            s.c.source_partition == partition,
                            s.c.source_offset.between(first, last),
                            s.c.scored_at == now,
                        )
                    ).scalars()
                )
            result.inserted = len(inserted_ids)
            not_inserted = scored.loc[~scored["transaction_id"].isin(inserted_ids)]
            extra_rejections = _classify_conflicts(conn, not_inserted, result)
            all_rejections = [*rejections, *extra_rejections]
            if all_rejections:
                statement = insert_ignoring_conflicts(rejected_transactions, dialect).returning(
                    rejected_transactions.c.id
                )
                result.rejected_inserted = len(
                    conn.execute(statement, _rejection_rows(all_rejections, run_id, now)).all()
                )
            fresh = scored.loc[scored["transaction_id"].isin(inserted_ids)]
            suspicious = fresh.loc[fresh["is_suspicious"]].copy()
            result.suspicious_ids = suspicious["transaction_id"].tolist()
            if len(suspicious):
                suspicious["threshold"] = threshold
                suspicious["detected_at"] = now
                columns = [c.name for c in suspicious_transactions.columns]
                conn.execute(
                    insert_ignoring_conflicts(suspicious_transactions, dialect),
                    _records(suspicious, columns),
                )
                result.suspicious_inserted = len(suspicious)
                conn.execute(
                    insert_ignoring_conflicts(fraud_alerts, dialect),
                    [
                        {
                            "transaction_id": tid,
                            "status": "pending",
                            "attempts": 0,
                            "created_at": now,
                            "next_attempt_at": now,
                        }
                        for tid in result.suspicious_ids
                    ],
                )
                result.alerts_queued = list(result.suspicious_ids)
            conn.execute(
                insert_ignoring_conflicts(stored_ranges, dialect),
                [
                    {
                        "source_topic": topic,
                        "source_partition": partition,
                        "first_offset": first,
                        "last_offset": last,
                        "run_id": run_id,
                        "stored_at": now,
                    }
                ],
            )
    except SQLAlchemyError as exc:
        raise StorageError(
            f"writing the batch to {engine.url.render_as_string(hide_password=True)} failed "
            f"and was rolled back; rerun the batch once the database is back: {exc}"
        ) from exc
    return result


def contiguous_end(engine: Engine, topic: str, partition: int, start: int) -> int:
    """The offset after the gap-free run of stored ranges that covers `start` (or `start`).

    This is how far the consumer group may be committed: never past a range no batch stored.
    """
    r = stored_ranges
    query = (
        sa.select(r.c.first_offset, r.c.last_offset)
        .where(r.c.source_topic == topic, r.c.source_partition == partition)
        .where(r.c.last_offset >= start)
        .order_by(r.c.first_offset)
    )
    position = start
    with engine.connect() as conn:
        for first, last in conn.execute(query):
            if first > position:
                break
            position = max(position, last + 1)
    return position


def count_rejected(engine: Engine, topic: str, partition: int, first: int, last: int) -> int:
    """How many messages of offsets first..last of `topic`/`partition` are stored as rejected."""
    r = rejected_transactions
    query = (
        sa.select(sa.func.count())
        .select_from(r)
        .where(r.c.source_topic == topic, r.c.source_partition == partition)
        .where(r.c.source_offset.between(first, last))
    )
    with engine.connect() as conn:
        return int(conn.execute(query).scalar_one())


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


def _classify_conflicts(
    conn: Connection, not_inserted: pd.DataFrame, result: PersistResult
) -> list[Rejection]:
    """Split rows the insert skipped into reruns, duplicates and coordinate clashes."""
    rerun, rejections = classify_stored(conn, not_inserted)
    rejected_ids = {r.transaction_id for r in rejections}
    clashes = not_inserted.loc[~rerun & ~not_inserted["transaction_id"].isin(rejected_ids)]
    for row in clashes.itertuples(index=False):
        reason = (
            f"offset {row.source_offset} of {row.source_topic}/{row.source_partition} is already "
            "stored under another transaction id (was the topic recreated?)"
        )
        rejections.append(
            Rejection(
                row.source_topic,
                int(row.source_partition),
                int(row.source_offset),
                row.raw_value,
                reason,
                row.transaction_id,
            )
        )
    result.already_stored = int(rerun.sum())
    result.duplicates_rejected = len(rejections)
    return rejections


# --- the alert outbox -------------------------------------------------------------------------

ALERT_VIEW_COLUMNS = (
    suspicious_transactions.c.transaction_id,
    suspicious_transactions.c.account_id,
    suspicious_transactions.c.merchant,
    suspicious_transactions.c.transaction_amount,
    suspicious_transactions.c.transaction_date,
    suspicious_transactions.c.fraud_probability,
    suspicious_transactions.c.threshold,
    suspicious_transactions.c.model_version,
    fraud_alerts.c.attempts,
)


STALE_CLAIM_AFTER = timedelta(minutes=10)


def _due_condition(
    now: datetime, stale_after: timedelta, pending_grace: timedelta | None
) -> sa.ColumnElement[bool]:
    """Alerts a sender may take now (see `claim_alerts`)."""
    a = fraud_alerts
    pending = a.c.status == "pending"
    if pending_grace is not None:
        pending = sa.and_(pending, a.c.created_at <= now - pending_grace)
    return sa.or_(
        pending,
        sa.and_(a.c.status == "failed", a.c.next_attempt_at <= now),
        sa.and_(a.c.status == "sending", a.c.claimed_at < now - stale_after),
    )


def claim_alerts(
    engine: Engine,
    token: str,
    *,
    source_range: tuple[str, int, int, int] | None = None,
    stale_after: timedelta = STALE_CLAIM_AFTER,
    pending_grace: timedelta | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Mark due alerts as being sent by `token` and return them with what the email shows.

    Due: pending, or failed with its next attempt time reached, or left `sending` by a sender
    that died more than `stale_after` ago. `source_range` = (topic, partition, first, last)
    restricts the claim to one batch's messages. `pending_grace` leaves pending alerts younger
    than that to the batch run that wrote them (the retry sender uses it). The claim is a
    single UPDATE, so two senders never hold the same alert.
    """
    now = utcnow()
    a, s = fraud_alerts, scored_transactions
    condition = _due_condition(now, stale_after, pending_grace)
    if source_range is not None:
        topic, partition, first, last = source_range
        in_batch = sa.select(s.c.transaction_id).where(
            s.c.source_topic == topic,
            s.c.source_partition == partition,
            s.c.source_offset.between(first, last),
        )
        condition = sa.and_(condition, a.c.transaction_id.in_(in_batch.scalar_subquery()))
    if limit is not None:
        candidates = (
            sa.select(a.c.transaction_id).where(condition).order_by(a.c.created_at).limit(limit)
        )
        # The due condition stays in the outer WHERE: PostgreSQL re-checks it on a row another
        # sender claimed meanwhile (a sub-select alone would not be re-evaluated).
        condition = sa.and_(condition, a.c.transaction_id.in_(candidates.scalar_subquery()))
    with engine.begin() as conn:
        conn.execute(
            sa.update(a)
            .where(condition)
            .values(status="sending", claimed_by=token, claimed_at=now, attempts=a.c.attempts + 1)
        )
        query = (
            sa.select(*ALERT_VIEW_COLUMNS)
            .select_from(a.join(suspicious_transactions))
            .where(a.c.claimed_by == token, a.c.status == "sending")
            .order_by(suspicious_transactions.c.transaction_date)
        )
        return [dict(row._mapping) for row in conn.execute(query)]


@dataclass(frozen=True)
class AcceptedAlert:
    """An alert the SMTP server accepted: what marking it sent records."""

    transaction_id: str
    message_id: str
    note: str | None = None


def mark_alerts_sent(engine: Engine, accepted: Sequence[AcceptedAlert], token: str) -> list[str]:
    """Record in one transaction that the server accepted `accepted`; return the ids whose
    claim `token` no longer held (another sender took them over; they were left as they are)."""
    if not accepted:
        return []
    a = fraud_alerts
    statement = (
        sa.update(a)
        .where(a.c.transaction_id == sa.bindparam("tid"), a.c.claimed_by == token)
        .values(
            status="sent",
            sent_at=utcnow(),
            message_id=sa.bindparam("mid"),
            last_error=sa.bindparam("note"),
        )
    )
    ids = [alert.transaction_id for alert in accepted]
    with engine.begin() as conn:
        result = conn.execute(
            statement,
            [{"tid": x.transaction_id, "mid": x.message_id, "note": x.note} for x in accepted],
        )
        if engine.dialect.supports_sane_multi_rowcount and result.rowcount == len(accepted):
            return []  # every claim held: no need to look for lost ones
        lost: list[str] = []
        for chunk in _chunks(ids):
            lost.extend(
                conn.execute(
                    sa.select(a.c.transaction_id).where(
                        a.c.transaction_id.in_(chunk),
                        sa.or_(a.c.claimed_by.is_(None), a.c.claimed_by != token),
                    )
                ).scalars()
            )
    return lost


def mark_alerts_failed(
    engine: Engine, transaction_ids: Sequence[str], token: str, error: str, retry_in: timedelta
) -> None:
    now = utcnow()
    with engine.begin() as conn:
        for ids in _chunks(list(transaction_ids)):
            conn.execute(
                sa.update(fraud_alerts)
                .where(fraud_alerts.c.transaction_id.in_(ids), fraud_alerts.c.claimed_by == token)
                .values(status="failed", last_error=error[:2000], next_attempt_at=now + retry_in)
            )


@dataclass
class OutboxStatus:
    """The outbox at a glance: what the retry sensor and the run metadata report."""

    counts: dict[str, int]
    due: int
    next_attempt_at: datetime | None
    oldest_unsent_at: datetime | None
    last_error: str | None

    @property
    def unsent(self) -> int:
        return sum(n for status, n in self.counts.items() if status != "sent")


def outbox_status(
    engine: Engine,
    *,
    stale_after: timedelta = STALE_CLAIM_AFTER,
    pending_grace: timedelta | None = None,
) -> OutboxStatus:
    """Counts per status, how many are due now, and when the next failed one is due."""
    now = utcnow()
    a = fraud_alerts
    unsent = a.c.status != "sent"
    with engine.connect() as conn:
        counts = dict(
            conn.execute(sa.select(a.c.status, sa.func.count()).group_by(a.c.status)).all()
        )
        due = conn.execute(
            sa.select(sa.func.count()).where(_due_condition(now, stale_after, pending_grace))
        ).scalar_one()
        next_attempt_at, oldest = conn.execute(
            sa.select(
                sa.func.min(sa.case((a.c.status == "failed", a.c.next_attempt_at))),
                sa.func.min(a.c.created_at),
            ).where(unsent)
        ).one()
        last_error = conn.execute(
            sa.select(a.c.last_error)
            .where(unsent, a.c.last_error.is_not(None))
            .order_by(a.c.claimed_at.desc())
            .limit(1)
        ).scalar_one_or_none()
    return OutboxStatus(
        counts={str(k): int(v) for k, v in counts.items()},
        due=int(due),
        next_attempt_at=next_attempt_at,
        oldest_unsent_at=oldest,
        last_error=last_error,
    )


def alert_status_counts(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(fraud_alerts.c.status, sa.func.count()).group_by(fraud_alerts.c.status)
        ).all()
    return {status: count for status, count in rows}


# --- labels and model promotions --------------------------------------------------------------


def record_labels(engine: Engine, labels: Sequence[dict[str, Any]]) -> int:
    """Insert or replace confirmed labels (transaction_id, is_fraud, labeled_by, source)."""
    now = utcnow()
    rows = [{**label, "labeled_at": label.get("labeled_at", now)} for label in labels]
    with engine.begin() as conn:
        for chunk in _chunks(rows):
            ids = [row["transaction_id"] for row in chunk]
            conn.execute(sa.delete(fraud_labels).where(fraud_labels.c.transaction_id.in_(ids)))
            conn.execute(sa.insert(fraud_labels), list(chunk))
    return len(rows)


def latest_transaction_date(engine: Engine) -> datetime | None:
    """When the most recent stored transaction happened: the stream's "now" in a replay."""
    with engine.connect() as conn:
        return conn.execute(sa.select(sa.func.max(scored_transactions.c.transaction_date))).scalar()


def active_model_version(engine: Engine) -> str | None:
    """The most recently promoted model version, or None if none was promoted yet."""
    query = (
        sa.select(model_promotions.c.model_version)
        .order_by(model_promotions.c.promoted_at.desc(), model_promotions.c.id.desc())
        .limit(1)
    )
    with engine.connect() as conn:
        return conn.execute(query).scalar_one_or_none()


def record_promotion(
    engine: Engine, version: str, sha256: str, reason: str, run_id: str | None = None
) -> None:
    with engine.begin() as conn:
        conn.execute(
            sa.insert(model_promotions).values(
                model_version=version,
                sha256=sha256,
                promoted_at=utcnow(),
                reason=reason,
                run_id=run_id,
            )
        )
