"""Training, evaluation and publishing of the fraud model (the same code for CLI, asset, benchmark).

Training follows the handbook's protocol: features over the whole history (merchant risk from
labels known with the delay), train on one period, skip the delay, evaluate on a later period.
Publishing writes `models/<name>-<version>.joblib` and its manifest entry with SHA-256 and metrics.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.pipeline import Pipeline

from fraud_dagster.errors import ModelIntegrityError
from fraud_dagster.features import DELAY_DAYS, FEATURE_COLUMNS, compute_features
from fraud_dagster.model import Manifest, ModelEntry, read_manifest, sha256_of_file, write_manifest

logger = logging.getLogger(__name__)

MODEL_NAME = "fraud-model"


@dataclass(frozen=True)
class Periods:
    """Train on [train_start, train_end], evaluate on [test_start, test_end] (whole days)."""

    train_start: pd.Timestamp
    train_end: pd.Timestamp
    test_start: pd.Timestamp
    test_end: pd.Timestamp

    @classmethod
    def last_days(cls, dates: pd.Series, train_days: int = 21, test_days: int = 7) -> Periods:
        """The latest periods the data allows: train, then the delay, then test."""
        last_day = pd.to_datetime(dates).max().normalize()
        test_start = last_day - pd.Timedelta(days=test_days - 1)
        train_end = test_start - pd.Timedelta(days=DELAY_DAYS + 1)
        train_start = train_end - pd.Timedelta(days=train_days - 1)
        return cls(train_start, train_end, test_start, last_day)

    def mask(self, dates: pd.Series, which: str) -> pd.Series:
        start, end = (
            (self.train_start, self.train_end)
            if which == "train"
            else (self.test_start, self.test_end)
        )
        day = pd.to_datetime(dates).dt.normalize()
        return (day >= start) & (day <= end)


@dataclass
class TrainingResult:
    estimator: Pipeline
    metrics: dict[str, float]
    threshold: float
    periods: Periods
    train_rows: int
    train_frauds: int
    test_scores: np.ndarray
    score_histogram: dict[str, Any]


def build_estimator(random_state: int = 0) -> Pipeline:
    return Pipeline(
        [
            (
                "classifier",
                HistGradientBoostingClassifier(
                    max_iter=300, learning_rate=0.05, max_leaf_nodes=31, random_state=random_state
                ),
            )
        ]
    )


def card_precision_at_k(frame: pd.DataFrame, scores: np.ndarray, k: int = 100) -> float:
    """Mean over days of the share of frauded cards among the k cards scored highest that day."""
    data = pd.DataFrame(
        {
            "day": pd.to_datetime(frame["transaction_date"]).dt.normalize().to_numpy(),
            "account_id": frame["account_id"].to_numpy(),
            "is_fraud": frame["is_fraud"].to_numpy(),
            "score": scores,
        }
    )
    per_card = data.groupby(["day", "account_id"], as_index=False).agg(
        score=("score", "max"), is_fraud=("is_fraud", "max")
    )
    precisions = [
        day_cards.nlargest(k, "score")["is_fraud"].mean()
        for _, day_cards in per_card.groupby("day")
    ]
    return float(np.mean(precisions)) if precisions else 0.0


def best_f1_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """The score threshold with the best F1 on held-out data: the alerting decision."""
    from sklearn.metrics import precision_recall_curve

    precision, recall, thresholds = precision_recall_curve(labels, scores)
    f1 = np.divide(
        2 * precision * recall,
        precision + recall,
        out=np.zeros_like(precision),
        where=(precision + recall) > 0,
    )
    best = int(np.argmax(f1[:-1])) if len(thresholds) else 0
    return float(thresholds[best]) if len(thresholds) else 0.5


def train_model(
    transactions: pd.DataFrame, periods: Periods | None = None, random_state: int = 0
) -> TrainingResult:
    """Fit on the train period, measure on the test period, pick the alert threshold."""
    transactions = transactions.sort_values("transaction_date", kind="stable").reset_index(
        drop=True
    )
    periods = periods or Periods.last_days(transactions["transaction_date"])
    features = compute_features(transactions)
    labels = transactions["is_fraud"].astype(int).to_numpy()
    train = periods.mask(transactions["transaction_date"], "train").to_numpy()
    test = periods.mask(transactions["transaction_date"], "test").to_numpy()
    if labels[train].sum() == 0 or labels[test].sum() == 0:
        raise ModelIntegrityError("training and test periods both need frauds; simulate more days")
    estimator = build_estimator(random_state)
    logger.info("training on %d transactions (%d frauds)", train.sum(), labels[train].sum())
    estimator.fit(features.loc[train, FEATURE_COLUMNS], labels[train])
    scores = estimator.predict_proba(features.loc[test, FEATURE_COLUMNS])[:, 1]
    metrics = {
        "auc_roc": float(roc_auc_score(labels[test], scores)),
        "average_precision": float(average_precision_score(labels[test], scores)),
        "card_precision_at_100": card_precision_at_k(transactions.loc[test], scores),
    }
    counts, edges = np.histogram(scores, bins=20, range=(0.0, 1.0))
    return TrainingResult(
        estimator=estimator,
        metrics=metrics,
        threshold=best_f1_threshold(labels[test], scores),
        periods=periods,
        train_rows=int(train.sum()),
        train_frauds=int(labels[train].sum()),
        test_scores=scores,
        score_histogram={"edges": edges.round(3).tolist(), "counts": counts.tolist()},
    )


def publish_model(
    models_dir: Path, result: TrainingResult, source: str, make_default: bool = False
) -> ModelEntry:
    """Write the model file and its manifest entry (SHA-256, data range, features, metrics)."""
    models_dir.mkdir(parents=True, exist_ok=True)
    created = datetime.now(UTC)
    version = created.strftime("%Y%m%dT%H%M%SZ")
    filename = f"{MODEL_NAME}-{version}.joblib"
    path = models_dir / filename
    joblib.dump(result.estimator, path, compress=3)
    entry = ModelEntry(
        version=version,
        file=filename,
        sha256=sha256_of_file(path),
        threshold=round(result.threshold, 6),
        features=tuple(FEATURE_COLUMNS),
        created_at=created.isoformat(timespec="seconds"),
        metrics={name: round(value, 6) for name, value in result.metrics.items()},
        training_data={
            "source": source,
            "train_start": result.periods.train_start.date().isoformat(),
            "train_end": result.periods.train_end.date().isoformat(),
            "test_start": result.periods.test_start.date().isoformat(),
            "test_end": result.periods.test_end.date().isoformat(),
            "train_rows": result.train_rows,
            "train_frauds": result.train_frauds,
        },
        score_histogram=result.score_histogram,
    )
    try:
        manifest = read_manifest(models_dir)
    except ModelIntegrityError:
        manifest = Manifest(entries=(), default_version=None)
    default = (
        version if make_default or manifest.default_version is None else manifest.default_version
    )
    write_manifest(
        models_dir, Manifest(entries=(*manifest.entries, entry), default_version=default)
    )
    logger.info("published model %s to %s (sha256 %s)", version, path, entry.sha256[:12])
    return entry
