"""Online features equal offline features: the same transactions, streamed or all at once.

Online: a labelled simulated history goes through the real pipeline in time-ordered chunks (real
broker, topic of two partitions keyed by account, sensor-requested batch runs on a real Dagster
instance, the SQLite database as history); before each chunk, the replay label loader records the
labels known by the end of that chunk (transactions at least 7 days older). Offline:
`compute_features` over the whole labelled history at once. The preprocess op's features of every
batch run must equal the offline ones, and so must the stored scores.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fraud_dagster.definitions import build_definitions
from fraud_dagster.features import FEATURE_COLUMNS, compute_features
from fraud_dagster.labels import load_replay_labels
from fraud_dagster.model import load_verified, read_manifest
from fraud_dagster.resources import resolved_resources
from fraud_dagster.settings import Settings, load_settings
from fraud_dagster.simulator import SimulationConfig, simulate_transactions, to_messages
from fraud_dagster.storage import schema
from fraud_dagster_tests.helpers import evaluate_sensor, execute_requests, produce, table_rows

pytestmark = pytest.mark.services

CHUNK_DAYS = 6  # shorter than the 7-day label delay: every label a chunk needs is known before it


def step_output_metadata(result, step_key: str) -> dict:
    """The metadata of `step_key`'s output event, as plain values."""
    outputs = [e for e in result.all_events if e.event_type_value == "STEP_OUTPUT"]
    (event,) = [e for e in outputs if e.step_key == step_key]
    return {k: v.value for k, v in event.event_specific_data.metadata.items()}


def write_handbook_csv(history: pd.DataFrame, path: Path) -> None:
    pd.DataFrame(
        {
            "TRANSACTION_ID": history["transaction_id"],
            "TX_DATETIME": history["transaction_date"].dt.strftime("%Y-%m-%d %H:%M:%S"),
            "TX_FRAUD": history["is_fraud"],
        }
    ).to_csv(path, index=False)


@pytest.mark.partitions(2)
def test_streamed_features_equal_offline_features(
    settings: Settings,
    instance,
    database_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FRAUD_MAX_BATCH_SIZE", "700")
    settings = load_settings()
    defs = build_definitions(settings)
    engine = resolved_resources(settings)["database"].get_engine()
    config = SimulationConfig(
        n_customers=150,
        n_terminals=400,
        n_days=45,
        seed=21,
        compromised_terminals_per_day=1,
        compromised_customers_per_day=1,
    )
    history = simulate_transactions(config)
    labels_csv = tmp_path / "labels.csv"
    write_handbook_csv(history, labels_csv)

    day = (history["transaction_date"] - pd.Timestamp(config.start)).dt.days
    online: list[pd.DataFrame] = []
    cursor = None
    runs = 0
    summed = rollup_rows = 0
    for first_day in range(0, config.n_days, CHUNK_DAYS):
        chunk = history.loc[(day >= first_day) & (day < first_day + CHUNK_DAYS)]
        load_replay_labels(engine, labels_csv, as_of=chunk["transaction_date"].max())
        assert produce(settings, to_messages(chunk)) == len(chunk)
        tick = evaluate_sensor(defs, settings, instance, cursor)
        cursor = tick.cursor
        for result in execute_requests(defs, instance, tick):
            assert result.success
            prepared = result.output_for_node("transaction_batch.preprocess")
            assert not prepared.rejections
            # The run's metadata says how much history the features read (for the UI).
            metadata = step_output_metadata(result, "transaction_batch.preprocess")
            for kind, read in (
                ("account", prepared.accounts_read),
                ("merchant", prepared.merchants_read),
            ):
                names = ("rows", "sums", "summed", "rollup_rows")
                reported = [metadata[f"{kind}_history_{n}"] for n in names]
                assert reported == [read.rows, read.sums, read.summed, read.rollup_rows]
            summed += metadata["account_history_summed"] + metadata["merchant_history_summed"]
            rollup_rows += metadata["account_history_rollup_rows"]
            online.append(
                prepared.features.set_index(prepared.transactions["transaction_id"].to_numpy())
            )
            runs += 1
    assert runs >= 2 * (config.n_days // CHUNK_DAYS)  # several batches per partition
    assert summed > 0  # later batches read most of their history as sums
    # ~2 transactions a card a day: no day is busy, so the batches wrote no rollups and read none.
    assert rollup_rows == 0
    assert table_rows(database_url, schema.account_rollups) == []

    offline = compute_features(history).set_index(history["transaction_id"].to_numpy())
    streamed = pd.concat(online)
    assert streamed.index.is_unique
    assert set(streamed.index) == set(offline.index)
    streamed = streamed.loc[offline.index, FEATURE_COLUMNS]
    # The history exercises every feature, merchant risk from the delayed labels included.
    assert (offline["merchant_risk_7d"] > 0).sum() > 100
    assert (offline["account_tx_count_1d"] > 1).sum() > 100
    pd.testing.assert_frame_equal(
        streamed, offline[FEATURE_COLUMNS], check_exact=False, rtol=1e-9, atol=1e-9
    )

    manifest = read_manifest(settings.models_dir)
    model = load_verified(settings.models_dir, manifest.get(manifest.default_version))
    expected = pd.Series(model.predict_proba(offline[FEATURE_COLUMNS]), index=offline.index)
    stored = table_rows(database_url, schema.scored_transactions)
    assert len(stored) == len(history)
    assert {row["model_version"] for row in stored} == {model.version}
    scores = np.array([row["fraud_probability"] for row in stored])
    np.testing.assert_allclose(
        scores, expected.loc[[row["transaction_id"] for row in stored]].to_numpy(), atol=1e-9
    )
