"""The features of suspicious transactions are stored with them, once, and reach the alert."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import sqlalchemy as sa

from fraud_dagster import pipeline
from fraud_dagster.features import FEATURE_COLUMNS
from fraud_dagster.messages import RawBatch, ValidationLimits
from fraud_dagster.model import LoadedModel, ModelEntry
from fraud_dagster.storage.database import create_engine, ensure_schema
from fraud_dagster.storage.outbox import claim_alerts
from fraud_dagster.storage.schema import suspicious_features
from fraud_dagster_tests.unit.stored_batches import batch


class LargeAmountsSuspicious:
    """Scores 0.9 above an amount of 100, 0.1 below."""

    def predict_proba(self, features: pd.DataFrame) -> np.ndarray:
        high = features["transaction_amount"].to_numpy() > 100
        return np.column_stack([np.where(high, 0.1, 0.9), np.where(high, 0.9, 0.1)])


MODEL = LoadedModel(
    ModelEntry("v1", "unused.joblib", "0" * 64, 0.5, tuple(FEATURE_COLUMNS)),
    LargeAmountsSuspicious(),
    0.5,
)


def test_features_of_suspicious_rows_are_stored_once_and_claimed_with_the_alert(
    tmp_path: Path,
) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'app.db'}")
    ensure_schema(engine)
    # One account, one second apart: T1 and T3 are suspicious.
    scored = pipeline.score_batch(
        pipeline.prepare_batch(batch([10.0, 500.0, 20.0, 900.0]), engine, ValidationLimits()),
        MODEL,
    )
    assert list(scored.suspicious_features.index) == ["T1", "T3"]

    first = pipeline.store_batch(scored, engine, "run")
    again = pipeline.store_batch(scored, engine, "rerun")  # writes nothing twice

    assert (first.suspicious_inserted, again.suspicious_inserted) == (2, 0)
    with engine.connect() as conn:
        stored = conn.execute(
            sa.select(suspicious_features.c.transaction_id).order_by("transaction_id")
        ).scalars()
        assert list(stored) == ["T1", "T3"]
    alerts = {alert["transaction_id"]: alert for alert in claim_alerts(engine, "sender")}
    assert set(alerts) == {"T1", "T3"}
    t3 = alerts["T3"]["features"]
    assert set(t3) == set(FEATURE_COLUMNS)
    assert t3["transaction_amount"] == 900.0
    assert t3["account_tx_count_1d"] == 4.0  # T0..T3, this one included
    assert t3["account_mean_amount_1d"] == (10.0 + 500.0 + 20.0 + 900.0) / 4
    assert alerts["T1"]["features"]["account_tx_count_1d"] == 2.0
    # Read without the consumer group (as here), completeness is unknown, not claimed.
    assert alerts["T3"]["history_complete"] is None


def test_features_computed_while_an_earlier_batch_was_unstored_say_so(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'app.db'}")
    ensure_schema(engine)
    whole = batch([10.0, 20.0, 500.0, 900.0])
    # Offsets 2-3 read while 0-1 (from the partition's beginning) are not stored yet.
    later = RawBatch("t", 0, 2, 3, [2, 3], whole.timestamps_ms[2:], whole.values[2:], None, 0)
    scored = pipeline.score_batch(pipeline.prepare_batch(later, engine, ValidationLimits()), MODEL)
    assert scored.history_complete is False
    pipeline.store_batch(scored, engine, "run")

    alerts = {alert["transaction_id"]: alert for alert in claim_alerts(engine, "sender")}
    assert {tid: alert["history_complete"] for tid, alert in alerts.items()} == {
        "T2": False,
        "T3": False,
    }
    assert alerts["T2"]["features"]["account_tx_count_1d"] == 1.0  # T0 and T1 missing from it
