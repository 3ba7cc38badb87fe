"""Batches run through the pipeline's pure functions into a real SQLite database, with a model
that finds every transaction suspicious: which rows are stored, rejected and alerted is then the
storage's doing."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import sqlalchemy as sa

from fraud_dagster import pipeline
from fraud_dagster.features import FEATURE_COLUMNS
from fraud_dagster.messages import RawBatch, ValidationLimits
from fraud_dagster.model import LoadedModel, ModelEntry
from fraud_dagster.storage.schema import (
    fraud_alerts,
    rejected_transactions,
    scored_transactions,
)


class EverythingSuspicious:
    """Scores every row 0.9."""

    def predict_proba(self, features: pd.DataFrame) -> np.ndarray:
        return np.tile([0.1, 0.9], (len(features), 1))


MODEL = LoadedModel(
    ModelEntry("v1", "unused.joblib", "0" * 64, 0.5, tuple(FEATURE_COLUMNS)),
    EverythingSuspicious(),
    0.5,
)


def batch(amounts: list[float], id_prefix: str = "T") -> RawBatch:
    """Offsets 0.. of topic "t", partition 0: transaction `<id_prefix><offset>` per amount."""
    values = [
        json.dumps(
            {
                "transaction_id": f"{id_prefix}{i}",
                "account_id": "A1",
                "merchant": "M1",
                "transaction_amount": amount,
                "transaction_date": f"2026-11-01T10:00:0{i}Z",
            }
        ).encode()
        for i, amount in enumerate(amounts)
    ]
    n = len(values)
    return RawBatch("t", 0, 0, n - 1, list(range(n)), [1_700_000_000_000] * n, values)


ONE_DAY = "2026-11-01"  # the date of every one_day_batch transaction


def one_day_batch(
    partition: int, first: int, count: int, *, accounts: int = 5, ids_of: int | None = None
) -> RawBatch:
    """Offsets first.. of topic "t", spread over `accounts` accounts, all on `ONE_DAY`;
    transaction ids "p<partition>-<offset>", or those of partition
    `ids_of` (duplicates)."""
    id_prefix = f"p{partition if ids_of is None else ids_of}-"
    values = [
        json.dumps(
            {
                "transaction_id": f"{id_prefix}{offset}",
                "account_id": f"A{offset % accounts}",
                "merchant": "M1",
                "transaction_amount": 1.0 + offset % 7,
                "transaction_date": f"{ONE_DAY}T10:{offset // 60 % 60:02d}:{offset % 60:02d}Z",
            }
        ).encode()
        for offset in range(first, first + count)
    ]
    offsets = list(range(first, first + count))
    return RawBatch(
        "t", partition, first, offsets[-1], offsets, [1_700_000_000_000] * count, values
    )


def run(raw: RawBatch, engine: sa.Engine, limits: ValidationLimits) -> pipeline.PersistResult:
    prepared = pipeline.prepare_batch(raw, engine, limits)
    return pipeline.store_batch(pipeline.score_batch(prepared, MODEL), engine, "run")


def outcomes(engine: sa.Engine) -> tuple[list, list, list]:
    """Transaction ids (sorted) scored, rejected ("" where a rejection has none), and with an
    alert in the outbox."""
    with engine.connect() as conn:
        scored = conn.execute(sa.select(scored_transactions.c.transaction_id)).scalars().all()
        rejected = conn.execute(sa.select(rejected_transactions.c.transaction_id)).scalars().all()
        alerts = conn.execute(sa.select(fraud_alerts.c.transaction_id)).scalars().all()
    return sorted(scored), sorted(r or "" for r in rejected), sorted(alerts)
