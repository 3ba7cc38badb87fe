"""Alert emails: rendering (pure) and delivery over one SMTP connection per batch.

Every header value that comes from a message is stripped of CR, LF and other control
characters, so a transaction field can never add or change an email header.
"""

from __future__ import annotations

import hashlib
import logging
import re
import smtplib
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.charset import QP, Charset
from email.header import Header
from email.message import Message
from email.utils import format_datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

from fraud_dagster.batching import TAG_FIRST_OFFSET, TAG_PARTITION
from fraud_dagster.errors import MISSING_TOPIC_WORDS, AlertDeliveryError, ConfigurationError
from fraud_dagster.features import DELAY_DAYS, WINDOWS_DAYS
from fraud_dagster.kafka_watch import KafkaNotice
from fraud_dagster.settings import SMTP_SECURITY_MODES

if TYPE_CHECKING:  # rendering needs only their fields; those modules read Kafka and the database
    from fraud_dagster.gap_watch import GapNotice
    from fraud_dagster.kafka_io import Retention
    from fraud_dagster.stream_status import Gap

logger = logging.getLogger(__name__)

_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f\u2028\u2029\x85]+")
MESSAGE_ID_DOMAIN = "fraud-dagster.local"
_UTF8_QUOTED_PRINTABLE = Charset("utf-8")
_UTF8_QUOTED_PRINTABLE.body_encoding = QP


def header_safe(value: object, max_length: int = 120) -> str:
    """`value` as one line of printable text, fit for an email header."""
    text = _CONTROL_CHARACTERS.sub(" ", str(value)).strip()
    return text if len(text) <= max_length else text[: max_length - 1] + "…"


# A bare address as SMTP carries it without extensions (RFC 5321 dot-atom @ host name): ASCII,
# no display name, no comment. smtplib cannot send to anything else through every server.
_EMAIL_ADDRESS = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
)
MAX_ADDRESS_LENGTH = 254


def email_address_problem(address: str) -> str | None:
    """Why `address` cannot be a sender or recipient of this project's emails, or None.

    Checked when the SMTP resource is configured: a non-ASCII address (smtplib needs the
    server's SMTPUTF8 and then fails on the email itself) or a display name would otherwise
    fail every alert at send time, night after night, instead of once where it was set."""
    if not address.isascii():
        return "has characters other than ASCII (internationalized addresses are not supported)"
    if len(address) > MAX_ADDRESS_LENGTH:
        return f"is longer than {MAX_ADDRESS_LENGTH} characters"
    if not _EMAIL_ADDRESS.fullmatch(address):
        return "is not a bare address like analysts@bank.example (no name, spaces or brackets)"
    return None


def checked_addresses(addresses: Sequence[str], what: str) -> tuple[str, ...]:
    """`addresses` if each one can be emailed (`email_address_problem`) and there is at least
    one; otherwise ConfigurationError naming `what` and every bad address."""
    problems = [
        f"{address!r} {problem}"
        for address in addresses
        if (problem := email_address_problem(address)) is not None
    ]
    if problems:
        raise ConfigurationError(f"{what}: {'; '.join(problems)}")
    if not addresses:
        raise ConfigurationError(f"{what}: no address given")
    return tuple(addresses)


def address_list(recipients: Sequence[str]) -> str:
    """The To header: every recipient, never cut short (smtplib takes the envelope's
    recipients from it; `_plain_text_email` folds a long one)."""
    return ", ".join(header_safe(address, MAX_ADDRESS_LENGTH) for address in recipients)


def alert_message_id(transaction_id: str) -> str:
    """Deterministic Message-ID: a resent alert carries the same id, so mail clients dedupe it."""
    digest = hashlib.sha256(transaction_id.encode("utf-8")).hexdigest()[:32]
    return f"<fraud-alert.{digest}@{MESSAGE_ID_DOMAIN}>"


def run_failure_message_id(run_id: str, outcome: str = "failed") -> str:
    """Deterministic Message-ID of a run's failure (or cancellation) email, so a resent one is
    deduped too (the run id without hyphens, and a prefix of 10 characters, keep the header on
    one line)."""
    prefix = {"failed": "failed-run", "canceled": "cancel-run"}[outcome]
    return f"<{prefix}.{header_safe(run_id.replace('-', ''), 64)}@{MESSAGE_ID_DOMAIN}>"


def mask_account(account_id: str) -> str:
    """Account id for logs: only the last four characters stay readable."""
    text = str(account_id)
    return "*" * max(len(text) - 4, 0) + text[-4:] if len(text) > 4 else "*" * len(text)


def _header_value(value: str) -> str | Header:
    return value if value.isascii() else Header(value, "utf-8")


def _plain_text_email(headers: Sequence[tuple[str, str]], body: str) -> Message:
    """A text/plain UTF-8 email. Built on the compat32 `Message`, which stores header values as
    given instead of parsing each one (an alert costs a tenth of an `EmailMessage`); every value
    passed here is already a single line (`header_safe`), non-ASCII ones are RFC 2047-encoded."""
    message = Message()
    for name, value in headers:
        message[name] = _header_value(value)
    message["MIME-Version"] = "1.0"
    message.set_payload(body, _UTF8_QUOTED_PRINTABLE)
    return message


def _per_window(features: Mapping[str, Any], pattern: str) -> list[float] | None:
    """The values of `pattern` (e.g. "account_tx_count_{}d") for each window, if all are known."""
    values = [features.get(pattern.format(days)) for days in WINDOWS_DAYS]
    return None if any(v is None for v in values) else [float(v) for v in values]


def feature_lines(features: Mapping[str, Any] | None, history_complete: bool | None) -> list[str]:
    """What the model saw for a transaction, as a small table (empty if not recorded).

    The model's inputs, not an explanation of its score: they show what stands out (an amount
    far above the account's usual one, a burst of transactions, a merchant with recent frauds).
    """
    if not features:
        return []
    label_width, column_width = 28, 9

    def row(label: str, values: list[str], note: str = "") -> str:
        cells = "".join(value.rjust(column_width) for value in values)
        return f"  {label.ljust(label_width)}{cells}{'   ' + note if note else ''}".rstrip()

    rows = []
    merchant_shown = False
    for label, pattern, shown, note in (
        ("Account transactions", "account_tx_count_{}d", "{:,.0f}", "(this one included)"),
        ("Account mean amount", "account_mean_amount_{}d", "{:,.2f}", ""),
        ("Merchant transactions", "merchant_tx_count_{}d", "{:,.0f}", ""),
        ("Merchant confirmed fraud", "merchant_risk_{}d", "{:.1%}", ""),
    ):
        values = _per_window(features, pattern)
        if values is not None:
            rows.append(row(label, [shown.format(v) for v in values], note))
            merchant_shown = merchant_shown or pattern.startswith("merchant")
    if merchant_shown:
        rows.append(
            f"  (merchant windows end {DELAY_DAYS} days before the transaction: frauds are "
            "confirmed late)"
        )
    lines = ["What the model saw (its inputs):"]
    if rows:
        header = [f"{days} day{'s' if days > 1 else ''}" for days in WINDOWS_DAYS]
        lines += [row("", header), *rows]
    remarks = []
    amount = features.get("transaction_amount")
    means = _per_window(features, "account_mean_amount_{}d")
    if amount is not None and means is not None and means[-1] > 0:
        remarks.append(
            f"This amount is {float(amount) / means[-1]:,.1f} x the account's "
            f"{WINDOWS_DAYS[-1]}-day mean."
        )
    when = [
        text
        for name, text in (("during_night", "At night"), ("during_weekend", "on a weekend"))
        if features.get(name)
    ]
    if when:
        remarks.append(", ".join(when).capitalize() + ".")
    if remarks:
        lines.append("  " + " ".join(remarks))
    if history_complete is False:
        lines += [
            "  History INCOMPLETE: an earlier batch of this partition was not stored when this",
            "  was scored, so the account and merchant figures may be too low.",
        ]
    return lines if len(lines) > 1 else []


def render_alert(alert: Mapping[str, Any], sender: str, recipients: Sequence[str]) -> Message:
    """The email a risk analyst receives for one suspicious transaction."""
    transaction_id = str(alert["transaction_id"])
    amount = float(alert["transaction_amount"])
    probability = float(alert["fraud_probability"])
    subject = header_safe(
        f"[fraud alert] {probability:.0%} - {amount:,.2f} at {header_safe(alert['merchant'], 40)}"
        f" - transaction {header_safe(transaction_id, 40)}",
        max_length=160,
    )
    date = alert["transaction_date"]
    date_text = date.isoformat(sep=" ") if isinstance(date, datetime) else str(date)
    lines = [
        "A card transaction was scored as suspicious.",
        "",
        f"Transaction id:    {transaction_id}",
        f"Account id:        {alert['account_id']}",
        f"Merchant:          {alert['merchant']}",
        f"Amount:            {amount:,.2f}",
        f"Transaction date:  {date_text} UTC",
        f"Fraud probability: {probability:.4f} (threshold {float(alert['threshold']):.4f})",
        f"Model version:     {alert['model_version']}",
        "",
    ]
    context = feature_lines(alert.get("features"), alert.get("history_complete"))
    if context:
        lines += [*context, ""]
    lines += [
        "Record the outcome once it is confirmed, so merchant risk learns from it:",
        f"  fraud-dagster label {transaction_id} --fraud     (or --genuine)",
    ]
    return _plain_text_email(
        [
            ("From", header_safe(sender, 254)),
            ("To", address_list(recipients)),
            ("Subject", subject),
            ("Message-ID", alert_message_id(transaction_id)),
            ("Date", format_datetime(datetime.now(UTC))),
            ("X-Fraud-Transaction-Id", header_safe(transaction_id, 128)),
            ("X-Fraud-Probability", f"{probability:.6f}"),
        ],
        "\n".join(lines) + "\n",
    )


@dataclass(frozen=True)
class RunFailureNotice:
    """What operators need to act on a failed (or canceled) run: which run, which offsets, what
    went wrong."""

    run_id: str
    job_name: str
    offset_range: str | None
    errors: tuple[str, ...]
    retry_note: str
    run_url: str | None = None  # the run's page in the Dagster UI
    outcome: Literal["failed", "canceled"] = "failed"
    advice: str | None = None  # what to do, when not the outcome's usual advice


# Per outcome: (how the email says it, heading of the errors, what to do).
_RUN_OUTCOMES = {
    "failed": (
        "failed",
        "Error:",
        "Fix the cause, then re-execute the run from the Dagster UI (the run's page > "
        "Re-execute > From failure); see docs/operations.md.",
    ),
    "canceled": (
        "was canceled",
        "What happened:",
        "Unless it had finished its persist step, its offsets are not stored: the consumer "
        "group stays behind them, later batches are scored without them in their history, and "
        "the topic's retention will delete them. Re-execute it from the Dagster UI (the run's "
        "page > Re-execute > From failure) unless it was canceled on purpose; a rerun never "
        "stores or sends anything twice. See docs/operations.md.",
    ),
}


def render_run_failure(notice: RunFailureNotice, sender: str, recipients: Sequence[str]) -> Message:
    """The email the operators (not the analysts) receive when a run fails or is canceled."""
    said, heading, usual_advice = _RUN_OUTCOMES[notice.outcome]
    advice = notice.advice or usual_advice
    what = f" ({notice.offset_range})" if notice.offset_range else ""
    lines = [
        f"A {notice.job_name} run {said}.",
        "",
        f"Run id:        {notice.run_id}",
        f"Job:           {notice.job_name}",
        f"Offset range:  {notice.offset_range or '-'}",
        f"Retry:         {notice.retry_note}",
        f"In the UI:     {notice.run_url or '-'}",
        "",
        heading,
        *(f"  {line}" for error in notice.errors for line in error.splitlines()),
        "",
        advice,
    ]
    if notice.offset_range:
        lines.append("Every offset range no batch has stored yet: `fraud-dagster status`.")
    return _plain_text_email(
        [
            ("From", header_safe(sender, 254)),
            ("To", address_list(recipients)),
            (
                "Subject",
                header_safe(
                    f"[fraud-dagster] run {said}: {notice.job_name}{what} "
                    f"- run {notice.run_id[:8]}",
                    max_length=160,
                ),
            ),
            ("Message-ID", run_failure_message_id(notice.run_id, notice.outcome)),
            ("Date", format_datetime(datetime.now(UTC))),
            ("X-Fraud-Run-Id", header_safe(notice.run_id, 64)),
        ],
        "\n".join(lines) + "\n",
    )


def render_kafka_notice(
    notice: KafkaNotice, topic: str, servers: str, sender: str, recipients: Sequence[str]
) -> Message:
    """The operators' email when the transaction topic has been unreadable for a while, and the
    one when it is readable again."""
    since = datetime.fromtimestamp(notice.down_since, UTC)
    minutes = max(round((notice.observed_at - notice.down_since) / 60), 1)
    where = f"The transaction topic {topic} on {servers}"
    if notice.kind == "down" and MISSING_TOPIC_WORDS in (notice.error or ""):
        subject = f"Topic {topic} missing since {since:%H:%M} UTC: no transactions are being scored"
        lines = [
            f"{where} does not exist since {since:%Y-%m-%d %H:%M:%S} UTC ({minutes} min): the",
            "broker answers, but the topic was deleted (or not created yet). No batch run is",
            "launched while this lasts. If it was deleted, its messages that no batch had",
            "stored went with it (`fraud-dagster status` lists what was unstored); once it is",
            "created again, the sensor reads it from its beginning.",
            "",
            "Last error:",
            *(f"  {line}" for line in (notice.error or "-").splitlines()),
            "",
            'What to do: docs/operations.md, "When the topic is deleted and created again".',
            "A second email says when the topic is readable again.",
        ]
    elif notice.kind == "down":
        subject = f"Kafka unreachable since {since:%H:%M} UTC: no transactions are being scored"
        lines = [
            f"{where} cannot be read since {since:%Y-%m-%d %H:%M:%S} UTC ({minutes} min).",
            "No batch run is launched while this lasts. Nothing is lost: the sensor resumes",
            "from the last offsets it launched when the broker is back.",
            "",
            "Last error:",
            *(f"  {line}" for line in (notice.error or "-").splitlines()),
            "",
            'What to do: docs/operations.md, "When the broker is down". A second email says',
            "when the topic is readable again.",
        ]
    else:
        until = datetime.fromtimestamp(notice.observed_at, UTC)
        subject = f"Kafka reachable again after {minutes} min (unreachable since {since:%H:%M} UTC)"
        lines = [
            f"{where} was unreadable from {since:%Y-%m-%d %H:%M:%S} to {until:%H:%M:%S} UTC",
            f"({minutes} min) and can be read again. The sensor resumes from where it stopped;",
            "the backlog is scored by the next runs (Dagster UI, Runs).",
        ]
    return _plain_text_email(
        [
            ("From", header_safe(sender, 254)),
            ("To", address_list(recipients)),
            ("Subject", header_safe(f"[fraud-dagster] {subject}", max_length=160)),
            ("Message-ID", f"<kafka-{notice.kind}.{int(notice.down_since)}@{MESSAGE_ID_DOMAIN}>"),
            ("Date", format_datetime(datetime.now(UTC))),
            ("X-Fraud-Kafka-Notice", notice.kind),
        ],
        "\n".join(lines) + "\n",
    )


_GAP_NOTICE_SAYS = {
    "unstored": "not stored",
    "last_call": "LAST CALL, retention may delete it soon",
    "deleted": "deleted by retention unread",
}


def _bytes_words(count: int) -> str:
    """A size on disk for people: 512 B, 40.2 KiB, 9.8 MiB, 1.5 GiB."""
    if count < 1024:
        return f"{count} B"
    value = float(count)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024 or unit == "GiB":
            break
    return f"{value:,.1f} {unit}"


def size_limit_words(retention: Retention, partition: int) -> str | None:
    """What the topic's `retention.bytes` means for an unstored range of `partition`: retention
    deletes the partition's oldest segments once it outgrows the limit, however young they
    are (so possibly before the age deadline). None when the topic sets no size limit."""
    if not retention.limits_size:
        return None
    share = retention.share_of_size_limit(partition)  # None: the broker did not say the size
    now = (
        "its size unknown"
        if share is None
        else f"{_bytes_words(retention.sizes[partition])} now, {share:.0%} of it"
    )
    rate = retention.fill_rates.get(partition)
    if rate:
        now += f", growing by about {_bytes_words(round(rate * 3600))} an hour"
    return (
        f"retention.bytes limits the partition to {_bytes_words(retention.max_bytes or 0)} "
        f"({now}): past that, retention deletes its oldest segments whatever their age"
    )


def size_deadline_words(deadline: datetime) -> str:
    """When retention.bytes may delete an unstored range (`Gap.size_deadline`), if its
    partition goes on growing at the rate `size_limit_words` gives."""
    return (
        f"at that rate, retention.bytes may delete this range from {deadline:%Y-%m-%d %H:%M} UTC on"
    )


def run_page_url(ui_url: str | None, run_id: str) -> str | None:
    """The run's page in the Dagster UI at `ui_url` (None: no UI address to link to)."""
    return f"{ui_url.rstrip('/')}/runs/{run_id}" if ui_url else None


def find_runs_hint(partition: int, first_offset: int) -> str:
    """Where the Dagster UI lists the runs of the batch starting at `first_offset`."""
    return f"Runs -> filter tags {TAG_PARTITION}={partition}, {TAG_FIRST_OFFSET}={first_offset}"


# A batch whose newest run is in one of these is on its way: nothing to rerun (yet).
_UNDER_WAY = {"QUEUED", "NOT_STARTED", "STARTING", "STARTED", "CANCELING"}
_ENDED_UNSTORED = {"FAILURE", "CANCELED"}
# A run that succeeded stored its range in the database it wrote to; if the range is unstored
# here, that is another database now (replaced, or restored from an older backup). Re-executing
# every step reads the offsets again and stores them (and alerts them again: this database has
# no record of their emails).
_SUCCEEDED_ELSEWHERE = (
    "it succeeded, yet this database has no record of its offsets (a replaced or restored "
    "database?): re-execute it, all steps"
)


def batch_run_lines(gap: Gap, partition: int, ui_url: str | None) -> list[str]:
    """Per batch of `gap` found in Dagster (`range_runs`): its newest run, how it stands and
    what to do; then where to look for the rest of the range, if the batches found stop short."""
    lines = []
    for batch in gap.batches:
        todo = (
            "under way"
            if batch.status in _UNDER_WAY
            else "re-execute it from failure"
            if batch.status in _ENDED_UNSTORED
            else _SUCCEEDED_ELSEWHERE
            if batch.status == "SUCCESS"
            else "look at it"
        )
        link = run_page_url(ui_url, batch.run_id)
        lines.append(
            f"batch {batch.first}-{batch.last}: run {batch.run_id} {batch.status} "
            f"({batch.runs} run(s) of it in all): {todo}" + (f", {link}" if link else "")
        )
    rest = gap.batches[-1].last + 1 if gap.batches else gap.last + 1
    if rest <= gap.last:
        lines.append(f"offsets {rest}-{gap.last}: their runs: {find_runs_hint(partition, rest)}")
    return lines


def render_unstored_notice(
    notices: Sequence[GapNotice],
    topic: str,
    retention: Retention,
    sender: str,
    recipients: Sequence[str],
    ui_url: str | None = None,
) -> Message:
    """The operators' email about offset ranges no batch has stored for a while (`gap_watch`):
    one email per sensor tick, every range it is due for, with each range's batch runs where
    Dagster had them (`range_runs`), linked to the UI at `ui_url`."""
    lines = [
        f"Offsets of {topic} that no batch has stored. Retention deletes them unread (lost for",
        "good: never scored, never alerted) unless their batch run is re-executed before.",
        "",
    ]
    for notice in notices:
        gap = notice.gap
        lines.append(
            f"Partition {notice.partition}, offsets {gap.first}-{gap.last} ({gap.size}): "
            f"{_GAP_NOTICE_SAYS[notice.kind]}"
        )
        if gap.produced_at is not None:
            lines.append(f"  oldest message produced {gap.produced_at:%Y-%m-%d %H:%M} UTC")
        if gap.deletable_from is not None:
            lines.append(f"  retention may delete it from {gap.deletable_from:%Y-%m-%d %H:%M} UTC")
        size_limit = size_limit_words(retention, notice.partition)
        if size_limit and gap.deleted < gap.size:
            lines.append(f"  {size_limit}")
        if gap.size_deadline is not None and gap.deleted < gap.size:
            lines.append(f"  {size_deadline_words(gap.size_deadline)}")
        if gap.deleted:
            lines.append(f"  {gap.deleted} offset(s) already deleted by retention")
        if gap.batches:
            lines += [f"  {line}" for line in batch_run_lines(gap, notice.partition, ui_url)]
        else:
            lines.append(f"  its run: Dagster UI, {find_runs_hint(notice.partition, gap.first)}")
    settings = [
        f"{key} is {value}"
        for key, value in (("retention.ms", retention.ms), ("retention.bytes", retention.max_bytes))
        if value is not None
    ]
    if settings:
        lines += ["", f"The topic's {' and '.join(settings)}."]
    lines += [
        "",
        "What to do: re-execute the batch run from failure (the run's page > Re-execute > From",
        "failure); a rerun never stores or sends anything twice, and a range retention already",
        "deleted is then recorded as lost. Every range still unstored: `fraud-dagster status`.",
        'See docs/operations.md, "Where the stream stands".',
    ]
    first = notices[0]
    # The most urgent kind in the email, wherever it stands among the ranges.
    urgency = ("unstored", "last_call", "deleted")
    worst = max((n.kind for n in notices), key=urgency.index)
    subject = (
        f"{len(notices)} offset range(s) of {topic} not stored"
        + (": retention deleted one" if worst == "deleted" else "")
        + (": last call before retention" if worst == "last_call" else "")
        + f" (partition {first.partition} offsets {first.gap.first}-{first.gap.last}"
        + (", ..." if len(notices) > 1 else "")
        + ")"
    )
    keys = ",".join(sorted(notice.key for notice in notices))
    digest = hashlib.sha256(f"{topic}|{keys}".encode()).hexdigest()[:32]
    return _plain_text_email(
        [
            ("From", header_safe(sender, 254)),
            ("To", address_list(recipients)),
            ("Subject", header_safe(f"[fraud-dagster] {subject}", max_length=160)),
            ("Message-ID", f"<unstored.{digest}@{MESSAGE_ID_DOMAIN}>"),
            ("Date", format_datetime(datetime.now(UTC))),
            ("X-Fraud-Unstored-Notice", header_safe(keys, 500)),
        ],
        "\n".join(lines) + "\n",
    )


@dataclass(frozen=True)
class SmtpSettings:
    host: str
    port: int
    security: str = "none"
    username: str | None = None
    password: str | None = None
    timeout_seconds: float = 10.0
    verify_certificate: bool = True

    def __post_init__(self) -> None:
        if self.security not in SMTP_SECURITY_MODES:
            raise ConfigurationError(
                f"SMTP security {self.security!r} is not one of {', '.join(SMTP_SECURITY_MODES)}"
            )
        if self.password and not self.username:
            raise ConfigurationError("an SMTP password is set without a username; set both")
        # smtplib's AUTH sends both as ASCII; the error would show a character of the password.
        if not (self.username or "").isascii() or not (self.password or "").isascii():
            raise ConfigurationError(
                "the SMTP username or password has characters other than ASCII, which SMTP "
                "AUTH cannot carry here; use an ASCII password"
            )

    def __repr__(self) -> str:  # never show the password
        return (
            f"SmtpSettings(host={self.host!r}, port={self.port}, security={self.security!r}, "
            f"username={self.username!r})"
        )


@dataclass(frozen=True)
class AlertDelivery:
    """Everything that says how alert emails go out: the server, the addresses, how many
    sessions a delivery may open at once and the backoff after a failed one."""

    smtp: SmtpSettings
    sender: str
    recipients: tuple[str, ...]
    max_sessions: int = 1
    retry_base_seconds: float = 30.0
    retry_max_seconds: float = 3600.0

    def __post_init__(self) -> None:
        if self.max_sessions < 1:
            raise ConfigurationError(
                f"max SMTP sessions must be at least 1, not {self.max_sessions}"
            )


class MessageRefusedError(AlertDeliveryError):
    """The SMTP server refused this one message (MAIL, RCPT or DATA answered with an error, or a
    feature it needs is missing) and the session is still usable for the next message.
    `permanent`: every reply was a 5xx (sending the same message again will not help), not a
    4xx (try later: greylisting, a full mailbox)."""

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


def _refusal_codes(error: smtplib.SMTPException) -> list[int]:
    """The reply codes of a refusal: per recipient, or the one reply (none: no feature)."""
    if isinstance(error, smtplib.SMTPRecipientsRefused):
        return [code for code, _ in error.recipients.values()]
    code = getattr(error, "smtp_code", None)
    return [code] if isinstance(code, int) else []


# What smtplib raises for a refusal of one message; it resets the mail transaction (RSET)
# afterwards, except on a 421 reply, where it closes the connection.
_MESSAGE_REFUSALS = (
    smtplib.SMTPRecipientsRefused,
    smtplib.SMTPSenderRefused,
    smtplib.SMTPDataError,
    smtplib.SMTPNotSupportedError,
)


class SmtpMailer:
    """One SMTP session: connect (TLS, login) once, send many messages, quit."""

    def __init__(self, settings: SmtpSettings) -> None:
        self.settings = settings
        self._client: smtplib.SMTP | None = None

    def _tls_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        if not self.settings.verify_certificate:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    def __enter__(self) -> SmtpMailer:
        s = self.settings
        try:
            if s.security == "ssl":
                client: smtplib.SMTP = smtplib.SMTP_SSL(
                    s.host, s.port, timeout=s.timeout_seconds, context=self._tls_context()
                )
            else:
                client = smtplib.SMTP(s.host, s.port, timeout=s.timeout_seconds)
                if s.security == "starttls":
                    client.starttls(context=self._tls_context())
            if s.username:
                client.login(s.username, s.password or "")
        except (OSError, smtplib.SMTPException) as exc:
            raise AlertDeliveryError(
                f"cannot open an SMTP session with {s.host}:{s.port} ({s.security}): {exc!r}"
            ) from exc
        self._client = client
        return self

    def send(self, message: Message) -> list[str]:
        """Hand `message` to the server; return the recipients it refused.

        The server accepted the message when this returns, even with some recipients refused
        (resending it would duplicate it for the others). If the server refuses this message
        (every recipient refused, MAIL or DATA refused) and the session is still usable (it
        answers RSET), `MessageRefusedError` is raised: the next message may be sent. If the
        session breaks, `AlertDeliveryError` is raised. Either way nothing was accepted.
        """
        client = self._client
        assert client is not None, "use SmtpMailer as a context manager"
        try:
            refused = client.send_message(message)
        except _MESSAGE_REFUSALS as exc:
            if self._session_usable(client):
                codes = _refusal_codes(exc)
                raise MessageRefusedError(
                    f"SMTP server refused the message: {exc!r}",
                    permanent=all(500 <= code < 600 for code in codes),
                ) from exc
            raise AlertDeliveryError(
                f"SMTP server refused the message and ended the session: {exc!r}"
            ) from exc
        except (OSError, smtplib.SMTPException) as exc:
            raise AlertDeliveryError(f"SMTP server refused the message: {exc!r}") from exc
        if refused:
            logger.warning(
                "SMTP server accepted %s but refused recipients %s",
                message["Message-ID"],
                sorted(refused),
            )
        return sorted(refused)

    @staticmethod
    def _session_usable(client: smtplib.SMTP) -> bool:
        """Whether the session can carry another message after a refusal: still connected and
        RSET accepted (also clears what is left of the refused mail transaction)."""
        if client.sock is None:  # smtplib closed it (a 421 reply)
            return False
        try:
            code, _ = client.rset()
        except (OSError, smtplib.SMTPException):
            return False
        return code == 250

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._client is not None:
            try:
                self._client.quit()
            except (OSError, smtplib.SMTPException):
                self._client.close()
            self._client = None
