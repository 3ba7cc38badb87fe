"""Parsing and validation of transaction messages: raw Kafka bytes in, a typed DataFrame out.

A message is a UTF-8 JSON object with the fields of `REQUIRED_FIELDS`; other fields are kept
as-is in `extra_fields`. Every message that cannot be scored becomes a `Rejection` carrying its
raw bytes and a reason a person can act on, so nothing read from Kafka is ever dropped silently.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pandas as pd

REQUIRED_FIELDS = (
    "transaction_id",
    "account_id",
    "transaction_amount",
    "transaction_date",
    "merchant",
)
IDENTIFIER_FIELDS = ("transaction_id", "account_id", "merchant")
MAX_IDENTIFIER_LENGTH = {"transaction_id": 128, "account_id": 128, "merchant": 256}

# Columns of a parsed batch, in order.
TRANSACTION_COLUMNS = [
    "transaction_id",
    "account_id",
    "merchant",
    "transaction_amount",
    "transaction_date",
    "extra_fields",
    "source_topic",
    "source_partition",
    "source_offset",
    "kafka_timestamp",
    "raw_value",
]


@dataclass(frozen=True)
class ValidationLimits:
    """Bounds a message must respect; anything outside them is rejected with its reason."""

    max_message_bytes: int = 64 * 1024
    max_nesting_depth: int = 16
    max_amount: float = 1_000_000.0
    earliest_date: datetime = datetime(1990, 1, 1, tzinfo=UTC)
    max_clock_skew: timedelta = timedelta(days=1)


@dataclass
class RawBatch:
    """The messages of one offset range of one partition, exactly as the broker returned them."""

    topic: str
    partition: int
    first_offset: int
    last_offset: int
    offsets: list[int] = field(default_factory=list)
    timestamps_ms: list[int] = field(default_factory=list)
    values: list[bytes | None] = field(default_factory=list)
    # Offsets (first, last) at the start of the range that retention deleted before they were
    # read: never read, so neither scored nor rejected; recorded as lost by the batch's write.
    deleted_by_retention: tuple[int, int] | None = None
    # Where the partition's stored history starts, as the broker said when the range was read:
    # the consumer group's committed offset, else the partition's beginning (None: not asked).
    history_start: int | None = None

    def __len__(self) -> int:
        return len(self.offsets)


@dataclass(frozen=True)
class Rejection:
    """A message that will not be scored, with the reason and the bytes to look at."""

    topic: str
    partition: int
    offset: int
    raw_value: bytes | None
    reason: str
    transaction_id: str | None = None


@dataclass
class ParsedBatch:
    """Valid transactions (one row each, `TRANSACTION_COLUMNS`) and the rejected messages."""

    transactions: pd.DataFrame
    rejections: list[Rejection]


def _json_type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _nesting_depth(value: object, limit: int) -> int:
    """Depth of nested arrays/objects, counting stops once `limit` is exceeded."""
    depth = 0
    level = [value]
    while level and depth <= limit:
        children: list[object] = []
        for item in level:
            if isinstance(item, dict):
                children.extend(item.values())
            elif isinstance(item, list):
                children.extend(item)
        if not children:
            break
        depth += 1
        level = children
    return depth


_CONTROL_CHARACTER = re.compile("[\x00-\x1f\x7f]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _identifier(obj: dict, name: str) -> tuple[str | None, str | None]:
    """Return (value, error) for an identifier field: a non-empty string or an integer."""
    value = obj.get(name)
    if value is None:
        return None, f"missing required field '{name}'" if name not in obj else f"'{name}' is null"
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None, f"'{name}' must be a string or an integer, got {_json_type_name(value)}"
    text = str(value).strip()
    if not text:
        return None, f"'{name}' is empty"
    if len(text) > MAX_IDENTIFIER_LENGTH[name]:
        return None, f"'{name}' is longer than {MAX_IDENTIFIER_LENGTH[name]} characters"
    if _CONTROL_CHARACTER.search(text):
        return None, f"'{name}' contains control characters"
    if _SURROGATE.search(text):
        # A lone "\\ud800" escape is valid JSON but cannot be stored as UTF-8 text.
        return None, f"'{name}' contains an unpaired UTF-16 surrogate escape"
    return text, None


def _amount(obj: dict, limits: ValidationLimits) -> tuple[float | None, str | None]:
    if "transaction_amount" not in obj:
        return None, "missing required field 'transaction_amount'"
    value = obj["transaction_amount"]
    if value is None:
        return None, "'transaction_amount' is null"
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None, (
            "'transaction_amount' must be a number or a numeric string, "
            f"got {_json_type_name(value)}"
        )
    try:
        amount = float(value)
    except (ValueError, OverflowError):
        return None, f"'transaction_amount' is not numeric: {str(value)[:40]!r}"
    if math.isnan(amount) or math.isinf(amount):
        return None, f"'transaction_amount' is not a finite number: {str(value)[:40]!r}"
    if amount < 0:
        return None, f"'transaction_amount' is negative: {amount}"
    if amount > limits.max_amount:
        return (
            None,
            f"'transaction_amount' {amount:.2f} exceeds the limit of {limits.max_amount:.0f}",
        )
    return amount, None


class _NonStandardConstant(ValueError):
    """NaN, Infinity or -Infinity: Python's json reads them, JSON (RFC 8259) has no such values."""


def _refuse_constant(name: str) -> float:
    raise _NonStandardConstant(name)


# One decoder for every message (json.loads with arguments would build one per call).
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)

# What every ISO 8601 calendar date starts with (pandas' parser also takes words like "now").
_ISO_DATE_START = r"\d{4}-?\d{2}-?\d{2}(?:[T ]|$)"


def _too_deep(limits: ValidationLimits) -> str:
    """The reason for a message nested deeper than the limit, wherever the depth was found.

    How deep the JSON decoder recurses before it gives up depends on the Python version (about
    1,000 levels on 3.11, 1,500 on 3.12, 10,000 on 3.13), so a message it did decode is measured
    wherever it is refused: the same message gets the same reason on every interpreter."""
    return f"JSON nested deeper than {limits.max_nesting_depth} levels"


def _too_deep_or(obj: object, error: str, limits: ValidationLimits) -> str:
    """`error`, unless `obj` is nested too deep (measured only for refused messages)."""
    too_deep = _nesting_depth(obj, limits.max_nesting_depth) > limits.max_nesting_depth
    return _too_deep(limits) if too_deep else error


def _decode(value: bytes | None, limits: ValidationLimits) -> tuple[dict | None, str | None]:
    if value is None:
        return None, "empty message (null value)"
    if len(value) > limits.max_message_bytes:
        return (
            None,
            f"message of {len(value)} bytes exceeds the {limits.max_message_bytes}-byte limit",
        )
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, f"invalid UTF-8 at byte {exc.start}"
    try:
        obj = _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        return None, f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
    except _NonStandardConstant as exc:
        return None, f"not standard JSON: {exc.args[0]} is not a JSON value"
    except RecursionError:
        return None, _too_deep(limits)
    except ValueError as exc:  # an integer of more than 4,300 digits
        return None, f"unreadable JSON number: {str(exc)[:80]}"
    if not isinstance(obj, dict):
        return None, _too_deep_or(
            obj, f"expected a JSON object, got {_json_type_name(obj)}", limits
        )
    return obj, None


def parse_batch(raw: RawBatch, limits: ValidationLimits | None = None) -> ParsedBatch:
    """Validate every message of `raw`; keep the first of duplicate transaction ids.

    Field checks run per message (the JSON decode is per message anyway); date parsing runs once
    over the whole batch with pandas.
    """
    limits = limits or ValidationLimits()
    rejections: list[Rejection] = []
    rows: list[tuple] = []

    def reject(i: int, reason: str, transaction_id: str | None = None) -> None:
        rejections.append(
            Rejection(
                raw.topic, raw.partition, raw.offsets[i], raw.values[i], reason, transaction_id
            )
        )

    for i, value in enumerate(raw.values):
        obj, error = _decode(value, limits)
        if error:
            reject(i, error)
            continue
        assert obj is not None
        ids: dict[str, str] = {}
        for name in IDENTIFIER_FIELDS:
            text, error = _identifier(obj, name)
            if error:
                break
            ids[name] = text  # type: ignore[assignment]
        if error:
            reject(i, _too_deep_or(obj, error, limits), ids.get("transaction_id"))
            continue
        amount, error = _amount(obj, limits)
        if not error:
            date_value = obj.get("transaction_date")
            if date_value is None:
                error = (
                    "missing required field 'transaction_date'"
                    if "transaction_date" not in obj
                    else "'transaction_date' is null"
                )
            elif not isinstance(date_value, str):
                error = (
                    "'transaction_date' must be an ISO 8601 string, "
                    f"got {_json_type_name(date_value)}"
                )
        if error:
            reject(i, _too_deep_or(obj, error, limits), ids["transaction_id"])
            continue
        extras = {k: v for k, v in obj.items() if k not in REQUIRED_FIELDS}
        extra_json = None
        if extras:
            if _nesting_depth(extras, limits.max_nesting_depth) > limits.max_nesting_depth:
                reject(i, _too_deep(limits), ids["transaction_id"])
                continue
            try:
                # ASCII-escaped: any JSON string (NUL, lone surrogates) stores in any database.
                extra_json = json.dumps(extras, sort_keys=True, allow_nan=False)
            except ValueError:  # a number like 1e999, read as infinity
                reject(
                    i, "extra fields hold a number too large for a double", ids["transaction_id"]
                )
                continue
        rows.append(
            (
                ids["transaction_id"],
                ids["account_id"],
                ids["merchant"],
                amount,
                date_value,
                extra_json,
                raw.topic,
                raw.partition,
                raw.offsets[i],
                raw.timestamps_ms[i],
                value,
            )
        )

    frame = pd.DataFrame.from_records(rows, columns=TRANSACTION_COLUMNS)
    frame, date_rejections = _parse_dates(frame, limits)
    rejections.extend(date_rejections)
    frame, duplicate_rejections = _drop_duplicate_ids(frame)
    rejections.extend(duplicate_rejections)
    rejections.sort(key=lambda r: r.offset)
    return ParsedBatch(transactions=frame.reset_index(drop=True), rejections=rejections)


def naive_utc_dates(dates: pd.Series) -> pd.Series:
    """ISO 8601 dates of a file (training data, labels, a replayed CSV) read as scoring reads a
    message's date: with an offset converted to UTC, without one taken as UTC, then naive.
    Raises ValueError or TypeError on a date pandas cannot read."""
    return pd.to_datetime(dates, utc=True, format="ISO8601").dt.tz_convert(None)


def _parse_dates(
    frame: pd.DataFrame, limits: ValidationLimits
) -> tuple[pd.DataFrame, list[Rejection]]:
    """Parse ISO 8601 dates to naive UTC; reject unparseable, impossible or out-of-range ones."""
    if frame.empty:
        frame["transaction_date"] = pd.Series(dtype="datetime64[us]")
        frame["kafka_timestamp"] = pd.Series(dtype="datetime64[us]")
        return frame, []
    texts = frame["transaction_date"].astype(str)
    dated = texts.str.match(_ISO_DATE_START)
    parsed = pd.to_datetime(texts.where(dated), format="ISO8601", utc=True, errors="coerce")
    latest = pd.Timestamp(datetime.now(UTC) + limits.max_clock_skew)
    earliest = pd.Timestamp(limits.earliest_date)
    bad_format = parsed.isna()
    out_of_range = ~bad_format & ((parsed < earliest) | (parsed > latest))
    rejections = []
    for pos in frame.index[bad_format | out_of_range]:
        text = texts[pos][:40]
        outside = f"'transaction_date' {text!r} is outside {earliest.date()}..{latest.date()}"
        invalid = f"'transaction_date' is not a valid ISO 8601 date: {text!r}"
        if not dated[pos]:
            reason = invalid
        elif not bad_format[pos]:
            reason = outside
        elif (date := _python_date(texts[pos])) is None:
            reason = invalid
        elif earliest.year <= date.year <= latest.year:  # pandas could hold it: a form it lacks
            reason = (
                f"'transaction_date' {text!r} is a form of ISO 8601 this pipeline does not read; "
                "send e.g. 2026-11-29T10:15:00.5+01:00"
            )
        else:  # a real date pandas cannot hold (years 1-1677, 2262-9999)
            reason = outside
        rejections.append(_rejection_for_row(frame, pos, reason))
    keep = ~(bad_format | out_of_range)
    frame = frame.loc[keep].copy()
    frame["transaction_date"] = parsed[keep].dt.tz_convert(None).astype("datetime64[us]")
    # -1: the message carries no timestamp; past year 9999 (a producer's microseconds, say) it
    # is no date a database column holds. Neither is a reason to reject the message.
    timestamps = pd.to_numeric(frame["kafka_timestamp"], errors="coerce")
    usable = (timestamps >= 0) & (timestamps < _YEAR_10000_MS)
    frame["kafka_timestamp"] = pd.to_datetime(timestamps.where(usable), unit="ms").astype(
        "datetime64[us]"
    )
    return frame, rejections


_YEAR_10000_MS = 253_402_300_800_000  # 10000-01-01T00:00:00Z, in ms since the epoch


def _python_date(text: str) -> datetime | None:
    """`text` as Python's ISO 8601 reader reads it (None: no valid date), for the rejection
    reason of a date pandas could not read."""
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


def _drop_duplicate_ids(frame: pd.DataFrame) -> tuple[pd.DataFrame, list[Rejection]]:
    """Keep the first message of each transaction id within the batch, reject the rest."""
    duplicated = frame["transaction_id"].duplicated(keep="first")
    if not duplicated.any():
        return frame, []
    first_offset = frame.groupby("transaction_id")["source_offset"].min()
    rejections = [
        _rejection_for_row(
            frame,
            pos,
            "duplicate transaction_id, first seen at offset "
            f"{first_offset[frame.at[pos, 'transaction_id']]} of this batch",
        )
        for pos in frame.index[duplicated]
    ]
    return frame.loc[~duplicated], rejections


def _rejection_for_row(frame: pd.DataFrame, pos: int, reason: str) -> Rejection:
    return Rejection(
        topic=frame.at[pos, "source_topic"],
        partition=int(frame.at[pos, "source_partition"]),
        offset=int(frame.at[pos, "source_offset"]),
        raw_value=frame.at[pos, "raw_value"],
        reason=reason,
        transaction_id=frame.at[pos, "transaction_id"],
    )


def encode_transaction(transaction: dict) -> bytes:
    """The wire format of a transaction message (what producers send)."""
    return json.dumps(transaction, separators=(",", ":"), default=str).encode("utf-8")
