"""How the account rollups cut a band into buckets, and what a batch adds to them: pure logic."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from fraud_dagster.storage.rollups import ROLLUP_LEVELS_SECONDS, rollup_increments, split_band

DAY, HOUR, MINUTE = 86_400, 3_600, 60


def covered(first: int, last: int) -> list[tuple[int, int]]:
    """The closed second intervals `split_band` returns, sorted."""
    parts = split_band(first, last)
    spans = [(b0 * level, (b1 + 1) * level - 1) for level, b0, b1 in parts.buckets]
    return sorted(spans + parts.edges)


def test_a_band_is_covered_once_by_buckets_and_two_short_edges() -> None:
    rng = np.random.default_rng(3)
    starts = rng.integers(1_700_000_000, 1_800_000_000, 300)
    lengths = rng.choice([1, 59, 60, 61, 3_599, 3_600, 3_601, DAY, 7 * DAY, 30 * DAY], 300)
    for start, length in zip(starts.tolist(), lengths.tolist(), strict=True):
        first, last = start, start + length - 1
        spans = covered(first, last)
        assert spans[0][0] == first and spans[-1][1] == last
        for (_, end), (begin, _) in itertools.pairwise(spans):
            assert begin == end + 1
        parts = split_band(first, last)
        assert len(parts.edges) <= 2
        # Left over: less than a minute on each side (one edge when no whole minute fits).
        assert sum(end - begin + 1 for begin, end in parts.edges) < 2 * MINUTE
        if len(parts.edges) == 2:
            assert all(end - begin + 1 < MINUTE for begin, end in parts.edges)
        # However long the band: at most 2 x (59 minutes + 23 hours) + its days in buckets.
        in_buckets = sum(b1 - b0 + 1 for _, b0, b1 in parts.buckets)
        assert in_buckets <= 2 * (59 + 23) + length // DAY


def test_a_band_from_mid_minute_to_mid_minute_three_days_later() -> None:
    day0 = 20_000 * DAY
    first = day0 + 10 * HOUR + 30  # 10:00:30
    last = day0 + 3 * DAY + 12 * HOUR + 10  # 12:00:10, three days later
    parts = split_band(first, last)
    assert parts.edges == [(first, day0 + 10 * HOUR + 59), (day0 + 3 * DAY + 12 * HOUR, last)]
    assert parts.buckets == [
        (MINUTE, (day0 + 10 * HOUR) // MINUTE + 1, (day0 + 11 * HOUR) // MINUTE - 1),
        (HOUR, (day0 + 11 * HOUR) // HOUR, (day0 + DAY) // HOUR - 1),
        (DAY, 20_001, 20_002),
        (HOUR, (day0 + 3 * DAY) // HOUR, (day0 + 3 * DAY + 12 * HOUR) // HOUR - 1),
    ]


def test_a_band_shorter_than_a_minute_is_one_edge() -> None:
    assert split_band(125, 170).buckets == []
    assert split_band(125, 170).edges == [(125, 170)]
    assert split_band(171, 170).edges == []


def test_increments_count_and_sum_each_account_per_bucket_of_each_level() -> None:
    start = pd.Timestamp("2026-11-30 23:59:30")
    frame = pd.DataFrame(
        {
            "account_id": ["a", "a", "b", "a"],
            "transaction_amount": [1.5, 2.0, 4.0, 8.0],
            "transaction_date": [
                start,
                start + pd.Timedelta(seconds=20),  # same minute, hour and day
                start + pd.Timedelta(seconds=25),
                start + pd.Timedelta(seconds=40),  # the next day
            ],
        }
    )
    increments = rollup_increments(frame)
    first = int(start.timestamp())
    expected = []
    for account, seconds, amounts in (("a", first, [1.5, 2.0]), ("a", first + 40, [8.0])):
        for level in ROLLUP_LEVELS_SECONDS:
            expected.append((account, level, seconds // level, len(amounts), sum(amounts)))
    expected += [("b", level, (first + 25) // level, 1, 4.0) for level in ROLLUP_LEVELS_SECONDS]
    as_tuples = [
        (r["account_id"], r["level"], r["bucket"], r["tx_count"], r["amount_sum"])
        for r in increments
    ]
    assert as_tuples == sorted(expected)
    assert rollup_increments(frame.iloc[:0]) == []
