"""The batch pipeline as plain functions: what each Dagster op does, callable without Dagster.

fetch (Kafka) -> `prepare_batch` (validate, features) -> `score_batch` (one predict_proba call)
-> `store_batch` (one database transaction) -> `deliver_alerts` (a few SMTP sessions at once).
Benchmarks and tests call these directly; `ops.py` wraps them for Dagster.
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta

import numpy as np
import pandas as pd
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from fraud_dagster.alerts import AlertDelivery, SmtpMailer, mask_account, render_alert
from fraud_dagster.errors import AlertDeliveryError, StorageError
from fraud_dagster.features import (
    FEATURE_COLUMNS,
    compute_batch_features,
)
from fraud_dagster.messages import RawBatch, Rejection, ValidationLimits, parse_batch
from fraud_dagster.model import LoadedModel
from fraud_dagster.storage.batches import PersistResult, persist_batch
from fraud_dagster.storage.history import classify_stored, load_batch_history
from fraud_dagster.storage.labels import load_labels
from fraud_dagster.storage.outbox import (
    AcceptedAlert,
    claim_alerts,
    mark_alerts_failed,
    mark_alerts_sent,
)

logger = logging.getLogger(__name__)

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


@dataclass
class PreparedBatch:
    """Valid transactions with their features, and everything rejected on the way."""

    ref: BatchRef
    transactions: pd.DataFrame
    features: pd.DataFrame
    rejections: list[Rejection]
    read_count: int
    oldest_kafka_timestamp_ms: int | None = None


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

    @property
    def suspicious_count(self) -> int:
        return int(self.transactions["is_suspicious"].sum()) if len(self.transactions) else 0

    def score_histogram(self) -> dict[str, int]:
        counts, edges = np.histogram(
            self.transactions["fraud_probability"], bins=SCORE_HISTOGRAM_BINS, range=(0.0, 1.0)
        )
        return {f"{edges[i]:.1f}-{edges[i + 1]:.1f}": int(count) for i, count in enumerate(counts)}


@dataclass
class DeliveryReport:
    """What one alert delivery attempt did."""

    claimed: int = 0
    sent: int = 0
    failed: int = 0
    error: str | None = None
    sent_ids: list[str] = field(default_factory=list)


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
            f"cannot read history from {engine.url.render_as_string(hide_password=True)}: the "
            f"database is unavailable; the batch is not scored (rerun it once it is back): {exc}"
        ) from exc
    with conn:
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
            labels = load_labels(conn, transactions["transaction_id"].tolist())
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
    )


def score_batch(prepared: PreparedBatch, model: LoadedModel) -> ScoredBatch:
    """Score every transaction of the batch with one `predict_proba` call."""
    transactions = prepared.transactions.drop(columns=["is_fraud"], errors="ignore").copy()
    probabilities = model.predict_proba(prepared.features)
    transactions["fraud_probability"] = probabilities
    transactions["is_suspicious"] = probabilities >= model.threshold
    transactions["model_version"] = model.version
    return ScoredBatch(
        ref=prepared.ref,
        transactions=transactions,
        rejections=prepared.rejections,
        read_count=prepared.read_count,
        model_version=model.version,
        threshold=model.threshold,
        oldest_kafka_timestamp_ms=prepared.oldest_kafka_timestamp_ms,
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
    )


def retry_delay(
    attempts: int, base_seconds: float = 30.0, max_seconds: float = 3600.0
) -> timedelta:
    """Exponential backoff for alert retries: 30 s, 1 min, 2 min, ... up to an hour."""
    return timedelta(seconds=min(base_seconds * 2 ** max(attempts - 1, 0), max_seconds))


ALERTS_PER_EXTRA_SESSION = 25


def smtp_session_count(alerts: int, max_sessions: int) -> int:
    """How many SMTP sessions send `alerts` emails: one more per 25 alerts, up to the limit.

    A session costs a connection (and TLS + login) before its first email, so a small batch
    uses one; a large one spreads over `max_sessions`, which the server serves side by side.
    """
    return max(1, min(max_sessions, -(-alerts // ALERTS_PER_EXTRA_SESSION)))


@dataclass
class _SessionOutcome:
    """What one SMTP session of a delivery got through before it ended or broke."""

    unsent: list[dict] = field(default_factory=list)
    error: AlertDeliveryError | None = None


def _send_share(
    share: list[dict],
    delivery: AlertDelivery,
    accepted: queue.Queue[AcceptedAlert | None],
    stop: threading.Event,
) -> _SessionOutcome:
    """Send `share` over one session, reporting each acceptance on `accepted` at once.

    Stops early when `stop` is set (the marking thread failed): what was not sent then stays
    claimed, and the claim's expiry returns it to the outbox."""
    sent = 0
    try:
        with SmtpMailer(delivery.smtp) as mailer:
            for alert in share:
                if stop.is_set():
                    break
                message = render_alert(alert, delivery.sender, delivery.recipients)
                refused = mailer.send(message)
                note = (
                    f"accepted, but recipients refused: {', '.join(refused)}" if refused else None
                )
                accepted.put(AcceptedAlert(alert["transaction_id"], message["Message-ID"], note))
                sent += 1
    except AlertDeliveryError as exc:
        return _SessionOutcome(unsent=share[sent:], error=exc)
    finally:
        accepted.put(None)  # this session is done
    return _SessionOutcome()


def deliver_alerts(
    engine: Engine,
    delivery: AlertDelivery,
    token: str,
    *,
    batch: BatchRef | None = None,
    limit: int | None = None,
    pending_grace: timedelta | None = None,
) -> DeliveryReport:
    """Send the due alerts of `batch` (or every due alert) over up to `delivery.max_sessions`
    SMTP sessions at once (`smtp_session_count`), each taking an equal share in date order.

    This thread marks accepted alerts sent as the sessions report them, a group per database
    transaction, while the sessions go on sending. If a session fails, its alerts not yet sent
    are marked failed with the error and a backoff; they stay in the outbox for the next
    attempt. Nothing is raised for an SMTP failure: the report says what happened.

    Guarantee: an alert is marked sent only after the server accepted it, and two senders never
    hold it at once, so it is sent once. The one gap is a sender dying (or the database failing)
    between the server's acceptance and the UPDATE (milliseconds: the marks follow the sends):
    the claim then expires and the alert is sent again, with the same Message-ID, which mail
    clients use to drop the copy.
    """
    source = (
        (batch.topic, batch.partition, batch.first_offset, batch.last_offset) if batch else None
    )
    claimed = claim_alerts(
        engine, token, source_range=source, limit=limit, pending_grace=pending_grace
    )
    report = DeliveryReport(claimed=len(claimed))
    if not claimed:
        return report
    sessions = smtp_session_count(len(claimed), delivery.max_sessions)
    accepted: queue.Queue[AcceptedAlert | None] = queue.Queue()
    accounts = {alert["transaction_id"]: alert["account_id"] for alert in claimed}
    stop = threading.Event()
    with ThreadPoolExecutor(sessions, thread_name_prefix="smtp-session") as pool:
        outcomes = [
            pool.submit(_send_share, claimed[i::sessions], delivery, accepted, stop)
            for i in range(sessions)
        ]
        running = sessions
        try:
            while running:
                group = [accepted.get()]
                while not accepted.empty():
                    group.append(accepted.get_nowait())
                running -= group.count(None)
                _record_sent([x for x in group if x is not None], engine, token, accounts, report)
        except BaseException:
            stop.set()
            raise
    ended = [outcome.result() for outcome in outcomes]
    unsent = [alert for outcome in ended for alert in outcome.unsent]
    errors = [str(outcome.error) for outcome in ended if outcome.error is not None]
    if unsent:
        attempts = max(int(alert["attempts"]) for alert in unsent)
        mark_alerts_failed(
            engine,
            [alert["transaction_id"] for alert in unsent],
            token,
            errors[0],
            retry_delay(attempts, delivery.retry_base_seconds, delivery.retry_max_seconds),
        )
        report.failed = len(unsent)
    if errors:
        report.error = errors[0]
        logger.warning(
            "alert delivery: %d sent, %d left for a retry: %s",
            report.sent,
            report.failed,
            errors[0],
        )
    return report


def _record_sent(
    group: list[AcceptedAlert],
    engine: Engine,
    token: str,
    accounts: dict[str, str],
    report: DeliveryReport,
) -> None:
    if not group:
        return
    for transaction_id in mark_alerts_sent(engine, group, token):
        logger.warning("alert %s was sent, but its claim had expired", transaction_id)
    for alert in group:
        report.sent += 1
        report.sent_ids.append(alert.transaction_id)
        logger.info(
            "alert sent for transaction %s (account %s)",
            alert.transaction_id,
            mask_account(accounts[alert.transaction_id]),
        )
