"""The batch pipeline as plain functions: what each Dagster op does, callable without Dagster.

fetch (Kafka) -> `prepare_batch` (validate, features) -> `score_batch` (one predict_proba call)
-> `store_batch` (one database transaction), then `alert_delivery.deliver_alerts` (a few SMTP
sessions at once). Benchmarks and tests call these directly; `ops.py` wraps them for Dagster.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from fraud_dagster.errors import StorageError
from fraud_dagster.features import (
    FEATURE_COLUMNS,
    HistoryRead,
    compute_batch_features,
    labels_reach_batch,
)
from fraud_dagster.messages import RawBatch, Rejection, ValidationLimits, parse_batch
from fraud_dagster.model import LoadedModel
from fraud_dagster.storage.batches import PersistResult, persist_batch, stored_without_gap
from fraud_dagster.storage.database import url_for_display
from fraud_dagster.storage.history import classify_stored, load_batch_history
from fraud_dagster.storage.labels import load_labels

SCORE_HISTOGRAM_BINS = 10


@dataclass(frozen=True)
class BatchRef:
    """Which messages a batch run covers: one partition, offsets first..last inclusive."""

    topic: str
    partition: int
    first_offset: int
    last_offset: int

    @property
    def label(self) -> str:
        return f"{self.topic}/{self.partition}/{self.first_offset}-{self.last_offset}"


def _history_complete(ref: BatchRef, stored_until: int | None) -> bool | None:
    return None if stored_until is None else stored_until >= ref.first_offset


@dataclass
class PreparedBatch:
    """Valid transactions with their features, and everything rejected on the way."""

    ref: BatchRef
    transactions: pd.DataFrame
    features: pd.DataFrame
    rejections: list[Rejection]
    read_count: int
    oldest_kafka_timestamp_ms: int | None = None
    deleted_by_retention: tuple[int, int] | None = None  # never read: see RawBatch
    # How far the partition was stored without a gap when the features read the history
    # (None: not known, the range was read without the consumer group).
    history_stored_until: int | None = None
    # How much stored history the features read, per kind of window (None: nothing was read).
    accounts_read: HistoryRead | None = None
    merchants_read: HistoryRead | None = None

    @property
    def history_complete(self) -> bool | None:
        """Every earlier offset of the partition was stored when the history was read."""
        return _history_complete(self.ref, self.history_stored_until)


@dataclass
class ScoredBatch:
    """Prepared transactions with fraud probability and the suspicious flag."""

    ref: BatchRef
    transactions: pd.DataFrame
    rejections: list[Rejection]
    read_count: int
    model_version: str
    threshold: float
    oldest_kafka_timestamp_ms: int | None = None
    deleted_by_retention: tuple[int, int] | None = None  # never read: see RawBatch
    history_stored_until: int | None = None  # see PreparedBatch
    # The features of the suspicious transactions only, indexed by transaction id: stored with
    # them for the analyst's email (the whole batch's would be pickled between steps for nothing).
    suspicious_features: pd.DataFrame | None = None

    @property
    def history_complete(self) -> bool | None:
        return _history_complete(self.ref, self.history_stored_until)

    @property
    def suspicious_count(self) -> int:
        return int(self.transactions["is_suspicious"].sum()) if len(self.transactions) else 0

    def score_histogram(self) -> dict[str, int]:
        counts, edges = np.histogram(
            self.transactions["fraud_probability"], bins=SCORE_HISTOGRAM_BINS, range=(0.0, 1.0)
        )
        return {f"{edges[i]:.1f}-{edges[i + 1]:.1f}": int(count) for i, count in enumerate(counts)}


def prepare_batch(
    raw: RawBatch, engine: Engine, limits: ValidationLimits | None = None
) -> PreparedBatch:
    """Validate the batch, drop ids already stored elsewhere, compute features from history."""
    ref = BatchRef(raw.topic, raw.partition, raw.first_offset, raw.last_offset)
    parsed = parse_batch(raw, limits)
    transactions = parsed.transactions
    rejections = list(parsed.rejections)
    history = None
    try:
        conn = engine.connect()
    except SQLAlchemyError as exc:
        raise StorageError(
            f"cannot read history from {url_for_display(engine.url)}: the "
            f"database is unavailable; the batch is not scored (rerun it once it is back): {exc}"
        ) from exc
    with conn:
        # Before the history is read: a batch stored meanwhile may then be in it, never the
        # reverse, so "complete" is never claimed for features that missed rows.
        stored_until = (
            stored_without_gap(conn, ref.topic, ref.partition, raw.history_start)
            if raw.history_start is not None
            else None
        )
        _, duplicates = classify_stored(conn, transactions)
        if duplicates:
            duplicate_offsets = {r.offset for r in duplicates}
            transactions = transactions.loc[~transactions["source_offset"].isin(duplicate_offsets)]
            rejections.extend(duplicates)
        if len(transactions):
            history = load_batch_history(
                conn,
                transactions,
                exclude_source=(ref.topic, ref.partition, ref.first_offset, ref.last_offset),
            )
            # Only labels a merchant window of the batch can hold (none in a live stream).
            reach = labels_reach_batch(transactions)
            labels = load_labels(conn, transactions.loc[reach, "transaction_id"].tolist())
    transactions = transactions.reset_index(drop=True)
    if history is not None:
        transactions["is_fraud"] = (
            transactions["transaction_id"].map(labels).astype(float).fillna(0.0)
        )
        features = compute_batch_features(transactions, history)
    else:
        features = pd.DataFrame(columns=FEATURE_COLUMNS, dtype=float)
    rejections.sort(key=lambda r: r.offset)
    timestamps = [t for t in raw.timestamps_ms if t is not None and t >= 0]
    return PreparedBatch(
        ref=ref,
        transactions=transactions,
        features=features,
        rejections=rejections,
        read_count=len(raw),
        oldest_kafka_timestamp_ms=min(timestamps) if timestamps else None,
        deleted_by_retention=raw.deleted_by_retention,
        history_stored_until=stored_until,
        accounts_read=history.accounts_read if history is not None else None,
        merchants_read=history.merchants_read if history is not None else None,
    )


def score_batch(prepared: PreparedBatch, model: LoadedModel) -> ScoredBatch:
    """Score every transaction of the batch with one `predict_proba` call."""
    transactions = prepared.transactions.drop(columns=["is_fraud"], errors="ignore").copy()
    probabilities = model.predict_proba(prepared.features)
    suspicious = probabilities >= model.threshold
    transactions["fraud_probability"] = probabilities
    transactions["is_suspicious"] = suspicious
    transactions["model_version"] = model.version
    suspicious_features = prepared.features.iloc[np.flatnonzero(suspicious)]
    suspicious_features.index = pd.Index(
        transactions["transaction_id"].to_numpy()[suspicious], name="transaction_id"
    )
    return ScoredBatch(
        ref=prepared.ref,
        transactions=transactions,
        rejections=prepared.rejections,
        read_count=prepared.read_count,
        model_version=model.version,
        threshold=model.threshold,
        oldest_kafka_timestamp_ms=prepared.oldest_kafka_timestamp_ms,
        deleted_by_retention=prepared.deleted_by_retention,
        history_stored_until=prepared.history_stored_until,
        suspicious_features=suspicious_features,
    )


def store_batch(scored: ScoredBatch, engine: Engine, run_id: str | None) -> PersistResult:
    """Write the scored batch, suspicious rows, alert outbox rows and rejections at once."""
    ref = scored.ref
    return persist_batch(
        engine,
        scored.transactions,
        scored.rejections,
        threshold=scored.threshold,
        run_id=run_id,
        batch_range=(ref.topic, ref.partition, ref.first_offset, ref.last_offset),
        deleted_by_retention=scored.deleted_by_retention,
        features=scored.suspicious_features,
        history_complete=scored.history_complete,
    )
