"""Feature windows: the vectorized code against a plain pandas rolling reference."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fraud_dagster.features import (
    FEATURE_COLUMNS,
    compute_batch_features,
    compute_features,
    labels_reach_batch,
)


def random_transactions(n: int = 3000, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    seconds = np.sort(rng.integers(0, 86_400 * 60, n))
    return pd.DataFrame(
        {
            "transaction_id": [f"t{i:06d}" for i in range(n)],
            "account_id": rng.integers(0, 40, n).astype(str),
            "merchant": rng.integers(0, 60, n).astype(str),
            "transaction_amount": rng.gamma(2, 30, n).round(2),
            "transaction_date": pd.Timestamp("2024-03-01") + pd.to_timedelta(seconds, unit="s"),
            "is_fraud": (rng.random(n) < 0.1).astype(float),
        }
    )


def rolling_reference(frame: pd.DataFrame) -> pd.DataFrame:
    """The handbook's formulation: pandas time-based rolling windows per group."""
    indexed = frame.set_index("transaction_date")
    out = pd.DataFrame(index=frame.index)
    for days in (1, 7, 30):
        amounts = indexed.groupby("account_id")["transaction_amount"]
        count = amounts.transform(lambda s, d=days: s.rolling(f"{d}D").count()).to_numpy()
        total = amounts.transform(lambda s, d=days: s.rolling(f"{d}D").sum()).to_numpy()
        out[f"account_tx_count_{days}d"] = count
        out[f"account_mean_amount_{days}d"] = total / count
        fraud = indexed.groupby("merchant")["is_fraud"]

        def window(kind: str, width: int, fraud=fraud) -> np.ndarray:
            return fraud.transform(
                lambda s, w=width: getattr(s.rolling(f"{w}D"), kind)()
            ).to_numpy()

        tx = window("count", 7 + days) - window("count", 7)
        frauds = window("sum", 7 + days) - window("sum", 7)
        out[f"merchant_tx_count_{days}d"] = tx
        out[f"merchant_risk_{days}d"] = np.where(tx > 0, frauds / np.where(tx > 0, tx, 1), 0.0)
    return out


def test_windows_match_pandas_rolling() -> None:
    frame = random_transactions()
    features = compute_features(frame)
    reference = rolling_reference(frame)
    assert list(features.columns) == FEATURE_COLUMNS
    for column in reference.columns:
        np.testing.assert_allclose(
            features[column], reference[column], rtol=1e-9, atol=1e-9, err_msg=column
        )


def test_calendar_flags() -> None:
    frame = random_transactions(10).assign(
        transaction_date=pd.to_datetime(
            [
                "2024-03-02 06:59:59",
                "2024-03-02 07:00:00",
                "2024-03-04 00:00:00",
                "2024-03-04 12:00:00",
                "2024-03-08 23:59:59",
                "2024-03-09 01:00:00",
                "2024-03-10 22:00:00",
                "2024-03-11 06:00:00",
                "2024-03-11 07:30:00",
                "2024-03-12 03:00:00",
            ]
        )
    )
    features = compute_features(frame)
    assert features["during_weekend"].tolist() == [1, 1, 0, 0, 0, 1, 1, 0, 0, 0]
    assert features["during_night"].tolist() == [1, 0, 1, 0, 0, 1, 0, 1, 0, 1]


def test_merchant_risk_ignores_the_last_seven_days() -> None:
    dates = pd.to_datetime(["2024-01-01 10:00", "2024-01-05 10:00", "2024-01-09 10:00"])
    frame = pd.DataFrame(
        {
            "transaction_id": ["a", "b", "c"],
            "account_id": ["x", "y", "z"],
            "merchant": ["m", "m", "m"],
            "transaction_amount": [1.0, 2.0, 3.0],
            "transaction_date": dates,
            "is_fraud": [1.0, 0.0, 0.0],
        }
    )
    features = compute_features(frame)
    # c (Jan 9) sees a (Jan 1, 8 days earlier, a fraud) in its delayed 7- and 30-day windows,
    # but not b (Jan 5, within the 7-day delay).
    assert features["merchant_tx_count_7d"].tolist() == [0, 0, 1]
    assert features["merchant_risk_7d"].tolist() == [0, 0, 1.0]
    assert features["merchant_tx_count_1d"].tolist() == [0, 0, 0]


@pytest.mark.parametrize("batch_size", [1, 7, 250, 3000])
def test_online_batches_equal_offline(batch_size: int) -> None:
    frame = random_transactions(900, seed=4)
    offline = compute_features(frame)
    online = []
    for start in range(0, len(frame), batch_size):
        history = frame.iloc[:start]
        batch = frame.iloc[start : start + batch_size]
        online.append(compute_batch_features(batch, history))
    online_frame = pd.concat(online).loc[frame.index]
    pd.testing.assert_frame_equal(
        online_frame, offline, check_exact=False, rtol=1e-9, atol=1e-9, check_dtype=False
    )


def test_rerun_ignores_its_own_stored_rows() -> None:
    frame = random_transactions(200, seed=5)
    batch = frame.iloc[150:]
    first = compute_batch_features(batch, frame.iloc[:150])
    rerun = compute_batch_features(batch, frame)  # the batch's rows are stored by now
    pd.testing.assert_frame_equal(first, rerun)


def test_only_the_labels_marked_reachable_change_a_batchs_features() -> None:
    """The batch's labels that `labels_reach_batch` leaves out cannot change any feature; the
    ones it marks can (here: one exactly 7 days, in whole seconds, before the newest row)."""
    frame = random_transactions(900, seed=6)
    history, batch = frame.iloc[:300], frame.iloc[300:].copy()
    newest = batch["transaction_date"].max().floor("s") + pd.Timedelta(milliseconds=200)
    edge = batch.index[0]
    batch.loc[batch.index[-1], "transaction_date"] = newest
    batch.loc[edge, ["transaction_date", "merchant"]] = [
        newest - pd.Timedelta(days=7) + pd.Timedelta(milliseconds=600),
        batch.loc[batch.index[-1], "merchant"],
    ]
    reach = labels_reach_batch(batch)
    assert reach[0] and not reach.all()
    labeled = batch.assign(is_fraud=1.0)
    cut = labeled.assign(is_fraud=np.where(reach, 1.0, 0.0))
    pd.testing.assert_frame_equal(
        compute_batch_features(labeled, history), compute_batch_features(cut, history)
    )
    without_edge = cut.assign(is_fraud=np.where(reach & (batch.index != edge), 1.0, 0.0))
    assert not compute_batch_features(without_edge, history).equals(
        compute_batch_features(cut, history)
    )
