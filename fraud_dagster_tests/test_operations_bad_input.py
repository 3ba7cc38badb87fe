"""Bad input through the real broker, batch runs and database: stored with its reason, never
dropped, never blocking the stream, and the rest of each batch scored."""

from __future__ import annotations

import json

import dagster as dg
import pytest

from fraud_dagster.definitions import build_definitions
from fraud_dagster.settings import Settings, load_settings
from fraud_dagster.storage import schema
from fraud_dagster_tests.helpers import evaluate_sensor, execute_requests, produce_raw, table_rows
from fraud_dagster_tests.operations_support import accounting, materializations

pytestmark = pytest.mark.services

GOOD = {
    "transaction_id": "good-0",
    "account_id": "A-1",
    "merchant": "M-1",
    "transaction_amount": 25.0,
    "transaction_date": "2026-01-02T03:04:05Z",
}


def message(**changes: object) -> bytes:
    body = {**GOOD, **changes}
    return json.dumps({k: v for k, v in body.items() if v is not ...}).encode()


def good(i: int, **changes: object) -> bytes:
    return message(transaction_id=f"good-{i}", account_id=f"A-{i % 7}", **changes)


# (raw value, words the stored reason must contain)
BAD: list[tuple[bytes | None, str]] = [
    (b'{"transaction_id": "x", ', "malformed JSON"),
    (b'{"transaction_id": "\xff\xfe", "account_id": "a"}', "invalid UTF-8"),
    (b"[1, 2, 3]", "expected a JSON object, got array"),
    (b'"a string"', "expected a JSON object, got string"),
    (b"42", "expected a JSON object, got number"),
    (b"null", "expected a JSON object, got null"),
    (None, "empty message"),
    (message(transaction_id="m1", account_id=...), "missing required field 'account_id'"),
    (message(transaction_id="m2", merchant=None), "'merchant' is null"),
    (message(transaction_id="m3", transaction_date=...), "missing required field"),
    (message(transaction_id="w1", transaction_amount={"v": 1}), "must be a number"),
    (message(transaction_id=True), "must be a string or an integer"),
    (message(transaction_id="w2", transaction_date=20260102), "must be an ISO 8601 string"),
    (message(transaction_id="n1", transaction_amount=-5), "negative"),
    (
        b'{"transaction_id": "n2", "account_id": "a", "merchant": "m", "transaction_amount": NaN,'
        b' "transaction_date": "2026-01-02T00:00:00Z"}',
        "not standard JSON: NaN",
    ),
    (
        b'{"transaction_id": "n5", "account_id": "a", "merchant": "m", "transaction_amount": '
        + b"9" * 5000
        + b', "transaction_date": "2026-01-02T00:00:00Z"}',
        "unreadable JSON number",
    ),
    (message(transaction_id="n3", transaction_amount="Infinity"), "not a finite number"),
    (message(transaction_id="n4", transaction_amount=1e300), "exceeds the limit"),
    (message(transaction_id="d1", transaction_date="yesterday"), "not a valid ISO 8601 date"),
    (message(transaction_id="d4", transaction_date="now"), "not a valid ISO 8601 date"),
    (message(transaction_id="d2", transaction_date="2026-02-30T00:00:00Z"), "not a valid"),
    (message(transaction_id="d3", transaction_date="2999-01-01T00:00:00Z"), "is outside"),
    (message(transaction_id="c1", account_id="A\r\nBcc: x@evil"), "control characters"),
    (
        b'{"transaction_id": "s1", "account_id": "a", "merchant": "\\ud800", "transaction_amount":'
        b' 1, "transaction_date": "2026-01-02T00:00:00Z"}',
        "unpaired UTF-16 surrogate",
    ),
    (message(transaction_id="big", padding="x" * 70_000), "exceeds the 65536-byte limit"),
    (b"[" * 5000 + b"]" * 5000, "nested deeper"),
    (message(transaction_id="deep", extra=json.loads("[" * 20 + "]" * 20)), "nested deeper"),
]


def test_every_bad_message_is_stored_with_its_reason_and_the_rest_is_scored(
    settings: Settings,
    instance: dg.DagsterInstance,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FRAUD_MAX_BATCH_SIZE", "12")
    settings = load_settings()
    defs = build_definitions(settings)
    extras = {"channel": "web", "nested": {"ok": [1, 2]}, "note": "caf\u00e9 \u0000 \\ud800"}
    entries: list[tuple[bytes | None, str | None]] = [
        *BAD[:12],  # a whole batch of garbage comes first: offsets 0..11
        (good(0), None),
        (good(1), None),
        (good(1), "duplicate transaction_id, first seen at offset 13 of this batch"),
        (good(2), None),
        (good(3), None),
        *BAD[12:],
        (good(4), None),
        (good(5), None),
        (good(6, **extras), None),  # unknown fields are kept
        (good(7, note="\ud800"), None),  # even a lone surrogate in one: kept, escaped
        (good(3), "duplicate transaction_id, first stored from"),  # across batches
    ]
    values = [value for value, _ in entries]
    produce_raw(settings, values)

    tick = evaluate_sensor(defs, settings, instance, cursor=None)
    results = execute_requests(defs, instance, tick)

    assert len(results) == -(-len(values) // 12)
    assert all(result.success for result in results), "a bad message must never fail a batch"
    assert accounting(database_url, settings.kafka_topic) == {
        (0, offset): 1 for offset in range(len(values))
    }
    rejected = {
        row["source_offset"]: row for row in table_rows(database_url, schema.rejected_transactions)
    }
    expected_reasons = {i: reason for i, (_, reason) in enumerate(entries) if reason}
    assert set(rejected) == set(expected_reasons)
    for offset, reason in expected_reasons.items():
        assert reason in rejected[offset]["reason"], (offset, rejected[offset]["reason"])
        assert rejected[offset]["raw_value"] == values[offset]
        assert rejected[offset]["source_topic"] == settings.kafka_topic
    scored = {
        row["transaction_id"]: row for row in table_rows(database_url, schema.scored_transactions)
    }
    assert set(scored) == {f"good-{i}" for i in range(8)}
    assert json.loads(scored["good-6"]["extra_fields"]) == extras
    assert json.loads(scored["good-7"]["extra_fields"]) == {"note": "\ud800"}

    totals = {"read": 0, "rejected": 0, "scored": 0}
    for result in results:
        (meta,) = materializations(instance, result.run_id, "scored_transactions")
        assert meta["read"] == meta["last_offset"] - meta["first_offset"] + 1
        assert meta["read"] == meta["rejected"] + meta["scored"]
        for key in totals:
            totals[key] += meta[key]
        (alert_meta,) = materializations(instance, result.run_id, "fraud_alerts")
        assert alert_meta["alerted"] == meta["suspicious"]
    assert totals == {"read": len(values), "rejected": len(rejected), "scored": len(scored)}
    (first,) = materializations(instance, results[0].run_id, "scored_transactions")
    assert (first["read"], first["rejected"], first["scored"]) == (12, 12, 0)
