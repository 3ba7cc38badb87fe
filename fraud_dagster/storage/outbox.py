"""The alert outbox: alerts are written with their batch and sent afterwards, at least once.

A sender claims due alerts with one UPDATE (two senders never hold the same alert), marks the
ones the SMTP server accepted as sent, and the failed ones for a later retry with backoff.
A claim names its sender (a token); a sender known to have ended (`abandoned`) gives its claims
up at once, any other's claim is taken over only once it is STALE_CLAIM_AFTER old.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from fraud_dagster.storage.database import in_chunks, utcnow
from fraud_dagster.storage.schema import (
    fraud_alerts,
    scored_transactions,
    suspicious_features,
    suspicious_transactions,
)

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
    # None for alerts written before suspicious_features existed.
    suspicious_features.c.features,
    suspicious_features.c.history_complete,
)


STALE_CLAIM_AFTER = timedelta(minutes=10)
# A sender sends on its claim for at most this long, then releases what it has not tried
# (`release_alerts`): the other half of STALE_CLAIM_AFTER covers a send under way (its SMTP
# timeouts), marking the accepted ones sent, and clock differences between senders.
SEND_WITHIN_CLAIM = STALE_CLAIM_AFTER / 2


def _due_condition(
    now: datetime,
    stale_after: timedelta,
    pending_grace: timedelta | None,
    abandoned: Collection[str] = (),
) -> sa.ColumnElement[bool]:
    """Alerts a sender may take now (see `claim_alerts`)."""
    a = fraud_alerts
    pending = a.c.status == "pending"
    if pending_grace is not None:
        pending = sa.and_(pending, a.c.created_at <= now - pending_grace)
    held_by_the_dead = a.c.claimed_at < now - stale_after
    if abandoned:
        held_by_the_dead = sa.or_(held_by_the_dead, a.c.claimed_by.in_(sorted(abandoned)))
    return sa.or_(
        pending,
        sa.and_(a.c.status == "failed", a.c.next_attempt_at <= now),
        sa.and_(a.c.status == "sending", held_by_the_dead),
    )


def claim_holders(engine: Engine) -> set[str]:
    """The tokens of the senders holding claims now (alerts `sending`): the ones to check for
    senders that ended without finishing (see `claim_alerts`'s `abandoned`)."""
    a = fraud_alerts
    with engine.connect() as conn:
        return set(
            conn.execute(
                sa.select(a.c.claimed_by).where(a.c.status == "sending").distinct()
            ).scalars()
        )


def claim_alerts(
    engine: Engine,
    token: str,
    *,
    source_range: tuple[str, int, int, int] | None = None,
    stale_after: timedelta = STALE_CLAIM_AFTER,
    pending_grace: timedelta | None = None,
    limit: int | None = None,
    abandoned: Collection[str] = (),
) -> list[dict[str, Any]]:
    """Mark due alerts as being sent by `token` and return them with what the email shows.

    Due: pending, or failed with its next attempt time reached, or left `sending` by a sender
    that claimed it more than `stale_after` ago, or by a sender whose token is in `abandoned`
    (known to have ended: it sends nothing more). `source_range` = (topic, partition, first, last)
    restricts the claim to one batch's messages. `pending_grace` leaves pending alerts younger
    than that to the batch run that wrote them (the retry sender uses it). The claim is a
    single UPDATE, so two senders never hold the same alert.
    """
    now = utcnow()
    a, s = fraud_alerts, scored_transactions
    condition = _due_condition(now, stale_after, pending_grace, abandoned)
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
            .select_from(a.join(suspicious_transactions).outerjoin(suspicious_features))
            .where(a.c.claimed_by == token, a.c.status == "sending")
            .order_by(suspicious_transactions.c.transaction_date)
        )
        alerts = [dict(row._mapping) for row in conn.execute(query)]
    for alert in alerts:
        alert["features"] = json.loads(alert["features"]) if alert["features"] else None
    return alerts


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
        for chunk in in_chunks(ids):
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
        for ids in in_chunks(list(transaction_ids)):
            conn.execute(
                sa.update(fraud_alerts)
                .where(fraud_alerts.c.transaction_id.in_(ids), fraud_alerts.c.claimed_by == token)
                .values(
                    status="failed",
                    last_error=error[:2000],
                    last_failed_at=now,
                    next_attempt_at=now + retry_in,
                )
            )


def release_alerts(engine: Engine, transaction_ids: Sequence[str], token: str) -> int:
    """Give back alerts `token` claimed and never tried to send: `pending` again (due at once),
    the claim's attempt not counted, `last_error`, `last_failed_at` and `next_attempt_at` of the
    last real attempt kept. Alerts no longer held by `token` are left alone. Returns how many
    were released."""
    a = fraud_alerts
    released = 0
    with engine.begin() as conn:
        for ids in in_chunks(list(transaction_ids)):
            released += conn.execute(
                sa.update(a)
                .where(a.c.transaction_id.in_(ids), a.c.claimed_by == token)
                .where(a.c.status == "sending")
                .values(status="pending", claimed_by=None, attempts=a.c.attempts - 1)
            ).rowcount
    return released


@dataclass
class OutboxStatus:
    """The outbox at a glance: what the retry sensor and the run metadata report."""

    counts: dict[str, int]
    due: int
    next_attempt_at: datetime | None
    oldest_unsent_at: datetime | None
    last_error: str | None
    last_failed_at: datetime | None

    @property
    def unsent(self) -> int:
        return sum(n for status, n in self.counts.items() if status != "sent")


def outbox_status(
    engine: Engine,
    *,
    stale_after: timedelta = STALE_CLAIM_AFTER,
    pending_grace: timedelta | None = None,
    abandoned: Collection[str] = (),
) -> OutboxStatus:
    """Counts per status, how many are due now (`claim_alerts` says which), and when the next
    failed one is due."""
    now = utcnow()
    a = fraud_alerts
    unsent = a.c.status != "sent"
    with engine.connect() as conn:
        counts = dict(
            conn.execute(sa.select(a.c.status, sa.func.count()).group_by(a.c.status)).all()
        )
        due = conn.execute(
            sa.select(sa.func.count()).where(
                _due_condition(now, stale_after, pending_grace, abandoned)
            )
        ).scalar_one()
        next_attempt_at, oldest = conn.execute(
            sa.select(
                sa.func.min(sa.case((a.c.status == "failed", a.c.next_attempt_at))),
                sa.func.min(a.c.created_at),
            ).where(unsent)
        ).one()
        last_failure = conn.execute(
            sa.select(a.c.last_error, a.c.last_failed_at)
            .where(unsent, a.c.last_error.is_not(None))
            .order_by(a.c.last_failed_at.desc().nulls_last(), a.c.claimed_at.desc())
            .limit(1)
        ).one_or_none()
    return OutboxStatus(
        counts={str(k): int(v) for k, v in counts.items()},
        due=int(due),
        next_attempt_at=next_attempt_at,
        oldest_unsent_at=oldest,
        last_error=last_failure[0] if last_failure else None,
        last_failed_at=last_failure[1] if last_failure else None,
    )


def alert_status_counts(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(fraud_alerts.c.status, sa.func.count()).group_by(fraud_alerts.c.status)
        ).all()
    return {status: count for status, count in rows}
