"""Stored ranges on SQLite and PostgreSQL: a batch that starts where a stored one does and
reaches further (the sensor planned that start again: a cursor reset while the first batch ran,
a daemon killed in the tick that first saw a partition) widens the stored range."""

from __future__ import annotations

import sqlalchemy as sa

from fraud_dagster.messages import ValidationLimits
from fraud_dagster.storage.batches import contiguous_end
from fraud_dagster.storage.database import create_engine, ensure_schema
from fraud_dagster.storage.schema import stored_ranges
from fraud_dagster_tests.unit.stored_batches import one_day_batch, outcomes, run


def ranges(engine: sa.Engine) -> list[tuple[int, int]]:
    query = sa.select(stored_ranges.c.first_offset, stored_ranges.c.last_offset)
    with engine.connect() as conn:
        return [tuple(row) for row in conn.execute(query.order_by(stored_ranges.c.first_offset))]


def test_a_longer_batch_from_a_stored_start_widens_the_range_and_the_commit_follows(
    database_url: str,
) -> None:
    """Before: the longer range was ignored (same primary key), so its further offsets counted
    as never stored: the commit stopped at the shorter end for good, later batches were scored
    with their history "incomplete", and a gap no rerun could close was reported."""
    engine = create_engine(database_url)
    try:
        ensure_schema(engine)
        limits = ValidationLimits()
        run(one_day_batch(0, 0, 4), engine, limits)
        assert (ranges(engine), contiguous_end(engine, "t", 0, 0)) == ([(0, 3)], 4)

        longer = run(one_day_batch(0, 0, 8), engine, limits)

        assert (longer.inserted, longer.already_stored) == (4, 4)
        assert (ranges(engine), contiguous_end(engine, "t", 0, 0)) == ([(0, 7)], 8)
        run(one_day_batch(0, 0, 4), engine, limits)  # the shorter one rerun narrows nothing
        assert (ranges(engine), contiguous_end(engine, "t", 0, 0)) == ([(0, 7)], 8)
        scored, rejected, _ = outcomes(engine)
        assert (len(scored), rejected) == (8, [])
    finally:
        engine.dispose()
