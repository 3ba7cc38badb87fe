"""The batch pipeline as plain functions: what each Dagster op does, callable without Dagster.

fetch (Kafka) -> `prepare_batch` (validate, features) -> `score_batch` (one predict_proba call)
-> `store_batch` (one database transaction) -> `deliver_alerts` (a few SMTP sessions at once).
Benchmarks and tests call these directly; `ops.py` wraps them for Dagster.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta

import numpy as np
import pandas as pd
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from fraud_dagster.alerts import (
    AlertDelivery,
    MessageRefusedError,
    SmtpMailer,
    mask_account,
    render_alert,
)
from fraud_dagster.errors import AlertDeliveryError, StorageError
from fraud_dagster.features import (
    FEATURE_COLUMNS,
    HistoryRead,
    compute_batch_features,
    labels_reach_batch,
)
from fraud_dagster.messages import RawBatch, Rejection, ValidationLimits, parse_batch
from fraud_dagster.model import LoadedModel
from fraud_dagster.storage.batches import PersistResult, persist_batch, stored_without_gap
from fraud_dagster.storage.history import classify_stored, load_batch_history
from fraud_dagster.storage.labels import load_labels
from fraud_dagster.storage.outbox import (
    SEND_WITHIN_CLAIM,
    AcceptedAlert,
    claim_alerts,
    mark_alerts_failed,
    mark_alerts_sent,
    release_alerts,
)

logger = logging.getLogger(__name__)

SCORE_HISTOGRAM_BINS = 10
# Alerts the SMTP server accepted are marked sent right away; if the database is unreachable
# then (a restart, a failover), the marks are retried for this long before the delivery gives
# up. Unmarked, those alerts would be sent again by the next sender. No new email is started
# meanwhile.
MARK_SENT_PATIENCE = timedelta(seconds=30)
MARK_SENT_RETRY_DELAY_SECONDS = (0.5, 5.0)  # first delay, doubling up to the second


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


@dataclass
class DeliveryReport:
    """What one alert delivery attempt did."""

    claimed: int = 0
    sent: int = 0
    failed: int = 0
    error: str | None = None
    sent_ids: list[str] = field(default_factory=list)
    released: int = 0  # claimed, not tried before the claim's time was up, due again


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

    unsent: list[dict] = field(default_factory=list)  # left when the session broke
    error: AlertDeliveryError | None = None
    refused: list[tuple[dict, MessageRefusedError]] = field(default_factory=list)
    untried: list[dict] = field(default_factory=list)  # left when the claim's time was up


def _send_share(
    share: list[dict],
    delivery: AlertDelivery,
    accepted: queue.Queue[AcceptedAlert | None],
    stop: threading.Event,
    time_is_up: Callable[[], bool] = lambda: False,
) -> _SessionOutcome:
    """Send `share` over one session, reporting each acceptance on `accepted` at once.

    A message the server refuses while the session stays usable is noted against its alert
    only, and the session goes on; a broken session ends it, the rest left unsent. Before each
    message `time_is_up()` is asked: once it says so, the rest is left untried (the delivery
    releases it). Stops early when `stop` is set (the marking thread cannot record what was
    sent): the rest is left untried too."""
    outcome = _SessionOutcome()
    tried = 0
    try:
        if time_is_up():
            outcome.untried = share
            return outcome
        with SmtpMailer(delivery.smtp) as mailer:
            for alert in share:
                if stop.is_set() or time_is_up():
                    outcome.untried = share[tried:]
                    break
                message = render_alert(alert, delivery.sender, delivery.recipients)
                try:
                    refused = mailer.send(message)
                except MessageRefusedError as exc:
                    outcome.refused.append((alert, exc))
                    tried += 1
                    continue
                note = (
                    f"accepted, but recipients refused: {', '.join(refused)}" if refused else None
                )
                accepted.put(AcceptedAlert(alert["transaction_id"], message["Message-ID"], note))
                tried += 1
    except AlertDeliveryError as exc:
        outcome.unsent, outcome.error = share[tried:], exc
    finally:
        accepted.put(None)  # this session is done
    return outcome


def _mark_sent_through_outage(
    engine: Engine,
    group: list[AcceptedAlert],
    token: str,
    stop: threading.Event,
) -> list[str]:
    """`mark_alerts_sent`, retried with backoff while the database is unreachable (at most
    MARK_SENT_PATIENCE); on the first failure `stop` is set, so that the sessions start no new
    email."""
    deadline = time.monotonic() + MARK_SENT_PATIENCE.total_seconds()
    delay, longest = MARK_SENT_RETRY_DELAY_SECONDS
    while True:
        try:
            return mark_alerts_sent(engine, group, token)
        except OperationalError as exc:
            stop.set()
            if time.monotonic() + delay > deadline:
                raise
            logger.warning(
                "cannot mark %d accepted alert(s) sent, the database is unreachable; trying "
                "again in %.1f s: %s",
                len(group),
                delay,
                str(exc.orig).strip(),
            )
            time.sleep(delay)
            delay = min(delay * 2, longest)


def deliver_alerts(
    engine: Engine,
    delivery: AlertDelivery,
    token: str,
    *,
    batch: BatchRef | None = None,
    limit: int | None = None,
    pending_grace: timedelta | None = None,
    abandoned: Collection[str] = (),
    send_within: timedelta = SEND_WITHIN_CLAIM,
    clock: Callable[[], float] = time.monotonic,
) -> DeliveryReport:
    """Send the due alerts of `batch` (or every due alert) over up to `delivery.max_sessions`
    SMTP sessions at once (`smtp_session_count`), each taking an equal share in date order.

    This thread marks accepted alerts sent as the sessions report them, a group per database
    transaction, while the sessions go on sending. A message the server refuses (the session
    still usable) is marked failed with the server's reply and a backoff, and its session goes
    on. If a session breaks, its alerts not yet sent are marked failed with the error and a
    backoff. Failed alerts stay in the outbox for the next attempt. Nothing is raised for an
    SMTP failure: the report says what happened.

    The claim is never renewed: no message is started once `send_within` (half the time after
    which another sender may take the claim over) has passed since the claim, by `clock`
    (seconds). The alerts not tried by then are released (`release_alerts`): due again at once,
    the attempt not counted, for the next sender.

    Claims left by senders that ended (tokens in `abandoned`, see `claim_alerts`) are taken over
    at once; other senders' claims only once they expire.

    If the database cannot be reached to mark accepted alerts sent, no new email is started and
    the marks are retried for up to MARK_SENT_PATIENCE; the alerts not tried are released as above.

    An interrupt (the operator's Terminate) starts no new email either: each session ends the
    one it is sending, what the server accepted is marked sent, the rest is recorded as above,
    and the interrupt is raised again.

    Guarantee: an alert is marked sent only after the server accepted it, and two senders never
    hold it at once, so it is sent once. The one gap is a sender dying between the server's
    acceptance and the UPDATE (milliseconds: the marks follow the sends), or the database
    staying unreachable for longer than MARK_SENT_PATIENCE: the next sender takes the claim over
    and sends the alert again, with the same Message-ID, which mail clients use to drop the
    copy.
    """
    source = (
        (batch.topic, batch.partition, batch.first_offset, batch.last_offset) if batch else None
    )
    deadline = clock() + send_within.total_seconds()  # read before the claim's time is set
    claimed = claim_alerts(
        engine,
        token,
        source_range=source,
        limit=limit,
        pending_grace=pending_grace,
        abandoned=abandoned,
    )
    report = DeliveryReport(claimed=len(claimed))
    if not claimed:
        return report
    sessions = smtp_session_count(len(claimed), delivery.max_sessions)
    accepted: queue.Queue[AcceptedAlert | None] = queue.Queue()
    accounts = {alert["transaction_id"]: alert["account_id"] for alert in claimed}
    stop = threading.Event()
    interrupted: BaseException | None = None
    unrecorded: list[AcceptedAlert] = []  # accepted, and not known to be marked sent
    with ThreadPoolExecutor(sessions, thread_name_prefix="smtp-session") as pool:
        outcomes = [
            pool.submit(
                _send_share,
                claimed[i::sessions],
                delivery,
                accepted,
                stop,
                lambda: clock() >= deadline,
            )
            for i in range(sessions)
        ]
        running = sessions
        try:
            while running:
                group = [accepted.get()]
                while not accepted.empty():
                    group.append(accepted.get_nowait())
                running -= group.count(None)
                unrecorded = [x for x in group if x is not None]
                _record_sent(unrecorded, engine, token, accounts, report, stop)
                unrecorded = []
        except BaseException as exc:  # the run terminated (interrupt), the database gone
            stop.set()
            interrupted = exc
    # Leaving the pool waited for every session to end the email it had started.
    if isinstance(interrupted, OperationalError):
        raise interrupted  # the database is gone: nothing more can be recorded
    if interrupted is not None:
        _record_after_interrupt(interrupted, unrecorded, accepted, engine, token, accounts, report)
    ended = [outcome.result() for outcome in outcomes]
    refused = [pair for outcome in ended for pair in outcome.refused]
    untried = [alert for outcome in ended for alert in outcome.untried]
    errors = [str(exc) for _, exc in refused] + [
        str(outcome.error) for outcome in ended if outcome.error is not None
    ]
    for alert, exc in refused:
        logger.warning(
            "alert for transaction %s (account %s) refused by the SMTP server: %s",
            alert["transaction_id"],
            mask_account(accounts[alert["transaction_id"]]),
            exc,
        )
    failures = [(alert, str(exc)) for alert, exc in refused] + [
        (alert, str(outcome.error)) for outcome in ended for alert in outcome.unsent
    ]
    _record_failed(failures, engine, token, delivery)
    report.failed = len(failures)
    if untried:
        report.released = release_alerts(
            engine, [alert["transaction_id"] for alert in untried], token
        )
        logger.warning(
            "alert delivery: %d alert(s) not tried %s, released for the next sender",
            len(untried),
            "before the interrupt" if interrupted else f"within {send_within} of the claim",
        )
    if errors:
        report.error = errors[0]
        logger.warning(
            "alert delivery: %d sent, %d left for a retry: %s",
            report.sent,
            report.failed,
            errors[0],
        )
    if interrupted is not None:
        raise interrupted
    return report


def _record_after_interrupt(
    interrupted: BaseException,
    unrecorded: list[AcceptedAlert],
    accepted: queue.Queue[AcceptedAlert | None],
    engine: Engine,
    token: str,
    accounts: dict[str, str],
    report: DeliveryReport,
) -> None:
    """Mark sent what the server accepted after the interrupt (the emails the sessions had in
    flight) or before it without the mark being known to have committed (marking twice is
    harmless: same claim). Without this, the run ends holding claims on emails already
    delivered, and the next sender sends them again."""
    while not accepted.empty():
        item = accepted.get_nowait()
        if item is not None:
            unrecorded.append(item)
    logger.warning(
        "alert delivery interrupted (%s): recording the %d email(s) accepted meanwhile, then "
        "releasing the untried",
        type(interrupted).__name__,
        len(unrecorded),
    )
    _record_sent(unrecorded, engine, token, accounts, report, threading.Event())


def _record_failed(
    failures: list[tuple[dict, str]], engine: Engine, token: str, delivery: AlertDelivery
) -> None:
    """Mark each alert failed with its error and a backoff after its own attempts (one UPDATE
    per distinct error and attempt count, in one transaction each)."""
    groups: dict[tuple[str, int], list[str]] = {}
    for alert, error in failures:
        key = (error, int(alert["attempts"]))
        groups.setdefault(key, []).append(alert["transaction_id"])
    for (error, attempts), ids in groups.items():
        mark_alerts_failed(
            engine,
            ids,
            token,
            error,
            retry_delay(attempts, delivery.retry_base_seconds, delivery.retry_max_seconds),
        )


def _record_sent(
    group: list[AcceptedAlert],
    engine: Engine,
    token: str,
    accounts: dict[str, str],
    report: DeliveryReport,
    stop: threading.Event,
) -> None:
    if not group:
        return
    for transaction_id in _mark_sent_through_outage(engine, group, token, stop):
        logger.warning("alert %s was sent, but its claim had expired", transaction_id)
    for alert in group:
        report.sent += 1
        report.sent_ids.append(alert.transaction_id)
        logger.info(
            "alert sent for transaction %s (account %s)",
            alert.transaction_id,
            mask_account(accounts[alert.transaction_id]),
        )
