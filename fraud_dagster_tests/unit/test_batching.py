"""The sensor's arithmetic: offsets to batches and cursor, without Kafka."""

from __future__ import annotations

import pytest

from fraud_dagster.batching import (
    TAG_TOPIC_ID,
    PlannedBatch,
    SensorCursor,
    batch_config_problem,
    new_key_tag,
    past_launched_ranges,
    plan_batches,
)


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


def test_cursor_past_the_end_restarts_with_a_note_and_new_run_keys() -> None:
    """Without topic ids (brokers before 2.8) a cursor past the end is the only sign."""
    plan = plan_batches(SensorCursor("t", {0: 50}), {0: 0}, {0: 5}, {}, 10, 10, now=1.5)
    assert ranges(plan) == [(0, 0, 4)]
    assert "recreated" in plan.notes[0]
    assert plan.recreated
    assert not plan.new_topic_id  # perhaps the same topic after a broker lost data
    assert [b.run_key for b in plan.batches] == ["t@t5dc/0/0-4"]  # 1500 ms, base 16


def test_a_new_topic_id_restarts_every_partition_at_its_beginning_under_new_run_keys() -> None:
    """The new end may lie past the cursor: the offsets alone would not show the recreation."""
    cursor = SensorCursor("t", {0: 30, 1: 8}, topic_id="11111111-aaaa-bbbb-cccc-000000000000")
    new_id = "8aae0904-3595-45d7-814d-1674549a09d2"
    plan = plan_batches(cursor, {0: 0, 1: 0}, {0: 50, 1: 3}, {0: 30}, 25, 10, topic_id=new_id)
    assert plan.recreated and plan.new_topic_id
    assert "recreated" in plan.notes[0] and new_id in plan.notes[0]
    assert ranges(plan) == [(0, 0, 24), (1, 0, 2), (0, 25, 49)]
    assert [b.run_key for b in plan.batches][:2] == ["t@8aae0904/0/0-24", "t@8aae0904/1/0-2"]
    assert plan.batches[0].tags()[TAG_TOPIC_ID] == new_id
    assert plan.batches[0].tags()["fraud_dagster/topic_partition"] == "t/0"  # limits unchanged
    assert (plan.cursor.topic_id, plan.cursor.key_tag) == (new_id, "8aae0904")

    later = plan_batches(plan.cursor, {0: 0, 1: 0}, {0: 60, 1: 3}, {}, 25, 10, topic_id=new_id)
    assert not later.recreated and not later.new_topic_id and later.notes == []
    assert [b.run_key for b in later.batches] == ["t@8aae0904/0/50-59"]


def test_the_same_topic_id_keeps_the_cursor_and_plain_run_keys() -> None:
    same = "8aae0904-3595-45d7-814d-1674549a09d2"
    plan = plan_batches(
        SensorCursor("t", {0: 7}, topic_id=same), {0: 0}, {0: 9}, {}, 10, 10, topic_id=same
    )
    assert not plan.recreated and not plan.new_topic_id
    assert [b.run_key for b in plan.batches] == ["t/0/7-8"]


def test_a_cursor_past_the_end_under_the_same_topic_id_restarts_but_is_no_new_topic() -> None:
    """The broker lost data (an unclean leader election): the same topic, shorter. Its stored
    rows stay where they are, so its first offsets, read again, are found stored."""
    same = "8aae0904-3595-45d7-814d-1674549a09d2"
    cursor = SensorCursor("t", {0: 50}, topic_id=same)
    plan = plan_batches(cursor, {0: 0}, {0: 30}, {}, 100, 10, topic_id=same, now=1.5)
    assert plan.recreated and not plan.new_topic_id
    assert ranges(plan) == [(0, 0, 29)]


def test_a_cursor_from_before_topic_ids_adopts_the_id_without_restarting() -> None:
    old_format = SensorCursor.parse('{"topic": "t", "next_offsets": {"0": 7}}', "t")
    assert not old_format.is_fresh
    plan = plan_batches(old_format, {0: 0}, {0: 9}, {}, 10, 10, topic_id="abc")
    assert not plan.recreated and ranges(plan) == [(0, 7, 8)]
    assert plan.cursor.topic_id == "abc" and plan.cursor.key_tag == ""


def test_a_reset_cursor_whose_earlier_runs_carry_no_topic_id_starts_at_the_commit() -> None:
    """What the sensor makes of a reset cursor whose earlier runs (from before topic ids were
    recorded) say no id: not a recreation (that would read the whole topic again); the
    committed offsets decide, under the cursor's new run-key tag."""
    cursor = SensorCursor("t", {}, None, "t1")
    plan = plan_batches(cursor, {0: 0}, {0: 9}, {0: 5}, 10, 10, topic_id="8aae0904-35")
    assert not plan.recreated and ranges(plan) == [(0, 5, 8)]
    assert plan.batches[0].run_key == "t@t1/0/5-8"
    assert plan.cursor.topic_id == "8aae0904-35"


def test_committed_offset_past_the_end_starts_at_the_beginning() -> None:
    """A commit past the end was made on a previous topic of the same name: starting there
    would skip the new topic's offsets below it."""
    plan = plan_batches(SensorCursor("t"), {0: 0}, {0: 50}, {0: 100}, 50, 10)
    assert ranges(plan) == [(0, 0, 49)]
    assert "past the end" in plan.notes[0]
    assert not plan.recreated


def test_offsets_deleted_by_retention_start_the_next_batch_and_do_not_count_towards_its_size() -> (
    None
):
    """The batch records them as lost (so the group can be committed past them) and reads a
    full batch of what is still there."""
    plan = plan_batches(SensorCursor("t", {0: 10}), {0: 40}, {0: 100}, {}, 20, 10)
    assert ranges(plan) == [(0, 10, 59), (0, 60, 79), (0, 80, 99)]
    assert plan.notes == [
        "partition 0: offsets 10..39 were deleted by retention before they were read; the next "
        "batch records them as lost"
    ]
    everything_gone = plan_batches(SensorCursor("t", {0: 10}), {0: 100}, {0: 100}, {}, 20, 10)
    assert ranges(everything_gone) == [(0, 10, 99)]
    from_the_commit = plan_batches(SensorCursor("t"), {0: 40}, {0: 100}, {0: 5}, 20, 1)
    assert ranges(from_the_commit) == [(0, 5, 59)]


def test_a_recreation_under_a_topic_id_seen_before_gets_a_time_tag_not_the_ids_own() -> None:
    """The broker lost data twice under the same id (or once, then the cursor was reset): the
    id's own tag may have been given out already, and Dagster skips every run key it made.
    Before: the second recreation got the id's tag again (it only avoided the cursor's tag)."""
    same = "8aae0904-3595-45d7-814d-1674549a09d2"
    first = plan_batches(
        SensorCursor("t", {0: 50}, same), {0: 0}, {0: 30}, {}, 10, 5, topic_id=same, now=1.0
    )
    reset = SensorCursor("t", first.cursor.next_offsets, same, new_key_tag(None, "", 2.0))
    second = plan_batches(reset, {0: 0}, {0: 20}, {}, 10, 5, topic_id=same, now=3.0)
    tags = [first.cursor.key_tag, reset.key_tag, second.cursor.key_tag]
    assert tags == ["t3e8", "t7d0", "tbb8"]  # never "8aae0904", which a new id would get
    new_id = plan_batches(
        second.cursor, {0: 0}, {0: 5}, {}, 10, 5, topic_id="77" + same[2:], now=4.0
    )
    assert new_id.new_topic_id and new_id.cursor.key_tag == "77ae0904"


def test_new_key_tags_never_repeat_the_previous_one() -> None:
    assert new_key_tag("8aae0904-3595", "", 0) == "8aae0904"
    assert new_key_tag("8aae0904-3595", "8aae0904", 2.0) == "t7d0"
    assert new_key_tag(None, "", 2.0) == "t7d0"


def test_run_keys_and_tags() -> None:
    (batch,) = plan_batches(SensorCursor("tx"), {0: 0}, {0: 3}, {}, 10, 10).batches
    assert batch.run_key == "tx/0/0-2"
    assert batch.tags()["fraud_dagster/offset_range"] == "0-2"
    assert batch.tags()["fraud_dagster/topic_partition"] == "tx/0"


def test_cursor_round_trip_and_other_topic() -> None:
    cursor = SensorCursor("a", {0: 3, 2: 9})
    assert SensorCursor.parse(cursor.serialize(), "a") == cursor
    assert SensorCursor.parse(cursor.serialize(), "a").is_fresh is False
    tagged = SensorCursor("a", {0: 3}, "8aae0904-3595", "8aae0904")
    assert SensorCursor.parse(tagged.serialize(), "a") == tagged
    assert SensorCursor.parse(None, "a").is_fresh
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


def test_an_interrupted_tick_s_launched_ranges_move_the_cursor_it_could_not_save() -> None:
    saved = SensorCursor("t", {0: 153, 1: 128}, "id", "")
    interrupted = plan_batches(saved, {}, {0: 180, 1: 148}, {}, 40, 10)
    launched = [batch.run_key for batch in interrupted.batches]
    assert launched == ["t/0/153-179", "t/1/128-147"]

    recovered = past_launched_ranges(saved, [*launched, "t/0/100-152"])
    assert recovered.next_offsets == interrupted.cursor.next_offsets == {0: 180, 1: 148}
    after_restart = plan_batches(recovered, {}, {0: 193, 1: 168}, {}, 40, 10)
    assert ranges(after_restart) == [(0, 180, 192), (1, 148, 167)]  # no range planned twice
    # Without it the restarted daemon planned 153-192 and 128-167: overlapping, other run keys.
    assert ranges(plan_batches(saved, {}, {0: 193, 1: 168}, {}, 40, 10)) == [
        (0, 153, 192),
        (1, 128, 167),
    ]


def test_launched_ranges_of_other_topics_incarnations_or_partitions_do_not_move_the_cursor() -> (
    None
):
    cursor = SensorCursor("t", {0: 10}, "id", "abc")
    keys = [
        "t/0/10-99",  # the previous incarnation (no tag)
        "t@old/0/10-99",  # another incarnation
        "tt@abc/0/10-99",  # another topic
        "t@abc/1/0-99",  # a partition the cursor does not hold (a fresh one starts at the commit)
        "t@abc/0/garbage",
        "",
        "t@abc/0/3-5",  # behind the cursor: it never moves back
    ]
    assert past_launched_ranges(cursor, keys).next_offsets == {0: 10}
    assert past_launched_ranges(cursor, [*keys, "t@abc/0/10-19"]).next_offsets == {0: 20}


def test_a_batch_range_is_read_only_as_planned() -> None:
    tags = PlannedBatch("tx", 1, 100, 199).tags()
    assert batch_config_problem("tx", 1, 100, 199, tags) is None
    assert batch_config_problem("tx", 1, 0, 0, {}) is None  # launched by hand, without tags
    assert "partitions count from 0" in str(batch_config_problem("tx", -1, 0, 5, {}))
    assert "offsets count from 0" in str(batch_config_problem("tx", 0, -5, 5, {}))
    assert "before first_offset 6" in str(batch_config_problem("tx", 0, 6, 5, {}))
    for topic, partition, first, last in [
        ("other", 1, 100, 199),
        ("tx", 0, 100, 199),
        ("tx", 1, 101, 199),
        ("tx", 1, 100, 150),
    ]:
        problem = batch_config_problem(topic, partition, first, last, tags)
        assert problem is not None
        assert problem.startswith(f"the run's config says {topic}/{partition} offsets")
        assert "its tags say tx/1 offsets 100..199" in problem
