"""Sending the outbox's due alerts over SMTP so that each one goes out once.

`deliver_alerts` claims the due alerts (one UPDATE: two senders never hold the same alert),
sends them over a few SMTP sessions side by side, and marks each one sent right behind the
server's acceptance, in small groups from the calling thread. Everything that can go wrong on
the way (a refused message, a broken session, the claim's time running out, the database
unreachable for the marks, the run interrupted by its operator) ends with each claimed alert
recorded as sent, failed with a backoff, or released for the next sender.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Collection
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError

from fraud_dagster.alerts import (
    AlertDelivery,
    MessageRefusedError,
    SmtpMailer,
    mask_account,
    render_alert,
)
from fraud_dagster.errors import AlertDeliveryError
from fraud_dagster.interrupts import later_interrupts_held
from fraud_dagster.pipeline import BatchRef
from fraud_dagster.storage.outbox import (
    SEND_WITHIN_CLAIM,
    AcceptedAlert,
    claim_alerts,
    mark_alerts_failed,
    mark_alerts_sent,
    release_alerts,
)

logger = logging.getLogger(__name__)

# Alerts the SMTP server accepted are marked sent right away; if the database is unreachable
# then (a restart, a failover), the marks are retried for this long before the delivery gives
# up. Unmarked, those alerts would be sent again by the next sender. No new email is started
# meanwhile.
MARK_SENT_PATIENCE = timedelta(seconds=30)
MARK_SENT_RETRY_DELAY_SECONDS = (0.5, 5.0)  # first delay, doubling up to the second


@dataclass
class DeliveryReport:
    """What one alert delivery attempt did."""

    claimed: int = 0
    sent: int = 0
    failed: int = 0
    error: str | None = None
    sent_ids: list[str] = field(default_factory=list)
    released: int = 0  # claimed, not tried (the claim's time was up, or interrupted): due again


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
    start: threading.Event,
    time_is_up: Callable[[], bool],
) -> _SessionOutcome:
    """Send `share` over one session, reporting each acceptance on `accepted` at once.

    Waits for `start` (set once every session is under way, or on an interrupt) before it
    connects. A message the server refuses while the session stays usable is noted against its
    alert only, and the session goes on; a broken session ends it, the rest left unsent, and so
    does any other error (the session's state is then unknown). Before each message
    `time_is_up()` is asked: once it says so, the rest is left untried (the delivery releases
    it). Stops early when `stop` is set (the marking thread cannot record what was sent, or
    the run was interrupted): the rest is left untried too."""
    outcome = _SessionOutcome()
    tried = 0
    try:
        start.wait()
        if stop.is_set() or time_is_up():
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
    except Exception as exc:
        logger.exception("alert delivery: unexpected error in an SMTP session")
        outcome.unsent = share[tried:]
        outcome.error = AlertDeliveryError(f"unexpected error in the SMTP session: {exc!r}")
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


@later_interrupts_held("recording the alert delivery")
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
    and the interrupt is raised again: also when that recording fails (logged, and the
    interrupt's cause), so that the run still ends canceled, as asked, and is not retried.
    A later interrupt is held until then (`later_interrupts_held`): it would cut the recording
    short, and the next sender would send the accepted emails again.

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
    shares = [claimed[i::sessions] for i in range(sessions)]
    outcomes: list[Future[_SessionOutcome]] = []
    start = threading.Event()  # no session sends before every one is under way
    with ThreadPoolExecutor(sessions, thread_name_prefix="smtp-session") as pool:
        try:
            for share in shares:
                outcomes.append(
                    pool.submit(
                        _send_share,
                        share,
                        delivery,
                        accepted,
                        stop,
                        start,
                        lambda: clock() >= deadline,
                    )
                )
            start.set()
            running = sessions
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
            start.set()
            interrupted = exc
    # Leaving the pool waited for every session to end the email it had started. A share whose
    # session was not submitted before an interrupt was not tried (nor was any share, if the
    # interrupt came before `start`: each session saw `stop` first).
    outcomes += [_not_tried(share) for share in shares[len(outcomes) :]]
    if isinstance(interrupted, OperationalError):
        raise interrupted  # the database is gone: nothing more can be recorded
    try:
        if interrupted is not None:
            _record_after_interrupt(
                interrupted, unrecorded, accepted, engine, token, accounts, report
            )
        untried_when = (
            "before the interrupt" if interrupted else f"within {send_within} of the claim"
        )
        _record_outcomes(outcomes, engine, token, accounts, report, delivery, untried_when)
    except Exception as exc:
        if interrupted is None:
            raise
        logger.error(
            "alert delivery interrupted, and recording its outcome failed (%s: %s): the emails "
            "accepted since the last mark stay claimed and not marked sent; the next sender "
            "takes the claims over once this run has ended and may send them again (same "
            "Message-ID)",
            type(exc).__name__,
            str(exc),
        )
        raise interrupted from exc
    if interrupted is not None:
        raise interrupted
    return report


def _not_tried(share: list[dict]) -> Future[_SessionOutcome]:
    """The outcome of a share no session took up: every alert untried."""
    future: Future[_SessionOutcome] = Future()
    future.set_result(_SessionOutcome(untried=share))
    return future


def _record_outcomes(
    outcomes: list[Future[_SessionOutcome]],
    engine: Engine,
    token: str,
    accounts: dict[str, str],
    report: DeliveryReport,
    delivery: AlertDelivery,
    untried_when: str,
) -> None:
    """Once every session has ended: mark failed the refused and the unsent (with their
    backoff), release the untried (not tried `untried_when`), and say so in `report`."""
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
            untried_when,
        )
    if errors:
        report.error = errors[0]
        logger.warning(
            "alert delivery: %d sent, %d left for a retry: %s",
            report.sent,
            report.failed,
            errors[0],
        )


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
