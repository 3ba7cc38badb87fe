"""The model's features, computed by the same code offline (training) and online (scoring).

These are the 15 baseline features of the Fraud Detection Handbook (chapter 3):

* the amount, whether the transaction happened on a weekend, whether it happened at night;
* per account, over the last 1, 7 and 30 days (current transaction included): the number of
  transactions and their mean amount;
* per merchant, over 1, 7 and 30 days ending `DELAY_DAYS` before the transaction (fraud labels
  are only known after a delay): the number of transactions and the risk, i.e. confirmed frauds
  divided by transactions (0 when there are none).

Windows are time windows `(t - w, t]`, evaluated in time order: a transaction sees the ones
before it (and ties that come earlier in `transaction_id` order), never the ones after it.
Offline, `compute_features` runs over the whole history at once. Online, the scoring run calls
`compute_batch_features` with the stored history of the batch's accounts and merchants plus the
batch itself, which yields the same numbers as the offline pass would.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

WINDOWS_DAYS = (1, 7, 30)
DELAY_DAYS = 7
NIGHT_LAST_HOUR = 6
WEEKEND_FIRST_DAY = 5  # Saturday, with Monday = 0

FEATURE_COLUMNS: list[str] = [
    "transaction_amount",
    "during_weekend",
    "during_night",
    *[
        name
        for days in WINDOWS_DAYS
        for name in (f"account_tx_count_{days}d", f"account_mean_amount_{days}d")
    ],
    *[
        name
        for days in WINDOWS_DAYS
        for name in (f"merchant_tx_count_{days}d", f"merchant_risk_{days}d")
    ],
]

# How far back the history of a batch must reach for its windows to be complete.
ACCOUNT_HISTORY_DAYS = max(WINDOWS_DAYS)
MERCHANT_HISTORY_DAYS = max(WINDOWS_DAYS) + DELAY_DAYS

_SECONDS_PER_DAY = 86_400
# Group codes are spread this many seconds apart so that one sorted int64 key holds both.
_GROUP_STRIDE = 10**10


def _epoch_seconds(dates: pd.Series) -> np.ndarray:
    return dates.astype("datetime64[s]").to_numpy().astype(np.int64)


def _windowed(
    groups: pd.Series,
    seconds: np.ndarray,
    tiebreak: pd.Series,
    values: dict[str, np.ndarray],
    windows: list[tuple[int, int]],
) -> dict[tuple[int, int], dict[str, np.ndarray]]:
    """Count and sum `values` per group over windows `(t - start, t - end]`.

    `windows` holds (start, end) in seconds before t; end = 0 means "up to and including the
    transaction itself". Everything is vectorized: one lexicographic sort, then binary searches on
    a combined (group, time) key and differences of cumulative sums.
    """
    codes = pd.factorize(groups)[0].astype(np.int64)
    tiebreak_codes = pd.factorize(tiebreak, sort=True)[0]
    order = np.lexsort((tiebreak_codes, seconds, codes))
    key = codes[order] * _GROUP_STRIDE + seconds[order]
    position = np.arange(len(key))
    cumsums = {
        name: np.concatenate(([0.0], np.cumsum(column[order], dtype=np.float64)))
        for name, column in values.items()
    }
    inverse = np.empty_like(order)
    inverse[order] = position
    results: dict[tuple[int, int], dict[str, np.ndarray]] = {}
    for start, end in windows:
        left = np.searchsorted(key, key - start, side="right")
        right = position + 1 if end == 0 else np.searchsorted(key, key - end, side="right")
        right = np.maximum(right, left)
        stats = {"count": (right - left).astype(np.float64)}
        for name, cumsum in cumsums.items():
            stats[name] = cumsum[right] - cumsum[left]
        results[(start, end)] = {name: column[inverse] for name, column in stats.items()}
    return results


def compute_features(transactions: pd.DataFrame) -> pd.DataFrame:
    """The feature matrix of `transactions`, one row per input row, in the input's order.

    Needs the columns transaction_id, account_id, merchant, transaction_amount,
    transaction_date (naive UTC) and, for merchant risk, is_fraud (1 for a confirmed fraud,
    0 otherwise; missing means no label is known).
    """
    frame = transactions.reset_index(drop=True)
    dates = pd.to_datetime(frame["transaction_date"])
    seconds = _epoch_seconds(dates)
    amount = frame["transaction_amount"].to_numpy(dtype=np.float64)
    if "is_fraud" in frame:
        is_fraud = frame["is_fraud"].fillna(0).to_numpy(dtype=np.float64)
    else:
        is_fraud = np.zeros(len(frame), dtype=np.float64)
    tiebreak = frame["transaction_id"].astype(str)

    features = pd.DataFrame(index=frame.index)
    features["transaction_amount"] = amount
    features["during_weekend"] = (dates.dt.day_of_week >= WEEKEND_FIRST_DAY).astype(np.int8)
    features["during_night"] = (dates.dt.hour <= NIGHT_LAST_HOUR).astype(np.int8)

    account_windows = [(days * _SECONDS_PER_DAY, 0) for days in WINDOWS_DAYS]
    account = _windowed(frame["account_id"], seconds, tiebreak, {"amount": amount}, account_windows)
    delay = DELAY_DAYS * _SECONDS_PER_DAY
    merchant_windows = [((days + DELAY_DAYS) * _SECONDS_PER_DAY, delay) for days in WINDOWS_DAYS]
    merchant = _windowed(
        frame["merchant"], seconds, tiebreak, {"fraud": is_fraud}, merchant_windows
    )

    for days, window in zip(WINDOWS_DAYS, account_windows, strict=True):
        stats = account[window]
        features[f"account_tx_count_{days}d"] = stats["count"]
        features[f"account_mean_amount_{days}d"] = np.divide(
            stats["amount"], stats["count"], out=np.zeros(len(frame)), where=stats["count"] > 0
        )
    for days, window in zip(WINDOWS_DAYS, merchant_windows, strict=True):
        stats = merchant[window]
        features[f"merchant_tx_count_{days}d"] = stats["count"]
        features[f"merchant_risk_{days}d"] = np.divide(
            stats["fraud"], stats["count"], out=np.zeros(len(frame)), where=stats["count"] > 0
        )
    return features[FEATURE_COLUMNS]


def compute_batch_features(batch: pd.DataFrame, history: pd.DataFrame) -> pd.DataFrame:
    """Features of the `batch` rows, with windows filled from the stored `history`.

    `history` holds earlier stored transactions of the batch's accounts (last
    `ACCOUNT_HISTORY_DAYS`) and merchants (last `MERCHANT_HISTORY_DAYS`), with is_fraud labels;
    rows whose transaction_id is in the batch are ignored (a rerun finds its own rows stored).
    The result is indexed like `batch`.
    """
    columns = ["transaction_id", "account_id", "merchant", "transaction_amount", "transaction_date"]
    past = history.loc[
        ~history["transaction_id"].isin(batch["transaction_id"]), [*columns, "is_fraud"]
    ]
    current = batch[columns].copy()
    current["is_fraud"] = batch.get("is_fraud", 0.0)
    combined = pd.concat([past, current], ignore_index=True) if len(past) else current
    features = compute_features(combined)
    result = features.iloc[len(past) :]
    result.index = batch.index
    return result
