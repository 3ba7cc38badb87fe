"""The write of a scored batch: its rows, suspicious rows, alert outbox rows and rejections.

Writes of a batch happen in one database transaction: a failure leaves nothing half-written,
and a rerun of the same batch finds its rows stored and writes nothing twice. The stored offset
ranges say how far the consumer group may be committed (`contiguous_end`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from fraud_dagster.errors import StorageError
from fraud_dagster.messages import Rejection
from fraud_dagster.storage.database import (
    insert_ignoring_conflicts,
    insert_widening_on_conflict,
    url_for_display,
    utcnow,
)
from fraud_dagster.storage.history import classify_stored
from fraud_dagster.storage.rollups import add_to_account_rollups, may_start_rollups
from fraud_dagster.storage.schema import (
    fraud_alerts,
    lost_ranges,
    rejected_transactions,
    schema_upgrades,
    scored_transactions,
    stored_ranges,
    suspicious_features,
    suspicious_transactions,
)

logger = logging.getLogger(__name__)


@dataclass
class PersistResult:
    """What one batch write did."""

    inserted: int = 0
    already_stored: int = 0
    suspicious_inserted: int = 0
    rejected_inserted: int = 0
    duplicates_rejected: int = 0
    lost_offsets: int = 0
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


def _feature_rows(
    features: pd.DataFrame, transaction_ids: Sequence[str], history_complete: bool | None
) -> list[dict[str, Any]]:
    """One `suspicious_features` row per id: its features as a JSON object (NaN -> null)."""
    values = features.reindex(transaction_ids).astype(float).round(6)
    return [
        {
            "transaction_id": transaction_id,
            "features": json.dumps(
                {name: None if math.isnan(value) else value for name, value in row.items()}
            ),
            "history_complete": history_complete,
        }
        for transaction_id, row in zip(
            transaction_ids, values.to_dict(orient="records"), strict=True
        )
    ]


SCORED_COLUMNS = [c.name for c in scored_transactions.columns]

LOST_TO_RETENTION = "deleted by Kafka retention before a batch read them"


def persist_batch(
    engine: Engine,
    scored: pd.DataFrame,
    rejections: Sequence[Rejection],
    *,
    threshold: float,
    run_id: str | None,
    batch_range: tuple[str, int, int, int],
    deleted_by_retention: tuple[int, int] | None = None,
    features: pd.DataFrame | None = None,
    history_complete: bool | None = None,
) -> PersistResult:
    """Store a scored batch (adding its rows to the account rollups), its suspicious rows, their
    alert outbox rows and its rejections.

    `batch_range` = (topic, partition, first, last) holds every row of `scored` and is recorded
    as stored in the same transaction (see `contiguous_end`), together with the offsets of the
    range retention deleted before they were read (`deleted_by_retention`, in `lost_ranges`).
    `features` (of the suspicious rows at least, indexed by transaction id) are stored for the
    suspicious rows this write inserts, with `history_complete`, for the alert email.

    One transaction: either everything is written or nothing is. Messages whose Kafka
    coordinates are already stored (a rerun) keep their first outcome: a scored row its score
    and alert, a rejected one its rejection, even if this run judged it otherwise (the date
    window moves with the clock, limits may have been changed). A transaction id already stored
    from other coordinates is a duplicate: it goes to `rejected_transactions` with the place it
    was first seen.
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
    if deleted_by_retention is not None and not (
        first <= deleted_by_retention[0] <= deleted_by_retention[1] <= last
    ):
        raise ValueError(f"lost offsets {deleted_by_retention} lie outside the batch {batch_range}")
    scored = scored.copy()
    scored["scored_at"] = now
    scored["run_id"] = run_id
    s = scored_transactions
    try:
        with engine.begin() as conn:
            # Same coordinates and same message (raw bytes, or transaction id where the scored
            # table keeps no bytes): a rerun. Other content is another message there (a
            # recreated topic) and goes on to the clash handling below.
            rejected_before = _stored_at(conn, rejected_transactions.c.raw_value, batch_range)
            if rejected_before:
                was_rejected = pd.Series(
                    [
                        rejected_before.get(offset, _NOTHING) == value
                        for offset, value in zip(
                            scored["source_offset"], scored["raw_value"], strict=True
                        )
                    ],
                    index=scored.index,
                    dtype=bool,
                )
                result.already_stored += int(was_rejected.sum())
                scored = scored.loc[~was_rejected]
            if rejections:
                scored_before = _stored_at(conn, s.c.transaction_id, batch_range)
                kept = [
                    r
                    for r in rejections
                    if r.transaction_id is None
                    or scored_before.get(r.offset, _NOTHING) != r.transaction_id
                ]
                result.already_stored += len(rejections) - len(kept)
                rejections = kept
                for r in rejections:
                    stored_raw = rejected_before.get(r.offset, _NOTHING)
                    if stored_raw is not _NOTHING and stored_raw != r.raw_value:
                        # Only after a topic was recreated; the table has no room for both.
                        logger.warning(
                            "rejected message at %s/%d offset %d not stored: another message is "
                            "stored as rejected at these coordinates (was the topic recreated?); "
                            "reason: %s",
                            topic,
                            partition,
                            r.offset,
                            r.reason,
                        )
            inserted_ids: set[str] = set()
            may_start = may_start_rollups(conn, scored)  # before the insert: it may lock
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
            fresh = scored.loc[scored["transaction_id"].isin(inserted_ids)]
            add_to_account_rollups(conn, fresh, may_start=may_start)
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
                if features is not None:
                    conn.execute(
                        insert_ignoring_conflicts(suspicious_features, dialect),
                        _feature_rows(features, result.suspicious_ids, history_complete),
                    )
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
            if deleted_by_retention is not None:
                # Only what no stored range accounts for: a rerun of a batch stored before
                # retention reached it reads a gap, but its messages were scored then.
                lost = not_stored(conn, topic, partition, *deleted_by_retention)
                _insert_lost(conn, topic, partition, lost, run_id, now)
                result.lost_offsets = sum(b - a + 1 for a, b in lost)
            # A range that starts where a stored one does (the sensor planned the start again
            # after a cursor reset or a lost tick) and reaches further widens that one. Ignored,
            # its further offsets would count as never stored and the commit would stop short.
            conn.execute(
                insert_widening_on_conflict(stored_ranges, dialect, "last_offset"),
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
            f"writing the batch to {url_for_display(engine.url)} failed "
            f"and was rolled back; rerun the batch once the database is back: {exc}"
        ) from exc
    return result


_NOTHING = object()


def _stored_at(
    conn: Connection, column: sa.Column, batch_range: tuple[str, int, int, int]
) -> dict[int, Any]:
    """`column` of the rows of `column`'s table stored at `batch_range`'s offsets, by offset
    (empty on a batch's first run)."""
    table = column.table
    topic, partition, first, last = batch_range
    query = sa.select(table.c.source_offset, column).where(
        table.c.source_topic == topic,
        table.c.source_partition == partition,
        table.c.source_offset.between(first, last),
    )
    return {offset: value for offset, value in conn.execute(query)}


def not_stored(
    conn: Connection, topic: str, partition: int, first: int, last: int
) -> list[tuple[int, int]]:
    """The parts of offsets first..last that no stored range covers, lowest first."""
    return _not_covered(conn, stored_ranges, topic, partition, first, last)


def _not_covered(
    conn: Connection, ranges: sa.Table, topic: str, partition: int, first: int, last: int
) -> list[tuple[int, int]]:
    """The parts of offsets first..last that no range of `ranges` covers, lowest first."""
    r = ranges
    covered = conn.execute(
        sa.select(r.c.first_offset, r.c.last_offset)
        .where(r.c.source_topic == topic, r.c.source_partition == partition)
        .where(r.c.first_offset <= last, r.c.last_offset >= first)
        .order_by(r.c.first_offset)
    ).all()
    parts, position = [], first
    for covered_first, covered_last in covered:
        if covered_first > position:
            parts.append((position, covered_first - 1))
        position = max(position, covered_last + 1)
    if position <= last:
        parts.append((position, last))
    return parts


def record_deleted_unread(
    engine: Engine, topic: str, partition: int, first: int, last: int, run_id: str | None
) -> list[tuple[int, int]]:
    """Record in `lost_ranges` the offsets of first..last (deleted by retention: the consumer
    group is about to be committed past them) that no batch stored and none recorded as lost
    yet; return them. Offsets below the partition's first stored range are left out: the
    pipeline never planned those (a group committed lower by hand)."""
    with engine.begin() as conn:
        r = stored_ranges
        earliest = conn.execute(
            sa.select(sa.func.min(r.c.first_offset)).where(
                r.c.source_topic == topic, r.c.source_partition == partition
            )
        ).scalar_one_or_none()
        if earliest is None or earliest > last:
            return []
        lost = [
            part
            for unstored in not_stored(conn, topic, partition, max(first, earliest), last)
            for part in _not_covered(conn, lost_ranges, topic, partition, *unstored)
        ]
        _insert_lost(conn, topic, partition, lost, run_id, utcnow())
    return lost


def _insert_lost(
    conn: Connection,
    topic: str,
    partition: int,
    spans: Sequence[tuple[int, int]],
    run_id: str | None,
    now: datetime,
) -> None:
    """Record `spans` (first, last) of the partition in `lost_ranges`, each once."""
    if not spans:
        return
    conn.execute(
        insert_ignoring_conflicts(lost_ranges, conn.dialect.name),
        [
            {
                "source_topic": topic,
                "source_partition": partition,
                "first_offset": first,
                "last_offset": last,
                "reason": LOST_TO_RETENTION,
                "run_id": run_id,
                "recorded_at": now,
            }
            for first, last in spans
        ],
    )


def lost_in(
    engine: Engine, topic: str, partition: int, first: int, last: int
) -> list[tuple[int, int]]:
    """The ranges recorded in `lost_ranges` that start within offsets first..last."""
    lr = lost_ranges
    query = (
        sa.select(lr.c.first_offset, lr.c.last_offset)
        .where(lr.c.source_topic == topic, lr.c.source_partition == partition)
        .where(lr.c.first_offset.between(first, last))
        .order_by(lr.c.first_offset)
    )
    with engine.connect() as conn:
        return [(int(a), int(b)) for a, b in conn.execute(query)]


def contiguous_end(engine: Engine, topic: str, partition: int, start: int) -> int:
    """The offset after the gap-free run of stored ranges that covers `start` (or `start`).

    This is how far the consumer group may be committed: never past a range no batch stored.
    """
    with engine.connect() as conn:
        return stored_without_gap(conn, topic, partition, start)


def stored_without_gap(conn: Connection, topic: str, partition: int, start: int) -> int:
    """`contiguous_end` on an open connection."""
    r = stored_ranges
    query = (
        sa.select(r.c.first_offset, r.c.last_offset)
        .where(r.c.source_topic == topic, r.c.source_partition == partition)
        .where(r.c.last_offset >= start)
        .order_by(r.c.first_offset)
    )
    position = start
    for first, last in conn.execute(query):
        if first > position:
            break
        position = max(position, last + 1)
    return position


def stored_end(conn: Connection, topic: str, partition: int) -> int | None:
    """One past the highest offset a stored range of `topic`/`partition` reaches (None: none)."""
    r = stored_ranges
    highest = conn.execute(
        sa.select(sa.func.max(r.c.last_offset)).where(
            r.c.source_topic == topic, r.c.source_partition == partition
        )
    ).scalar_one()
    return None if highest is None else int(highest) + 1


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
    result.already_stored += int(rerun.sum())
    result.duplicates_rejected = len(rejections)
    return rejections


def _set_aside_mark(aside: str) -> str:
    """The `schema_upgrades` name that says `aside` was set aside: written with the move, so a
    second call finds it even when the previous topic had stored nothing to move."""
    mark = f"set aside as {aside}"
    if len(mark) <= schema_upgrades.c.name.type.length:
        return mark
    return f"set aside as sha256:{hashlib.sha256(aside.encode()).hexdigest()}"


@dataclass
class SetAside:
    """What `set_aside_previous_topic` moved: stored ranges, scored and rejected rows."""

    ranges: int = 0
    scored: int = 0
    rejected: int = 0


def set_aside_previous_topic(
    engine: Engine, topic: str, key_tag: str, *, with_rows: bool
) -> SetAside:
    """Move what is stored of a previous incarnation of `topic` to `<topic>@before-<key_tag>`.

    Its stored ranges (and lost ranges, same key) must not count for the new topic: the
    consumer group is committed as far as they reach (`contiguous_end`), and they would keep the
    new topic's ranges from being recorded. With `with_rows` (the broker gave the topic a new
    id), its scored and rejected rows go along: the new topic's messages at the same
    coordinates are other messages, to be scored (and alerted) or rejected as themselves, not
    as clashes with the old rows; and range queries (a batch's history, its alerts, its checks)
    must not find the old rows. Without it (a recreation seen from the offsets alone: perhaps
    the same topic after a broker lost data, whose first offsets hold the messages stored
    before) the rows stay, so those messages are found stored and not scored twice.

    Kept, not deleted: they say which runs stored what. No real topic has an `@` in its name.
    One transaction, done once per tag: asked again for a tag already set aside (a tick that
    failed after it, the same incarnation seen again), it moves nothing, as what is stored
    under `topic` is then the new topic's own.
    """
    suffix = f"@before-{key_tag}"
    aside = topic[: stored_ranges.c.source_topic.type.length - len(suffix)] + suffix
    mark = _set_aside_mark(aside)
    moved = SetAside()
    with engine.begin() as conn:
        marked = sa.select(sa.literal(1)).where(schema_upgrades.c.name == mark)
        # Before the mark was written, a stored range under the new name was the only sign.
        ranges_moved = sa.select(sa.literal(1)).where(stored_ranges.c.source_topic == aside)
        if conn.execute(marked).first() or conn.execute(ranges_moved.limit(1)).first():
            return moved
        conn.execute(sa.insert(schema_upgrades).values(name=mark, done_at=utcnow()))
        tables = [stored_ranges, lost_ranges]
        if with_rows:
            tables += [scored_transactions, rejected_transactions]
        counts = [
            conn.execute(
                sa.update(table).where(table.c.source_topic == topic).values(source_topic=aside)
            ).rowcount
            for table in tables
        ]
    moved.ranges = counts[0]
    if with_rows:
        moved.scored, moved.rejected = counts[2], counts[3]
    return moved
