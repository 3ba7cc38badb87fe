"""A rerun keeps each message's first outcome, whatever this run's validation says of it."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import sqlalchemy as sa

from fraud_dagster.messages import RawBatch, ValidationLimits
from fraud_dagster.storage.batches import LOST_TO_RETENTION, contiguous_end
from fraud_dagster.storage.database import create_engine, ensure_schema
from fraud_dagster.storage.schema import lost_ranges
from fraud_dagster_tests.unit.stored_batches import batch, outcomes, run


def test_a_message_rejected_first_stays_rejected_when_a_rerun_would_score_it(
    tmp_path: Path,
) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'app.db'}")
    ensure_schema(engine)
    raw = batch([10.0, 500.0, 20.0])
    strict = ValidationLimits(max_amount=100.0)

    first = run(raw, engine, strict)
    assert (first.inserted, first.rejected_inserted) == (2, 1)
    again = run(raw, engine, ValidationLimits())  # the rerun would accept T1 now

    assert (again.inserted, again.rejected_inserted, again.already_stored) == (0, 0, 3)
    assert outcomes(engine) == (["T0", "T2"], ["T1"], ["T0", "T2"])


def test_a_message_scored_first_stays_scored_when_a_rerun_would_reject_it(
    tmp_path: Path,
) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'app.db'}")
    ensure_schema(engine)
    raw = batch([10.0, 500.0, 20.0])

    first = run(raw, engine, ValidationLimits())
    assert (first.inserted, first.rejected_inserted) == (3, 0)
    again = run(raw, engine, ValidationLimits(max_amount=100.0))

    assert (again.inserted, again.rejected_inserted, again.already_stored) == (0, 0, 3)
    assert outcomes(engine) == (["T0", "T1", "T2"], [], ["T0", "T1", "T2"])


def test_a_bad_message_where_another_was_rejected_is_reported_not_dropped_silently(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """After a topic was recreated, offset 0 may hold a different bad message than before."""
    engine = create_engine(f"sqlite:///{tmp_path / 'app.db'}")
    ensure_schema(engine)
    before = batch([10.0])
    before.values[0] = b"{not json"
    run(before, engine, ValidationLimits())
    after = batch([10.0])
    after.values[0] = b"[1, 2]"

    with caplog.at_level(logging.WARNING, logger="fraud_dagster.storage.batches"):
        run(after, engine, ValidationLimits())

    assert "offset 0 not stored: another message is stored as rejected" in caplog.text
    assert "expected a JSON object, got array" in caplog.text
    run(before, engine, ValidationLimits())  # a rerun of the first: the same bytes, no warning
    assert caplog.text.count("not stored") == 1


def test_offsets_lost_to_retention_are_recorded_once_with_the_range(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'app.db'}")
    ensure_schema(engine)
    read = batch([10.0, 20.0, 30.0, 40.0])
    # Offsets 0..5 asked for; 0..3 were deleted by retention, 4..5 were read.
    raw = RawBatch("t", 0, 0, 5, [4, 5], read.timestamps_ms[2:], read.values[2:], (0, 3))

    first = run(raw, engine, ValidationLimits())
    again = run(raw, engine, ValidationLimits())

    assert (first.inserted, first.lost_offsets) == (2, 4)
    assert (again.inserted, again.already_stored, again.lost_offsets) == (0, 2, 0)
    with engine.connect() as conn:
        assert conn.execute(
            sa.select(lost_ranges.c.first_offset, lost_ranges.c.last_offset, lost_ranges.c.reason)
        ).all() == [(0, 3, LOST_TO_RETENTION)]
    assert contiguous_end(engine, "t", 0, 0) == 6
    assert outcomes(engine)[0] == ["T2", "T3"]


def test_a_rerun_after_retention_reached_a_stored_batch_records_nothing_as_lost(
    tmp_path: Path,
) -> None:
    """Its messages were scored by the first run; the rerun only finds them gone."""
    engine = create_engine(f"sqlite:///{tmp_path / 'app.db'}")
    ensure_schema(engine)
    read = batch([10.0, 20.0, 30.0, 40.0])
    first = run(read, engine, ValidationLimits())
    later = RawBatch("t", 0, 0, 3, [3], read.timestamps_ms[3:], read.values[3:], (0, 2))

    again = run(later, engine, ValidationLimits())

    assert (first.inserted, again.inserted, again.lost_offsets) == (4, 0, 0)
    with engine.connect() as conn:
        assert conn.execute(sa.select(lost_ranges)).all() == []
    assert outcomes(engine)[0] == ["T0", "T1", "T2", "T3"]


def test_lost_offsets_outside_the_batch_are_refused(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'app.db'}")
    ensure_schema(engine)
    raw = batch([10.0])
    raw.deleted_by_retention = (0, 7)

    with pytest.raises(ValueError, match="outside the batch"):
        run(raw, engine, ValidationLimits())
