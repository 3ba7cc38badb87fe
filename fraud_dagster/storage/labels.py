"""Confirmed fraud outcomes: what analysts and replays record, and what features read."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from fraud_dagster.storage.database import in_chunks, utcnow
from fraud_dagster.storage.schema import fraud_labels, scored_transactions


def load_labels(conn: Connection, transaction_ids: Sequence[str]) -> dict[str, bool]:
    """The confirmed outcome of each of `transaction_ids` that has one."""
    labels: dict[str, bool] = {}
    for ids in in_chunks(list(transaction_ids)):
        query = sa.select(fraud_labels.c.transaction_id, fraud_labels.c.is_fraud).where(
            fraud_labels.c.transaction_id.in_(ids)
        )
        labels.update({row.transaction_id: bool(row.is_fraud) for row in conn.execute(query)})
    return labels


def record_labels(engine: Engine, labels: Sequence[dict[str, Any]]) -> int:
    """Insert or replace confirmed labels (transaction_id, is_fraud, labeled_by, source)."""
    now = utcnow()
    rows = [{**label, "labeled_at": label.get("labeled_at", now)} for label in labels]
    with engine.begin() as conn:
        for chunk in in_chunks(rows):
            ids = [row["transaction_id"] for row in chunk]
            conn.execute(sa.delete(fraud_labels).where(fraud_labels.c.transaction_id.in_(ids)))
            conn.execute(sa.insert(fraud_labels), list(chunk))
    return len(rows)


def latest_transaction_date(engine: Engine) -> datetime | None:
    """When the most recent stored transaction happened: the stream's "now" in a replay."""
    with engine.connect() as conn:
        return conn.execute(sa.select(sa.func.max(scored_transactions.c.transaction_date))).scalar()
