"""End to end through the real broker, SMTP server, database and a real Dagster instance."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from fraud_dagster.definitions import build_definitions
from fraud_dagster.features import compute_features
from fraud_dagster.model import load_verified, read_manifest
from fraud_dagster.producer import synthetic_transactions
from fraud_dagster.settings import Settings
from fraud_dagster.simulator import to_messages
from fraud_dagster.storage import schema
from fraud_dagster_tests.helpers import (
    evaluate_sensor,
    execute_requests,
    produce,
    suspicious_ids,
    table_rows,
)

pytestmark = pytest.mark.services


def known_transactions() -> tuple[list[dict], set[str], set[str]]:
    """Simulated traffic plus transactions that any sane model must flag, or must not flag."""
    frame = synthetic_transactions(120, seed=11)
    messages = to_messages(frame)
    last = pd.Timestamp(frame["transaction_date"].max())
    obvious_frauds = set()
    for i, amount in enumerate((4_800.0, 9_999.99, 7_350.5)):
        tid = f"FRAUD-{i}"
        obvious_frauds.add(tid)
        messages.append(
            {
                "transaction_id": tid,
                "account_id": f"A-X{i}",
                "merchant": "M-Z",
                "transaction_amount": amount,
                "transaction_date": (last + pd.Timedelta(seconds=i + 1)).isoformat() + "Z",
            }
        )
    obvious_genuine = {m["transaction_id"] for m in messages if m["transaction_amount"] < 20}
    return messages, obvious_frauds, obvious_genuine


def offline_features(messages: list[dict]) -> pd.DataFrame:
    """The model's features of the same transactions computed offline (whole history at once),
    indexed by transaction id."""
    frame = pd.DataFrame(messages)
    frame["transaction_date"] = pd.to_datetime(
        frame["transaction_date"], utc=True, format="ISO8601"
    ).dt.tz_convert(None)
    features = compute_features(frame)
    features.index = pd.Index(frame["transaction_id"])
    return features


def offline_suspicious(features: pd.DataFrame, models_dir: Path) -> dict[str, float]:
    """The same transactions scored offline by the same model."""
    manifest = read_manifest(models_dir)
    model = load_verified(
        models_dir, manifest.get(manifest.default_version or manifest.newest().version)
    )
    scores = model.predict_proba(features)
    pairs = zip(features.index, scores, strict=True)
    return {tid: score for tid, score in pairs if score >= model.threshold}


def table_row(body: str, label: str) -> list[str]:
    """The three window values of one row of the email's "What the model saw" table."""
    (line,) = [line for line in body.splitlines() if line.strip().startswith(label)]
    return line[len(label) + 2 :].split()[:3]


def test_sensor_runs_store_suspicious_transactions_and_email_each_once(
    settings: Settings, instance, mailbox, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FRAUD_MAX_BATCH_SIZE", "40")
    from fraud_dagster.settings import load_settings

    settings = load_settings()
    defs = build_definitions(settings)
    messages, obvious_frauds, obvious_genuine = known_transactions()
    assert produce(settings, messages) == len(messages)

    first = evaluate_sensor(defs, settings, instance, cursor=None)
    keys = [request.run_key for request in first.run_requests]
    assert keys == [
        f"{settings.kafka_topic}/0/{start}-{min(start + 40, len(messages)) - 1}"
        for start in range(0, len(messages), 40)
    ]
    for request in first.run_requests:
        assert "transaction_id" not in json.dumps(request.run_config)
    results = execute_requests(defs, instance, first)
    assert all(result.success for result in results)

    features = offline_features(messages)
    expected = offline_suspicious(features, settings.models_dir)
    assert obvious_frauds <= set(expected)
    assert not obvious_genuine & set(expected)
    assert suspicious_ids(database_url) == set(expected)
    assert len(table_rows(database_url, schema.scored_transactions)) == len(messages)

    emails = mailbox.wait_for(len(expected))
    by_id = {}
    for message in emails:
        by_id.setdefault(message["X-Fraud-Transaction-Id"], []).append(message)
    assert set(by_id) == set(expected)
    assert all(len(copies) == 1 for copies in by_id.values())
    stored = {
        row["transaction_id"]: row
        for row in table_rows(database_url, schema.suspicious_transactions)
    }
    for tid, (message,) in by_id.items():
        assert float(message["X-Fraud-Probability"]) == pytest.approx(
            stored[tid]["fraud_probability"], abs=1e-6
        )
        assert stored[tid]["fraud_probability"] == pytest.approx(expected[tid], abs=1e-9)
        body = message.get_content()
        assert tid in body
        # What the model saw, as the analyst reads it: the online features, equal to offline.
        assert table_row(body, "Account transactions") == [
            f"{features.loc[tid, f'account_tx_count_{days}d']:,.0f}" for days in (1, 7, 30)
        ]
        assert table_row(body, "Account mean amount") == [
            f"{features.loc[tid, f'account_mean_amount_{days}d']:,.2f}" for days in (1, 7, 30)
        ]
        assert "History INCOMPLETE" not in body  # every batch ran in offset order

    assert json.loads(first.cursor)["next_offsets"] == {"0": len(messages)}
    second = evaluate_sensor(defs, settings, instance, cursor=first.cursor)
    assert second.run_requests == []
    assert second.cursor == first.cursor
