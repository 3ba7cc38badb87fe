"""The sensor's arithmetic: offsets to batches and cursor, without Kafka."""

from __future__ import annotations

import pytest

from fraud_dagster.batching import SensorCursor, plan_batches


def ranges(plan) -> list[tuple[int, int, int]]:
    return [(b.partition, b.first_offset, b.last_offset) for b in plan.batches]


def test_first_tick_starts_at_committed_offset_or_beginning() -> None:
    plan = plan_batches(SensorCursor("t"), {0: 0, 1: 5}, {0: 10, 1: 12}, {0: 4}, 100, 10)
    assert ranges(plan) == [(0, 4, 9), (1, 5, 11)]
    assert plan.cursor.next_offsets == {0: 10, 1: 12}


def test_batches_are_capped_and_round_robin() -> None:
    plan = plan_batches(SensorCursor("t", {0: 0, 1: 0}), {}, {0: 25, 1: 3}, {}, 10, 3)
    assert ranges(plan) == [(0, 0, 9), (1, 0, 2), (0, 10, 19)]
    assert plan.cursor.next_offsets == {0: 20, 1: 3}
    assert plan.backlog_messages == 5
    follow_up = plan_batches(plan.cursor, {}, {0: 25, 1: 3}, {}, 10, 3)
    assert ranges(follow_up) == [(0, 20, 24)]


def test_nothing_new_keeps_the_cursor() -> None:
    cursor = SensorCursor("t", {0: 7})
    plan = plan_batches(cursor, {0: 0}, {0: 7}, {}, 10, 10)
    assert plan.batches == []
    assert plan.cursor.serialize() == cursor.serialize()


def test_new_partition_is_picked_up() -> None:
    plan = plan_batches(SensorCursor("t", {0: 7}), {0: 0, 1: 0}, {0: 7, 1: 2}, {}, 10, 10)
    assert ranges(plan) == [(1, 0, 1)]


def test_cursor_past_the_end_restarts_with_a_note() -> None:
    plan = plan_batches(SensorCursor("t", {0: 50}), {0: 0}, {0: 5}, {}, 10, 10)
    assert ranges(plan) == [(0, 0, 4)]
    assert "recreated" in plan.notes[0]


def test_run_keys_and_tags() -> None:
    (batch,) = plan_batches(SensorCursor("tx"), {0: 0}, {0: 3}, {}, 10, 10).batches
    assert batch.run_key == "tx/0/0-2"
    assert batch.tags()["fraud_dagster/offset_range"] == "0-2"
    assert batch.tags()["fraud_dagster/topic_partition"] == "tx/0"


def test_cursor_round_trip_and_other_topic() -> None:
    cursor = SensorCursor("a", {0: 3, 2: 9})
    assert SensorCursor.parse(cursor.serialize(), "a") == cursor
    assert SensorCursor.parse(cursor.serialize(), "b").next_offsets == {}


def test_rejects_nonsense_limits() -> None:
    with pytest.raises(ValueError):
        plan_batches(SensorCursor("t"), {}, {0: 1}, {}, 0, 1)


def test_busy_partitions_wait_and_then_take_everything() -> None:
    cursor = SensorCursor("t", {0: 0, 1: 0})
    plan = plan_batches(cursor, {}, {0: 30, 1: 4}, {}, 100, 10, busy_partitions={0})
    assert ranges(plan) == [(1, 0, 3)]
    assert plan.cursor.next_offsets == {0: 0, 1: 4}
    later = plan_batches(plan.cursor, {}, {0: 55, 1: 4}, {}, 100, 10, busy_partitions=set())
    assert ranges(later) == [(0, 0, 54)]
