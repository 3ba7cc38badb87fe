"""The asset checks of real batch runs (real broker, database, SMTP, instance storage): a failing
check is shown with its severity and figures, and the batch is stored and alerted all the same."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import dagster as dg
import pytest

from fraud_dagster.definitions import build_definitions
from fraud_dagster.producer import synthetic_transactions
from fraud_dagster.settings import Settings, load_settings
from fraud_dagster.simulator import to_messages
from fraud_dagster.storage import schema
from fraud_dagster_tests.helpers import (
    MailBox,
    evaluate_sensor,
    produce,
    produce_raw,
    suspicious_ids,
    table_rows,
)
from fraud_dagster_tests.operations_support import materializations, run_request

pytestmark = pytest.mark.services

CHECKS = {
    ("scored_transactions", "rejected_share"),
    ("scored_transactions", "offsets_read"),
    ("suspicious_transactions", "score_drift"),
    ("suspicious_transactions", "model_file_verified"),
}


def alert_storm(count: int) -> list[dict]:
    """Large amounts on fresh cards: what the model flags, far more often than in training."""
    now = datetime.now(UTC).replace(microsecond=0, tzinfo=None)
    return [
        {
            "transaction_id": f"STORM-{i}",
            "account_id": f"A-STORM-{i}",
            "merchant": f"M-STORM-{i % 3}",
            "transaction_amount": 5_000.0 + 70 * i,
            "transaction_date": (now - timedelta(seconds=count - i)).isoformat() + "Z",
        }
        for i in range(count)
    ]


def evaluations(result: dg.JobExecutionResult) -> dict[tuple[str, str], dg.AssetCheckEvaluation]:
    return {
        (e.asset_key.to_user_string(), e.check_name): e
        for e in result.get_asset_check_evaluations()
    }


def plain(evaluation: dg.AssetCheckEvaluation) -> dict:
    return {key: value.value for key, value in evaluation.metadata.items()}


def test_failing_checks_warn_without_losing_or_blocking_anything(
    settings: Settings,
    instance: dg.DagsterInstance,
    database_url: str,
    mailbox: MailBox,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FRAUD_CHECK_MAX_REJECTED_SHARE", "0.1")
    monkeypatch.setenv("FRAUD_CHECK_DRIFT_MIN_SCORES", "50")
    settings = load_settings()
    defs = build_definitions(settings)

    # Batch 1: 60 transactions the model flags en masse, and 10 malformed messages (14 %).
    storm = alert_storm(60)
    produce(settings, storm)
    produce_raw(settings, [b'{"transaction_id": "broken", '] * 10)
    first = evaluate_sensor(defs, settings, instance, cursor=None)
    (request,) = first.run_requests
    result = run_request(request, instance)
    assert result.success

    checks = evaluations(result)
    assert set(checks) == CHECKS
    rejected = checks[("scored_transactions", "rejected_share")]
    assert not rejected.passed
    assert rejected.severity == dg.AssetCheckSeverity.WARN
    assert plain(rejected)["read"] == 70
    assert plain(rejected)["rejected"] == 10
    assert plain(rejected)["max_rejected_share"] == 0.1
    drift = checks[("suspicious_transactions", "score_drift")]
    assert not drift.passed
    assert drift.severity == dg.AssetCheckSeverity.WARN
    assert plain(drift)["psi"] > 0.25
    assert plain(drift)["scores"] == 60
    bins = plain(drift)["score_bins"]
    assert sum(record.data["batch_count"] for record in bins.records) == 60
    model_check = checks[("suspicious_transactions", "model_file_verified")]
    assert model_check.passed
    assert model_check.severity == dg.AssetCheckSeverity.ERROR
    assert checks[("scored_transactions", "offsets_read")].passed  # nothing deleted unread

    # Nothing lost, everything alerted, although two checks failed.
    assert len(table_rows(database_url, schema.scored_transactions)) == 60
    assert len(table_rows(database_url, schema.rejected_transactions)) == 10
    flagged = suspicious_ids(database_url)
    assert len(flagged) > 30
    assert {m["X-Fraud-Transaction-Id"] for m in mailbox.wait_for(len(flagged))} == flagged
    (scored_meta,) = materializations(instance, result.run_id, "scored_transactions")
    assert (scored_meta["read"], scored_meta["rejected"], scored_meta["scored"]) == (70, 10, 60)
    histogram = scored_meta["score_histogram"]
    assert sum(record.data["transactions"] for record in histogram.records) == 60

    # Batch 2: ordinary traffic; the stream goes on and every check passes.
    ordinary = to_messages(synthetic_transactions(300, seed=21))
    produce(settings, ordinary)
    second = evaluate_sensor(defs, settings, instance, cursor=first.cursor)
    (request,) = second.run_requests
    result = run_request(request, instance)
    assert result.success
    checks = evaluations(result)
    failed = {key: c.description for key, c in checks.items() if not c.passed}
    assert set(checks) == CHECKS and not failed, failed
    assert plain(checks[("suspicious_transactions", "score_drift")])["psi"] < 0.25
    assert len(table_rows(database_url, schema.scored_transactions)) == 360

    # The instance keeps each check's latest evaluation (what the asset pages show).
    for asset, name in CHECKS:
        key = dg.AssetCheckKey(dg.AssetKey(asset), name)
        (record,) = instance.event_log_storage.get_asset_check_execution_history(key, limit=1)
        assert record.run_id == result.run_id
    assert json.loads(second.cursor)["next_offsets"] == {"0": 370}
