"""Training, evaluation and publishing of the fraud model (one code path for CLI, asset, benchmark).

Evaluation follows the Fraud Detection Handbook's protocol (chapter 3): the features are computed
over the whole history (merchant risk from labels known with the delay); the model is fitted on a
training period; after a delay of `DELAY_DAYS` it is tested on a later period from which the cards
already known to be compromised are removed (frauds of the training period, and for each test day
the frauds known by then); card precision@100 counts each frauded card once (cards detected on an
earlier test day are removed). Publishing writes `models/<name>-<version>.joblib` and its manifest
entry with SHA-256, data range, features, metrics and threshold.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd
from sklearn.base import ClassifierMixin
from sklearn.ensemble import (
    HistGradientBoostingClassifier,
    RandomForestClassifier,
    VotingClassifier,
)
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from fraud_dagster.errors import ConfigurationError, ModelIntegrityError
from fraud_dagster.features import DELAY_DAYS, FEATURE_COLUMNS, compute_features
from fraud_dagster.messages import naive_utc_dates
from fraud_dagster.model import (
    MANIFEST_NAME,
    Manifest,
    ModelEntry,
    library_versions,
    read_manifest,
    write_manifest,
    write_new_file,
)

logger = logging.getLogger(__name__)

MODEL_NAME = "fraud-model"
TOP_K = 100
CARD_PRECISION_METRIC = f"card_precision_at_{TOP_K}"

Progress = Callable[[str], None]


# --- estimators -------------------------------------------------------------------------------


def _logistic(random_state: int) -> ClassifierMixin:
    return Pipeline(
        [
            ("scale", StandardScaler()),
            ("classifier", LogisticRegression(max_iter=1000, random_state=random_state)),
        ]
    )


def _random_forest(random_state: int) -> ClassifierMixin:
    return RandomForestClassifier(n_estimators=100, random_state=random_state, n_jobs=-1)


def _gradient_boosting(random_state: int) -> ClassifierMixin:
    return HistGradientBoostingClassifier(
        max_iter=500,
        learning_rate=0.02,
        max_leaf_nodes=15,
        min_samples_leaf=50,
        l2_regularization=1.0,
        random_state=random_state,
    )


def _forest_and_boosting(random_state: int) -> ClassifierMixin:
    """Soft vote of a regularised random forest and gradient boosting: the product's default."""
    forest = RandomForestClassifier(
        n_estimators=200,
        min_samples_leaf=10,
        max_features=0.5,
        random_state=random_state,
        n_jobs=-1,
    )
    return VotingClassifier(
        [("forest", forest), ("boosting", _gradient_boosting(random_state))], voting="soft"
    )


# Every kind is plain scikit-learn (published as a Pipeline); `logistic` and `random_forest` are
# the handbook's baseline classifiers, kept for the benchmark's comparison.
MODEL_KINDS: dict[str, Callable[[int], ClassifierMixin]] = {
    "forest_boosting": _forest_and_boosting,
    "gradient_boosting": _gradient_boosting,
    "random_forest": _random_forest,
    "logistic": _logistic,
}
DEFAULT_MODEL_KIND = "forest_boosting"


def build_estimator(kind: str = DEFAULT_MODEL_KIND, random_state: int = 0) -> Pipeline:
    """A fresh, unfitted scikit-learn pipeline of `kind` (see `MODEL_KINDS`)."""
    try:
        factory = MODEL_KINDS[kind]
    except KeyError:
        raise ConfigurationError(
            f"unknown model kind {kind!r}; choose one of {', '.join(MODEL_KINDS)}"
        ) from None
    estimator = factory(random_state)
    return estimator if isinstance(estimator, Pipeline) else Pipeline([("classifier", estimator)])


# --- periods and the test set -----------------------------------------------------------------


@dataclass(frozen=True)
class Periods:
    """Train on [train_start, train_end], test on [test_start, test_end] (whole days)."""

    train_start: pd.Timestamp
    train_end: pd.Timestamp
    test_start: pd.Timestamp
    test_end: pd.Timestamp

    @classmethod
    def starting(
        cls, train_start: str | pd.Timestamp, train_days: int = 7, test_days: int = 7
    ) -> Periods:
        """Train for `train_days` from `train_start`, skip the delay, test for `test_days`."""
        start = pd.Timestamp(train_start).normalize()
        train_end = start + pd.Timedelta(days=train_days - 1)
        test_start = train_end + pd.Timedelta(days=DELAY_DAYS + 1)
        return cls(start, train_end, test_start, test_start + pd.Timedelta(days=test_days - 1))

    @classmethod
    def last_days(cls, dates: pd.Series, train_days: int = 21, test_days: int = 7) -> Periods:
        """The latest periods the data allows: train, then the delay, then test."""
        last_day = pd.to_datetime(dates).max().normalize()
        test_start = last_day - pd.Timedelta(days=test_days - 1)
        train_start = test_start - pd.Timedelta(days=DELAY_DAYS + train_days)
        return cls.starting(train_start, train_days, test_days)

    def mask(self, dates: pd.Series, which: str) -> pd.Series:
        start, end = (
            (self.train_start, self.train_end)
            if which == "train"
            else (self.test_start, self.test_end)
        )
        day = pd.to_datetime(dates).dt.normalize()
        return (day >= start) & (day <= end)


def evaluation_rows(transactions: pd.DataFrame, periods: Periods) -> np.ndarray:
    """Rows of the test period whose card was not yet known to be compromised that day.

    Known on test day T: the cards with a fraud between the start of the training period and
    T - DELAY_DAYS - 1 (labels arrive after the delay). Those cards would already be blocked,
    so scoring them again would only inflate the figures.
    """
    day = pd.to_datetime(transactions["transaction_date"]).dt.normalize()
    fraud = transactions["is_fraud"].fillna(0).astype(bool)
    frauds = pd.DataFrame({"day": day[fraud], "account_id": transactions["account_id"][fraud]})
    first_fraud = (
        frauds.loc[frauds["day"] >= periods.train_start].groupby("account_id")["day"].min()
    )
    first_fraud_day = pd.Series(
        first_fraud.reindex(transactions["account_id"]).to_numpy(), index=transactions.index
    )
    known_since = first_fraud_day + pd.Timedelta(days=DELAY_DAYS + 1)
    in_test = periods.mask(transactions["transaction_date"], "test")
    already_known = known_since.notna() & (known_since <= day)
    return (in_test & ~already_known).to_numpy()


# --- metrics ----------------------------------------------------------------------------------


def card_precision_at_k(frame: pd.DataFrame, scores: np.ndarray, k: int = TOP_K) -> float:
    """The handbook's card precision@k, averaged over the days of `frame`.

    Each day, a card's score is its highest transaction score and it is frauded if any of its
    transactions is a fraud; the share of frauded cards among the k best-scored cards (out of
    k, even if fewer cards transacted) is that day's precision. Frauded cards found in an
    earlier day's top k are left out of later days: an analyst has already blocked them.
    """
    data = pd.DataFrame(
        {
            "day": pd.to_datetime(frame["transaction_date"]).dt.normalize().to_numpy(),
            "account_id": frame["account_id"].to_numpy(),
            "is_fraud": frame["is_fraud"].fillna(0).astype(int).to_numpy(),
            "score": scores,
        }
    )
    detected: set[Any] = set()
    precisions = []
    for _, day in data.groupby("day", sort=True):
        cards = (
            day.loc[~day["account_id"].isin(detected)]
            .groupby("account_id", sort=True)
            .agg(score=("score", "max"), is_fraud=("is_fraud", "max"))
            .sort_values("score", ascending=False, kind="stable")
            .head(k)
        )
        found = cards.index[cards["is_fraud"] == 1]
        precisions.append(len(found) / k)
        detected.update(found)
    return float(np.mean(precisions)) if precisions else 0.0


def evaluate(frame: pd.DataFrame, scores: np.ndarray) -> dict[str, float]:
    """AUC ROC, average precision and card precision@100 of `scores` on labelled `frame`."""
    labels = frame["is_fraud"].fillna(0).astype(int).to_numpy()
    return {
        "auc_roc": float(roc_auc_score(labels, scores)),
        "average_precision": float(average_precision_score(labels, scores)),
        CARD_PRECISION_METRIC: card_precision_at_k(frame, scores),
    }


def best_f1_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """The score threshold with the best F1 on held-out data: the alerting decision."""
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    if not len(thresholds):
        return 0.5
    f1 = np.divide(
        2 * precision * recall,
        precision + recall,
        out=np.zeros_like(precision),
        where=(precision + recall) > 0,
    )
    return float(thresholds[int(np.argmax(f1[:-1]))])


# --- training ---------------------------------------------------------------------------------


@dataclass
class TrainingResult:
    """A fitted model and how it did on the held-out test period."""

    estimator: Pipeline
    kind: str
    metrics: dict[str, float]
    threshold: float
    periods: Periods
    train_rows: int
    train_frauds: int
    test_rows: int
    test_frauds: int
    test_scores: np.ndarray
    score_histogram: dict[str, Any]
    fit_seconds: float


def _checked_column(
    frame: pd.DataFrame,
    column: str,
    valid: Callable[[pd.Series], pd.Series],
    expected: str,
) -> pd.Series:
    """`column` as numbers, or ConfigurationError naming the first rows that hold something
    else (a label like "yes" or an amount like "ten" would otherwise stop training with
    pandas' own traceback)."""
    values = pd.to_numeric(frame[column], errors="coerce")
    bad = ~(values.notna() & valid(values))
    if bad.any():
        examples = ", ".join(
            f"{tid}: {value!r}"
            for tid, value in zip(
                frame.loc[bad, "transaction_id"][:3], frame.loc[bad, column][:3], strict=True
            )
        )
        raise ConfigurationError(
            f"training data: {column} must be {expected}; {int(bad.sum())} row(s) hold "
            f"something else (transaction id: value, e.g. {examples})"
        )
    return values


def prepare_training_frame(transactions: pd.DataFrame) -> pd.DataFrame:
    """Labelled transactions in time order (ties in id order), identifiers as strings.

    Identifiers are strings everywhere (the stream's messages carry them as text), so that
    offline and online features break same-second ties the same way.
    """
    if transactions.empty:
        raise ConfigurationError("training data holds no transactions")
    missing = {
        "transaction_id",
        "account_id",
        "merchant",
        "transaction_amount",
        "transaction_date",
        "is_fraud",
    } - set(transactions.columns)
    if missing:
        raise ConfigurationError(
            f"training data lacks the columns {sorted(missing)}; see `load_labelled_csv`"
        )
    frame = transactions.copy()
    for column in ("transaction_id", "account_id", "merchant"):
        frame[column] = frame[column].astype(str)
    repeated = frame["transaction_id"].duplicated(keep=False)
    if repeated.any():
        named = sorted(set(frame.loc[repeated, "transaction_id"]))
        raise ConfigurationError(
            f"training data repeats {len(named)} transaction id(s), e.g. {', '.join(named[:5])}: "
            "keep one row per transaction (scoring rejects a repeated id, so a repeat would "
            "count twice in the account and merchant windows the model learns from)"
        )
    try:
        frame["transaction_date"] = naive_utc_dates(frame["transaction_date"])
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(f"training data has unreadable transaction_date: {exc}") from exc
    frame["transaction_amount"] = _checked_column(
        frame,
        "transaction_amount",
        lambda amounts: np.isfinite(amounts) & (amounts >= 0),
        "a finite number of 0 or more",
    )
    # An empty label is read as genuine, as before; any other value must say 0 or 1.
    frame["is_fraud"] = _checked_column(
        frame.assign(is_fraud=frame["is_fraud"].fillna(0)),
        "is_fraud",
        lambda labels: labels.isin((0, 1)),
        "0 (genuine) or 1 (fraud)",
    ).astype(int)
    return frame.sort_values("transaction_date", kind="stable").reset_index(drop=True)


def train_model(
    transactions: pd.DataFrame,
    periods: Periods | None = None,
    kind: str = DEFAULT_MODEL_KIND,
    random_state: int = 0,
    features: pd.DataFrame | None = None,
    progress: Progress | None = None,
) -> TrainingResult:
    """Fit `kind` on the train period, measure it on the test period, pick the alert threshold.

    `transactions` must come from `prepare_training_frame`; `features` may be passed when they
    were computed already (`compute_features(transactions)`), e.g. to train several kinds.
    `progress` receives one line per step (default: this module's logger).
    """
    report = progress or logger.info
    estimator = build_estimator(kind, random_state)
    periods = periods or Periods.last_days(transactions["transaction_date"])
    if features is None:
        report(f"[1/4] computing features of {len(transactions):,} transactions")
        features = compute_features(transactions)
    labels = transactions["is_fraud"].to_numpy(dtype=int)
    train = periods.mask(transactions["transaction_date"], "train").to_numpy()
    test = evaluation_rows(transactions, periods)
    if labels[train].sum() == 0 or labels[test].sum() == 0:
        raise ModelIntegrityError(
            f"the training period {periods.train_start.date()}..{periods.train_end.date()} and "
            f"the test period {periods.test_start.date()}..{periods.test_end.date()} both need "
            "frauds; give more (or more recent) labelled data"
        )
    report(
        f"[2/4] fitting {kind} on {train.sum():,} transactions ({labels[train].sum():,} frauds) "
        f"of {periods.train_start.date()}..{periods.train_end.date()}"
    )
    started = time.monotonic()
    with _heartbeat(report, f"fitting {kind}"):
        estimator.fit(features.loc[train, FEATURE_COLUMNS], labels[train])
    fit_seconds = time.monotonic() - started
    report(
        f"[3/4] fitted in {fit_seconds:.1f}s; scoring {test.sum():,} test transactions "
        f"({labels[test].sum():,} frauds) of {periods.test_start.date()}..{periods.test_end.date()}"
    )
    scores = estimator.predict_proba(features.loc[test, FEATURE_COLUMNS])[:, 1]
    metrics = evaluate(transactions.loc[test], scores)
    report(
        "[4/4] test metrics: " + ", ".join(f"{name} {value:.3f}" for name, value in metrics.items())
    )
    counts, edges = np.histogram(scores, bins=20, range=(0.0, 1.0))
    return TrainingResult(
        estimator=estimator,
        kind=kind,
        metrics=metrics,
        threshold=best_f1_threshold(labels[test], scores),
        periods=periods,
        train_rows=int(train.sum()),
        train_frauds=int(labels[train].sum()),
        test_rows=int(test.sum()),
        test_frauds=int(labels[test].sum()),
        test_scores=scores,
        score_histogram={"edges": edges.round(3).tolist(), "counts": counts.tolist()},
        fit_seconds=fit_seconds,
    )


@contextmanager
def _heartbeat(
    report: Progress,
    what: str,
    every_seconds: float = 30.0,
    *,
    clock: Callable[[], float] = time.monotonic,
    wait: Callable[[threading.Event, float], bool] = threading.Event.wait,
) -> Iterator[None]:
    """Report every `every_seconds` that `what` is still going: a fit can take minutes.

    `wait(stop, seconds)` waits one interval and returns True once `stop` is set; `clock` gives
    the elapsed time. Both are the real ones unless a test drives the heartbeat itself.
    """
    stop = threading.Event()
    started = clock()

    def beat() -> None:
        while not wait(stop, every_seconds):
            report(f"      still {what}: {clock() - started:.0f}s")

    thread = threading.Thread(target=beat, name="training-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


# --- training data ----------------------------------------------------------------------------

# Handbook CSV column -> training column (the stream's field names plus the label).
HANDBOOK_COLUMNS = {
    "TRANSACTION_ID": "transaction_id",
    "CUSTOMER_ID": "account_id",
    "TERMINAL_ID": "merchant",
    "TX_AMOUNT": "transaction_amount",
    "TX_DATETIME": "transaction_date",
    "TX_FRAUD": "is_fraud",
}


def load_labelled_csv(path: Path) -> pd.DataFrame:
    """Labelled transactions from a CSV (plain or .gz): handbook columns or the project's own.

    The project's columns are the message fields plus is_fraud (1 fraud, 0 genuine).
    """
    try:
        header = pd.read_csv(path, nrows=0).columns
        if set(HANDBOOK_COLUMNS) <= set(header):
            frame = pd.read_csv(path, usecols=list(HANDBOOK_COLUMNS)).rename(
                columns=HANDBOOK_COLUMNS
            )
        else:
            frame = pd.read_csv(path)
    except (OSError, ValueError) as exc:  # pandas' ParserError is a ValueError
        raise ConfigurationError(f"cannot read training data {path}: {exc}") from exc
    return prepare_training_frame(frame)


def simulated_training_data(days: int = 90, seed: int = 0) -> tuple[pd.DataFrame, str]:
    """The default training data: the project's own simulator, and how to name that source."""
    from fraud_dagster.simulator import SimulationConfig, simulate_transactions

    if days < 1:  # the asset's config is not checked by argparse as the command's is
        raise ConfigurationError(f"simulated_days must be 1 or more, got {days}")
    frame = simulate_transactions(SimulationConfig(n_days=days, seed=seed))
    return prepare_training_frame(frame), f"simulator(days={days}, seed={seed})"


# --- publishing -------------------------------------------------------------------------------


@contextmanager
def _manifest_lock(models_dir: Path) -> Iterator[None]:
    """Serialise read-modify-write of the manifest between publishers (CLI, asset runs).

    The lock is held on the directory itself, so no lock file is left next to the models.
    """
    descriptor = os.open(models_dir, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # closing releases the lock


def publish_model(
    models_dir: Path, result: TrainingResult, source: str, make_default: bool = False
) -> ModelEntry:
    """Write the model file and its manifest entry (SHA-256, data range, features, metrics).

    Publishing does not put the model in service: `reload_model` validates and promotes it.
    `make_default` only decides what serves before any promotion (the shipped model).
    """
    models_dir.mkdir(parents=True, exist_ok=True)
    with _manifest_lock(models_dir):
        # Only a missing manifest starts a new one: an unreadable one (a hand edit's typo) holds
        # the entries and the default that serve, which a fresh one would drop and replace
        # with this unchecked model.
        if (models_dir / MANIFEST_NAME).exists():
            try:
                manifest = read_manifest(models_dir)
            except ModelIntegrityError as exc:
                raise ModelIntegrityError(
                    f"{exc}; repair it before publishing a model (nothing was written)"
                ) from exc
        else:
            manifest = Manifest(entries=(), default_version=None)
        created = datetime.now(UTC)
        version = _unique_version(created.strftime("%Y%m%dT%H%M%SZ"), manifest, models_dir)
        filename = f"{MODEL_NAME}-{version}.joblib"
        path = models_dir / filename
        pickled = io.BytesIO()
        joblib.dump(result.estimator, pickled, compress=3)
        # The hash is of the bytes written, not of the path read back afterwards.
        write_new_file(path, pickled.getvalue())
        entry = ModelEntry(
            version=version,
            file=filename,
            sha256=hashlib.sha256(pickled.getvalue()).hexdigest(),
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
                "test_rows": result.test_rows,
                "test_frauds": result.test_frauds,
            },
            score_histogram=result.score_histogram,
            kind=result.kind,
            trained_with=library_versions(),
        )
        default = (
            version
            if make_default or manifest.default_version is None
            else manifest.default_version
        )
        write_manifest(
            models_dir, Manifest(entries=(*manifest.entries, entry), default_version=default)
        )
    logger.info("published model %s to %s (sha256 %s)", version, path, entry.sha256[:12])
    return entry


def _unique_version(version: str, manifest: Manifest, models_dir: Path) -> str:
    """`version`, or `version-2`, `-3`... when a model was published in the same second."""
    taken = {entry.version for entry in manifest.entries}
    candidate, n = version, 1
    while candidate in taken or os.path.lexists(models_dir / f"{MODEL_NAME}-{candidate}.joblib"):
        n += 1
        candidate = f"{version}-{n}"
    return candidate
