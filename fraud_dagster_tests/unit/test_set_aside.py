"""What is stored of a recreated topic's previous incarnation is set aside, once, so that the new
topic's messages are scored as themselves (SQLite; the real-broker path is test_topic_recreated)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from fraud_dagster.messages import ValidationLimits
from fraud_dagster.storage.batches import contiguous_end, set_aside_previous_topic
from fraud_dagster.storage.database import create_engine, ensure_schema
from fraud_dagster.storage.schema import (
    lost_ranges,
    rejected_transactions,
    scored_transactions,
    stored_ranges,
)
from fraud_dagster_tests.unit.stored_batches import batch, outcomes, run


@pytest.fixture
def engine(tmp_path: Path) -> sa.Engine:
    engine = create_engine(f"sqlite:///{tmp_path / 'app.db'}")
    ensure_schema(engine)
    yield engine
    engine.dispose()


def store_range(engine: sa.Engine, topic: str, first: int, last: int) -> None:
    with engine.begin() as conn:
        conn.execute(
            stored_ranges.insert(),
            {
                "source_topic": topic,
                "source_partition": 0,
                "first_offset": first,
                "last_offset": last,
                "stored_at": datetime(2026, 1, 1),
            },
        )


def topics(engine: sa.Engine, table: sa.Table) -> list[tuple[str, int]]:
    with engine.connect() as conn:
        query = sa.select(table.c.source_topic, table.c[_first_column(table)])
        return sorted((topic, int(offset)) for topic, offset in conn.execute(query))


def _first_column(table: sa.Table) -> str:
    return "first_offset" if "first_offset" in table.c else "source_offset"


def test_stored_ranges_are_kept_under_another_key_once(engine: sa.Engine) -> None:
    store_range(engine, "t", 0, 24)
    store_range(engine, "t", 25, 59)
    store_range(engine, "other", 0, 9)
    with engine.begin() as conn:  # offsets 0..9 of "t" were deleted by retention unread
        conn.execute(
            lost_ranges.insert(),
            {
                "source_topic": "t",
                "source_partition": 0,
                "first_offset": 0,
                "last_offset": 9,
                "reason": "deleted",
                "recorded_at": datetime(2026, 1, 1),
            },
        )
    assert contiguous_end(engine, "t", 0, 0) == 60

    assert set_aside_previous_topic(engine, "t", "8aae0904", with_rows=False).ranges == 2

    assert contiguous_end(engine, "t", 0, 0) == 0
    assert contiguous_end(engine, "other", 0, 0) == 10
    # Lost ranges go along: the new topic may lose offsets 0..9 too, and must record it.
    assert topics(engine, lost_ranges) == [("t@before-8aae0904", 0)]
    store_range(engine, "t", 0, 24)  # the new topic's first batch; then the same tag again
    assert set_aside_previous_topic(engine, "t", "8aae0904", with_rows=True).ranges == 0
    assert topics(engine, stored_ranges) == [
        ("other", 0),
        ("t", 0),
        ("t@before-8aae0904", 0),
        ("t@before-8aae0904", 25),
    ]
    assert contiguous_end(engine, "t", 0, 0) == 25  # the new topic's range still counts

    long_topic = "x" * 249
    store_range(engine, long_topic, 0, 1)
    assert set_aside_previous_topic(engine, long_topic, "t5dc", with_rows=False).ranges == 1
    (aside,) = {topic for topic, _ in topics(engine, stored_ranges)} - {
        "other",
        "t",
        "t@before-8aae0904",
    }
    assert len(aside) == 249 and aside.endswith("@before-t5dc")


def test_a_new_topic_id_sets_the_rows_aside_and_the_new_messages_are_scored_as_themselves(
    engine: sa.Engine,
) -> None:
    """Offsets 0..2 held old transactions (one of them bad); the new topic's offsets 0..2 hold
    new ones (a bad one at the old bad one's offset): each is scored, alerted or rejected as
    itself, none as a clash with the old row at its coordinates."""
    old = batch([10.0, 20.0, 30.0], id_prefix="old-")
    old.values[1] = b"{not json"
    run(old, engine, ValidationLimits())
    new = batch([11.0, 21.0, 31.0], id_prefix="new-")
    new.values[1] = b"[1, 2]"

    moved = set_aside_previous_topic(engine, "t", "8aae0904", with_rows=True)
    first, again = run(new, engine, ValidationLimits()), run(new, engine, ValidationLimits())

    assert (moved.ranges, moved.scored, moved.rejected) == (1, 2, 1)
    assert (first.inserted, first.rejected_inserted, first.duplicates_rejected) == (2, 1, 0)
    # A rerun of the new batch writes nothing (its rejection is ignored on its coordinates).
    assert (again.inserted, again.already_stored, again.rejected_inserted) == (0, 2, 0)
    assert outcomes(engine) == (
        ["new-0", "new-2", "old-0", "old-2"],
        ["", ""],
        ["new-0", "new-2", "old-0", "old-2"],
    )
    assert topics(engine, scored_transactions) == [
        ("t", 0),
        ("t", 2),
        ("t@before-8aae0904", 0),
        ("t@before-8aae0904", 2),
    ]
    with engine.connect() as conn:
        query = sa.select(rejected_transactions.c.source_topic, rejected_transactions.c.reason)
        reasons = {topic: reason for topic, reason in conn.execute(query)}
    assert "JSON object" in reasons["t"] and "malformed JSON" in reasons["t@before-8aae0904"]
    assert contiguous_end(engine, "t", 0, 0) == 3


def test_without_a_new_topic_id_the_rows_stay_and_the_old_messages_are_not_scored_twice(
    engine: sa.Engine,
) -> None:
    """Seen from the offsets alone it may be the same topic after a broker lost data: its first
    offsets hold the messages stored before, the later ones new messages."""
    old = batch([10.0, 20.0, 30.0], id_prefix="T")
    run(old, engine, ValidationLimits())
    after_the_loss = batch([10.0, 20.0, 31.0], id_prefix="T")
    after_the_loss.values[2] = after_the_loss.values[2].replace(b'"T2"', b'"N2"')

    moved = set_aside_previous_topic(engine, "t", "t19a0", with_rows=False)
    result = run(after_the_loss, engine, ValidationLimits())

    assert (moved.ranges, moved.scored, moved.rejected) == (1, 0, 0)
    assert (result.inserted, result.already_stored, result.duplicates_rejected) == (0, 2, 1)
    assert outcomes(engine) == (["T0", "T1", "T2"], ["N2"], ["T0", "T1", "T2"])
    assert contiguous_end(engine, "t", 0, 0) == 3


def test_a_set_aside_that_moved_nothing_is_still_done_once_for_its_tag(engine: sa.Engine) -> None:
    """The previous topic had stored nothing; the tick that set it aside launched the new
    topic's first batch, then died before saving its cursor, so the next tick sets aside the
    same tag again. Before: with no range under the new name to say it was done, that moved
    the new topic's own rows and range away (their run keys were used, so Dagster would never
    run them again)."""
    assert set_aside_previous_topic(engine, "t", "8aae0904", with_rows=True).ranges == 0
    run(batch([10.0, 20.0]), engine, ValidationLimits())  # the new topic's first batch

    again = set_aside_previous_topic(engine, "t", "8aae0904", with_rows=True)

    assert (again.ranges, again.scored, again.rejected) == (0, 0, 0)
    assert topics(engine, scored_transactions) == [("t", 0), ("t", 1)]
    assert contiguous_end(engine, "t", 0, 0) == 2
    # a topic name so long that the mark's name must be a digest still gets its mark
    long_topic = "x" * 240
    assert set_aside_previous_topic(engine, long_topic, "8aae0904", with_rows=True).ranges == 0
    store_range(engine, long_topic, 0, 4)
    assert set_aside_previous_topic(engine, long_topic, "8aae0904", with_rows=True).ranges == 0
