"""Parsing and validation of raw messages, without Kafka."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from fraud_dagster.messages import RawBatch, parse_batch

GOOD = {
    "transaction_id": "t1",
    "account_id": "a1",
    "merchant": "m1",
    "transaction_amount": 12.5,
    "transaction_date": "2026-01-02T03:04:05Z",
}


def batch_of(*values: bytes | None) -> RawBatch:
    raw = RawBatch("topic", 0, 100, 100 + len(values) - 1)
    for i, value in enumerate(values):
        raw.offsets.append(100 + i)
        raw.timestamps_ms.append(1_700_000_000_000 + i)
        raw.values.append(value)
    return raw


def encode(obj: object) -> bytes:
    return json.dumps(obj).encode()


def test_a_message_without_a_broker_timestamp_stores_none_not_1969() -> None:
    raw = batch_of(encode(GOOD), encode({**GOOD, "transaction_id": "t2"}))
    raw.timestamps_ms[0] = -1  # what Kafka reports for a message with no timestamp
    parsed = parse_batch(raw)
    stamps = parsed.transactions["kafka_timestamp"].tolist()
    assert pd.isna(stamps[0])
    assert stamps[1] == pd.Timestamp(1_700_000_000_001, unit="ms")


def test_a_broker_timestamp_past_year_9999_stores_none_and_fails_nothing() -> None:
    raw = batch_of(encode(GOOD), encode({**GOOD, "transaction_id": "t2"}))
    raw.timestamps_ms[0] = 1_700_000_000_000_000  # microseconds sent as milliseconds
    raw.timestamps_ms[1] = 9_000_000_000_000_000_000
    parsed = parse_batch(raw)
    assert parsed.rejections == []
    assert parsed.transactions["kafka_timestamp"].isna().all()


def test_valid_message_becomes_a_typed_row() -> None:
    parsed = parse_batch(
        batch_of(encode({**GOOD, "transaction_amount": "12.50", "extra": {"x": 1}}))
    )
    assert parsed.rejections == []
    row = parsed.transactions.iloc[0]
    assert row["transaction_id"] == "t1"
    assert row["transaction_amount"] == 12.5
    assert str(row["transaction_date"]) == "2026-01-02 03:04:05"
    assert json.loads(row["extra_fields"]) == {"extra": {"x": 1}}
    assert (row["source_topic"], row["source_partition"], row["source_offset"]) == ("topic", 0, 100)


def test_integer_identifiers_and_offsets_are_normalised() -> None:
    message = {
        **GOOD,
        "transaction_id": 42,
        "account_id": 7,
        "merchant": 9,
        "transaction_date": "2026-01-02T05:04:05+02:00",
    }
    row = parse_batch(batch_of(encode(message))).transactions.iloc[0]
    assert (row["transaction_id"], row["account_id"], row["merchant"]) == ("42", "7", "9")
    assert str(row["transaction_date"]) == "2026-01-02 03:04:05"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"{not json", "malformed JSON"),
        (b"\xff\xfe{}", "invalid UTF-8"),
        (b"[1, 2]", "expected a JSON object, got array"),
        (b'"text"', "got string"),
        (b"3.5", "got number"),
        (b"null", "got null"),
        (None, "empty message"),
        (
            encode({k: v for k, v in GOOD.items() if k != "merchant"}),
            "missing required field 'merchant'",
        ),
        (encode({**GOOD, "account_id": None}), "'account_id' is null"),
        (encode({**GOOD, "account_id": ["a"]}), "'account_id' must be a string or an integer"),
        (encode({**GOOD, "transaction_amount": "abc"}), "not numeric"),
        (encode({**GOOD, "transaction_amount": True}), "got boolean"),
        (encode({**GOOD, "transaction_amount": -3}), "negative"),
        (
            b'{"transaction_id":"t","account_id":"a","merchant":"m","transaction_amount":NaN,'
            b'"transaction_date":"2026-01-01T00:00:00Z"}',
            "not standard JSON: NaN is not a JSON value",
        ),
        (
            b'{"transaction_id":"t","account_id":"a","merchant":"m","transaction_amount":1,'
            b'"x":-Infinity,"transaction_date":"2026-01-01T00:00:00Z"}',
            "-Infinity is not a JSON value",
        ),
        (
            b'{"transaction_id":"t","account_id":"a","merchant":"m","transaction_amount":'
            + b"9" * 5000
            + b',"transaction_date":"2026-01-01T00:00:00Z"}',
            "unreadable JSON number",
        ),
        (
            encode({**GOOD}).replace(b"}", b', "x": 1e999}'),
            "extra fields hold a number too large for a double",
        ),
        (encode({**GOOD, "transaction_amount": "Infinity"}), "not a finite number"),
        (encode({**GOOD, "transaction_amount": 1e12}), "exceeds the limit"),
        (encode({**GOOD, "transaction_date": "yesterday"}), "not a valid ISO 8601 date"),
        (encode({**GOOD, "transaction_date": "now"}), "not a valid ISO 8601 date"),
        (encode({**GOOD, "transaction_date": "today"}), "not a valid ISO 8601 date"),
        (encode({**GOOD, "transaction_date": "2026-01"}), "not a valid ISO 8601 date"),
        (encode({**GOOD, "transaction_date": "0001-01-01T00:00:00Z"}), "is outside 1990-01-01"),
        (encode({**GOOD, "transaction_date": "9999-12-31"}), "is outside 1990-01-01"),
        (encode({**GOOD, "transaction_date": "2026-02-30T00:00:00Z"}), "not a valid ISO 8601 date"),
        (encode({**GOOD, "transaction_date": "1900-01-01T00:00:00Z"}), "outside"),
        (encode({**GOOD, "transaction_date": "2999-01-01T00:00:00Z"}), "outside"),
        # ISO 8601 allows a decimal comma; pandas does not read it (the date is in range)
        (
            encode({**GOOD, "transaction_date": "2026-01-01T10:00:00,5Z"}),
            "a form of ISO 8601 this pipeline does not read",
        ),
        (encode({**GOOD, "transaction_date": 20260101}), "must be an ISO 8601 string"),
        (encode({**GOOD, "transaction_id": "a\nb"}), "control characters"),
        (encode({**GOOD, "transaction_id": ""}), "is empty"),
        (encode({**GOOD, "deep": json.loads("[" * 40 + "]" * 40)}), "nested deeper"),
        (b"[" * 20_000 + b"]" * 20_000, "nested deeper"),
        (b"[" * 100_000 + b"]" * 100_000, "exceeds the 65536-byte limit"),
        (encode({**GOOD, "blob": "x" * 70_000}), "exceeds the 65536-byte limit"),
    ],
)
def test_bad_messages_are_rejected_with_a_reason(value: bytes | None, reason: str) -> None:
    parsed = parse_batch(batch_of(value, encode({**GOOD, "transaction_id": "ok"})))
    assert parsed.transactions["transaction_id"].tolist() == ["ok"]
    (rejection,) = parsed.rejections
    assert reason in rejection.reason
    assert rejection.offset == 100
    assert rejection.raw_value == value


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


@pytest.mark.parametrize("depth", [18, 999, 5_000, 20_000])
@pytest.mark.parametrize(
    "shape",
    [
        "{deep}",
        '{{"transaction_id": {deep}, "account_id": "a", "merchant": "m"}}',
        '{{"transaction_id": "t", "account_id": "a", "merchant": "m", "transaction_amount": {deep},'
        ' "transaction_date": "2026-01-02"}}',
        '{{"transaction_id": "t", "account_id": "a", "merchant": "m", "transaction_amount": 1,'
        ' "transaction_date": "2026-01-02", "extra": {deep}}}',
    ],
    ids=["top-level", "identifier", "amount", "extra-field"],
)
def test_a_message_nested_too_deep_gets_the_same_reason_on_every_python(
    shape: str, depth: int
) -> None:
    """The JSON decoder gives up at ~1,000 levels on Python 3.11, ~10,000 on 3.13; the reason
    must not depend on which one runs the batch, nor on where the depth is."""
    value = shape.format(deep=nested(depth).decode()).encode()
    (rejection,) = parse_batch(batch_of(value)).rejections
    assert rejection.reason == "JSON nested deeper than 16 levels"


def test_an_array_within_the_depth_limit_is_refused_for_not_being_an_object() -> None:
    # 17 arrays, 16 of them holding another: 16 levels (an empty array adds none)
    (rejection,) = parse_batch(batch_of(nested(17))).rejections
    assert rejection.reason == "expected a JSON object, got array"


def test_duplicate_ids_in_a_batch_keep_the_first() -> None:
    parsed = parse_batch(batch_of(encode(GOOD), encode({**GOOD, "transaction_amount": 99})))
    assert parsed.transactions["transaction_amount"].tolist() == [12.5]
    (rejection,) = parsed.rejections
    assert rejection.offset == 101
    assert "first seen at offset 100" in rejection.reason
