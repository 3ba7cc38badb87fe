"""The latency benchmark's answer to "does the lag grow": the slope of its sawtooth."""

from __future__ import annotations

import pytest

from fraud_dagster.benchmarks.latency import lag_trend


def sawtooth(rise_per_second: float, seconds: int = 1800) -> list[tuple[float, int]]:
    """A lag sampled every second: 1,000 messages a second piling up, cleared every 5-s tick."""
    return [(t, round(4_000 + 1_000 * (t % 5) + rise_per_second * t)) for t in range(seconds)]


def test_a_sawtooth_without_drift_has_no_trend() -> None:
    trend = lag_trend(sawtooth(0.0), 60, 1800)
    assert trend is not None
    assert abs(trend["per_minute"]) < 1
    assert trend["mean"] == pytest.approx(6_000, abs=5)


def test_a_drifting_sawtooth_shows_its_drift() -> None:
    trend = lag_trend(sawtooth(0.2), 60, 1800)  # 12 messages more every minute
    assert trend is not None
    assert trend["per_minute"] == pytest.approx(12, abs=1)


def test_only_the_samples_inside_the_span_count() -> None:
    filling_up = [(t, 100 * t) for t in range(60)]  # the first minute, before the first tick
    steady = sawtooth(0.0)[60:]
    trend = lag_trend(filling_up + steady, 60, 1800)
    assert trend is not None
    assert abs(trend["per_minute"]) < 1
    assert lag_trend(steady, 0, 30) is None
