"""How the account rollups cut a band into buckets, and which rollup rows stored transactions
make: pure logic."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from fraud_dagster.storage.rollups import DAY, FINE_FROM_DAY_COUNT, rollup_rows_of, split_band

HOUR, MINUTE = 3_600, 60


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


def test_only_busy_days_are_rolled_up_by_day_hour_and_minute() -> None:
    day1 = pd.Timestamp("2026-11-30")
    busy = FINE_FROM_DAY_COUNT + 1
    frame = pd.DataFrame(
        {
            "account_id": ["a"] * (busy + 1) + ["b", "b"],
            "transaction_amount": [1.0] * busy + [8.0, 2.0, 4.0],
            "transaction_date": [
                *(day1 + pd.to_timedelta(np.arange(busy) * 30, unit="s")),  # a: busy on day 1
                day1 + pd.Timedelta(days=1, seconds=5),  # a, day 2: one transaction
                day1 + pd.Timedelta(seconds=20),  # b: quiet
                day1 + pd.Timedelta(seconds=40),
            ],
        }
    )
    rows = rollup_rows_of(frame)
    as_tuples = [
        (r["account_id"], r["level"], r["bucket"], r["tx_count"], r["amount_sum"]) for r in rows
    ]
    first_day = int(day1.timestamp()) // DAY
    days = [row for row in as_tuples if row[1] == DAY]
    assert days == [("a", DAY, first_day, busy, float(busy))]  # a's second day and b: quiet
    finer = [row for row in as_tuples if row[1] != DAY]
    assert {row[0] for row in finer} == {"a"}
    assert all(row[2] * row[1] // DAY == first_day for row in finer)  # day 1 only
    for level in (3_600, 60):
        assert sum(row[3] for row in finer if row[1] == level) == busy
    minutes = [row for row in finer if row[1] == 60]
    assert len(minutes) == (busy + 1) // 2 and {row[3] for row in minutes} <= {1, 2}
    assert as_tuples == sorted(as_tuples)
    assert rollup_rows_of(frame.iloc[:0]) == []
    # The threshold is the writer's: from 1, b's day (2 transactions) is busy, a's second not.
    from_one = rollup_rows_of(frame, busy_from=1)
    busy_days = {(r["account_id"], r["bucket"]) for r in from_one if r["level"] == DAY}
    assert busy_days == {("a", first_day), ("b", first_day)}
