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

The online history stays small however much is stored: `history_plan` splits the time the
batch's windows can reach into intervals where a stored transaction's membership depends on
which batch transaction is asking (fetched as rows; only as wide as the batch's time span) and
bands that every batch transaction's window holds entirely or not at all (fetched as one
aggregate row per key and band, with a weight).
"""

from __future__ import annotations

from dataclasses import dataclass

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

# Window edges, in days before t: accounts look at (t - w, t], merchants at (t - 7 - w, t - 7].
ACCOUNT_EDGES_DAYS = (0, *WINDOWS_DAYS)
MERCHANT_EDGES_DAYS = (DELAY_DAYS, *(DELAY_DAYS + days for days in WINDOWS_DAYS))
WEIGHT = "weight"  # optional column: how many transactions a (history) row stands for

SECONDS_PER_DAY = 86_400
# Group codes are spread this many seconds apart so that one sorted int64 key holds both.
_GROUP_STRIDE = 10**10


def epoch_seconds(dates: pd.Series) -> np.ndarray:
    """Whole seconds since 1970 of naive UTC dates: the one time axis of windows and buckets."""
    return pd.to_datetime(dates).astype("datetime64[s]").to_numpy().astype(np.int64)


def _windowed(
    groups: pd.Series,
    seconds: np.ndarray,
    tiebreak: pd.Series,
    weights: np.ndarray,
    values: dict[str, np.ndarray],
    windows: list[tuple[int, int]],
) -> dict[tuple[int, int], dict[str, np.ndarray]]:
    """Count (by weight) and sum `values` per group over windows `(t - start, t - end]`.

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
        for name, column in {"count": weights, **values}.items()
    }
    inverse = np.empty_like(order)
    inverse[order] = position
    results: dict[tuple[int, int], dict[str, np.ndarray]] = {}
    for start, end in windows:
        left = np.searchsorted(key, key - start, side="right")
        right = position + 1 if end == 0 else np.searchsorted(key, key - end, side="right")
        right = np.maximum(right, left)
        stats = {name: cumsum[right] - cumsum[left] for name, cumsum in cumsums.items()}
        results[(start, end)] = {name: column[inverse] for name, column in stats.items()}
    return results


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    return np.divide(numerator, denominator, out=np.zeros(len(numerator)), where=denominator > 0)


def _weights(frame: pd.DataFrame) -> np.ndarray:
    if WEIGHT in frame:
        return frame[WEIGHT].to_numpy(dtype=np.float64)
    return np.ones(len(frame), dtype=np.float64)


def _account_features(frame: pd.DataFrame) -> dict[str, np.ndarray]:
    """Per account, over (t - w, t]: number of transactions and mean amount."""
    windows = [(days * SECONDS_PER_DAY, 0) for days in WINDOWS_DAYS]
    stats = _windowed(
        frame["account_id"],
        epoch_seconds(frame["transaction_date"]),
        frame["transaction_id"].astype(str),
        _weights(frame),
        {"amount": frame["transaction_amount"].to_numpy(dtype=np.float64)},
        windows,
    )
    features = {}
    for days, window in zip(WINDOWS_DAYS, windows, strict=True):
        features[f"account_tx_count_{days}d"] = stats[window]["count"]
        features[f"account_mean_amount_{days}d"] = _ratio(
            stats[window]["amount"], stats[window]["count"]
        )
    return features


def _merchant_features(frame: pd.DataFrame) -> dict[str, np.ndarray]:
    """Per merchant, over (t - 7 - w, t - 7]: number of transactions and confirmed-fraud share."""
    delay = DELAY_DAYS * SECONDS_PER_DAY
    windows = [((days + DELAY_DAYS) * SECONDS_PER_DAY, delay) for days in WINDOWS_DAYS]
    is_fraud = (
        frame["is_fraud"].fillna(0).to_numpy(dtype=np.float64)
        if "is_fraud" in frame
        else np.zeros(len(frame), dtype=np.float64)
    )
    stats = _windowed(
        frame["merchant"],
        epoch_seconds(frame["transaction_date"]),
        frame["transaction_id"].astype(str),
        _weights(frame),
        {"fraud": is_fraud},
        windows,
    )
    features = {}
    for days, window in zip(WINDOWS_DAYS, windows, strict=True):
        features[f"merchant_tx_count_{days}d"] = stats[window]["count"]
        features[f"merchant_risk_{days}d"] = _ratio(stats[window]["fraud"], stats[window]["count"])
    return features


def _calendar_features(frame: pd.DataFrame) -> dict[str, np.ndarray]:
    dates = pd.to_datetime(frame["transaction_date"])
    return {
        "transaction_amount": frame["transaction_amount"].to_numpy(dtype=np.float64),
        "during_weekend": (dates.dt.day_of_week >= WEEKEND_FIRST_DAY).to_numpy(dtype=np.int8),
        "during_night": (dates.dt.hour <= NIGHT_LAST_HOUR).to_numpy(dtype=np.int8),
    }


def compute_features(transactions: pd.DataFrame) -> pd.DataFrame:
    """The feature matrix of `transactions`, one row per input row, in the input's order.

    Needs the columns transaction_id, account_id, merchant, transaction_amount,
    transaction_date (naive UTC) and, for merchant risk, is_fraud (1 for a confirmed fraud,
    0 otherwise; missing means no label is known).
    """
    frame = transactions.reset_index(drop=True)
    features = pd.DataFrame(
        {**_calendar_features(frame), **_account_features(frame), **_merchant_features(frame)},
        index=frame.index,
    )
    return features[FEATURE_COLUMNS]


ACCOUNT_HISTORY_COLUMNS = ["transaction_id", "account_id", "transaction_amount", "transaction_date"]
MERCHANT_HISTORY_COLUMNS = ["transaction_id", "merchant", "transaction_date", "is_fraud"]


@dataclass(frozen=True)
class HistoryRead:
    """How much stored history one kind of window took: `rows` read one by one, `sums` (one per
    key and band), the stored transactions those add up, `summed`, and the `rollup_rows` they
    were taken from (accounts only). The batch's own size bounds `rows` and `sums`; `summed`
    grows with how busy its keys are; the read's work grows with `summed` where a band is summed
    from the transactions (merchants) and is bounded by `rollup_rows` where it has rollups."""

    rows: int = 0
    sums: int = 0
    summed: int = 0
    rollup_rows: int = 0


@dataclass
class BatchHistory:
    """Stored history for a batch: what its account windows and merchant windows can reach.

    Rows carry a `weight`: 1 for a stored transaction, n for an aggregate row standing for the n
    transactions of one key in one band of `history_plan` (amount and is_fraud then hold sums).
    """

    accounts: pd.DataFrame
    merchants: pd.DataFrame
    accounts_read: HistoryRead = HistoryRead()
    merchants_read: HistoryRead = HistoryRead()

    @classmethod
    def from_rows(cls, rows: pd.DataFrame) -> BatchHistory:
        """Plain stored transactions used for both kinds of windows (weight 1 each)."""
        rows = rows.assign(is_fraud=rows.get("is_fraud", 0.0))
        return cls(
            accounts=rows[ACCOUNT_HISTORY_COLUMNS].assign(**{WEIGHT: 1.0}),
            merchants=rows[MERCHANT_HISTORY_COLUMNS].assign(**{WEIGHT: 1.0}),
        )


@dataclass(frozen=True)
class HistoryPlan:
    """Closed intervals of epoch seconds: fetch `rows` one by one, `bands` as aggregates."""

    rows: list[tuple[int, int]]
    bands: list[tuple[int, int]]


def history_plan(first_second: int, last_second: int, edges_days: tuple[int, ...]) -> HistoryPlan:
    """Which stored times a batch spanning first..last second needs, and in which form.

    A window of t has its edges at t - e for each edge e; a stored transaction at second x is in
    or out of the window depending on t only if x lies in [first - e, last - e] for some edge.
    Those intervals are fetched as rows; every other stretch of the reachable range (a band) is
    in all the batch's windows of a size or in none, so it is fetched as one sum per key.
    """
    edges = sorted(days * SECONDS_PER_DAY for days in edges_days)
    low, high = first_second - edges[-1] + 1, last_second - edges[0]
    partial = sorted(
        (max(first_second - edge, low), min(last_second - edge, high)) for edge in edges
    )
    rows: list[tuple[int, int]] = []
    for start, end in partial:
        if start > end:
            continue
        if rows and start <= rows[-1][1] + 1:
            rows[-1] = (rows[-1][0], max(rows[-1][1], end))
        else:
            rows.append((start, end))
    bands = []
    cursor = low
    for start, end in rows:
        if start > cursor:
            bands.append((cursor, start - 1))
        cursor = end + 1
    if cursor <= high:
        bands.append((cursor, high))
    return HistoryPlan(rows=rows, bands=bands)


def labels_reach_batch(batch: pd.DataFrame) -> np.ndarray:
    """Which of `batch`'s rows can sit in another batch row's merchant windows, so that their
    fraud labels count (boolean per row).

    Merchant windows end `DELAY_DAYS` before their transaction, at whole seconds: only rows at
    least that much older than the batch's newest one reach any. In a live stream a batch spans
    seconds and no row does, so its labels need not be read at all; a replay of a long stretch
    needs them.
    """
    seconds = epoch_seconds(batch["transaction_date"])
    if not len(seconds):
        return np.zeros(0, dtype=bool)
    return seconds <= seconds.max() - DELAY_DAYS * SECONDS_PER_DAY


def compute_batch_features(
    batch: pd.DataFrame, history: BatchHistory | pd.DataFrame
) -> pd.DataFrame:
    """Features of the `batch` rows, with windows filled from the stored `history`.

    `history` is a `BatchHistory` (see `storage.history.load_batch_history`) or plain stored rows
    with is_fraud labels. History rows whose transaction_id is in the batch are ignored (a rerun
    finds its own rows stored). The batch's own is_fraud counts only for the rows
    `labels_reach_batch` marks. The result is indexed like `batch`.
    """
    if isinstance(history, pd.DataFrame):
        history = BatchHistory.from_rows(history)
    current = batch.assign(is_fraud=batch.get("is_fraud", 0.0), **{WEIGHT: 1.0})
    ids = batch["transaction_id"]

    def with_batch(past: pd.DataFrame, columns: list[str]) -> tuple[pd.DataFrame, int]:
        past = past.loc[~past["transaction_id"].isin(ids), [*columns, WEIGHT]]
        rows = current[[*columns, WEIGHT]]
        combined = pd.concat([past, rows], ignore_index=True) if len(past) else rows
        return combined.reset_index(drop=True), len(past)

    accounts, account_offset = with_batch(history.accounts, ACCOUNT_HISTORY_COLUMNS)
    merchants, merchant_offset = with_batch(history.merchants, MERCHANT_HISTORY_COLUMNS)
    features = {
        **_calendar_features(batch),
        **{k: v[account_offset:] for k, v in _account_features(accounts).items()},
        **{k: v[merchant_offset:] for k, v in _merchant_features(merchants).items()},
    }
    return pd.DataFrame(features, index=batch.index)[FEATURE_COLUMNS]
