"""The run-status email sensors' cursor (pure logic): records that appear out of id order."""

from fraud_dagster.event_cursor import SETTLE_SECONDS, RunEventCursor


def test_a_record_that_appears_below_a_handled_one_is_still_new() -> None:
    cursor = RunEventCursor(10).with_handled(12, now=100.0)
    cursor = cursor.settled([12], truncated=False, now=101.0)  # 11 not committed yet

    assert cursor.watermark == 10
    assert cursor.is_new(11)
    assert not cursor.is_new(12)
    assert not cursor.is_new(10)


def test_the_watermark_moves_past_a_handled_record_once_it_settled() -> None:
    cursor = RunEventCursor(10).with_handled(11, now=100.0).with_handled(12, now=100.0)

    early = cursor.settled([11, 12], truncated=False, now=100.0 + SETTLE_SECONDS - 1)
    late = cursor.settled([11, 12], truncated=False, now=100.0 + SETTLE_SECONDS)

    assert (early.watermark, set(early.handled)) == (10, {11, 12})
    assert (late.watermark, dict(late.handled)) == (12, {})


def test_the_watermark_stays_below_a_record_read_but_not_mailed() -> None:
    """12 was mailed long ago; 11 appeared later and its email failed: 11 stays new however old
    12 is."""
    cursor = RunEventCursor(10).with_handled(12, now=0.0)

    settled = cursor.settled([11, 12], truncated=False, now=10 * SETTLE_SECONDS)

    assert settled.watermark == 10
    assert settled.is_new(11)
    assert not settled.is_new(12)


def test_a_truncated_read_keeps_the_watermark_at_or_below_its_last_record() -> None:
    cursor = RunEventCursor(0).with_handled(1, 0.0).with_handled(2, 0.0).with_handled(9, 0.0)

    settled = cursor.settled([1, 2], truncated=True, now=10 * SETTLE_SECONDS)

    assert settled.watermark == 2
    assert dict(settled.handled) == {9: 0.0}


def test_the_read_limit_leaves_room_for_the_handled_records_it_reads_again() -> None:
    cursor = RunEventCursor(0).with_handled(1, 0.0).with_handled(2, 0.0)

    assert cursor.read_limit(20) == 22


def test_the_cursor_round_trips_and_reads_the_earlier_bare_storage_id() -> None:
    cursor = RunEventCursor(7).with_handled(9, 12.5)

    assert RunEventCursor.parse(cursor.serialize()) == cursor
    assert RunEventCursor.parse("41") == RunEventCursor(41)
    assert RunEventCursor.parse(None) is None
    assert RunEventCursor.parse("not a cursor") is None
    assert RunEventCursor.parse('{"watermark": 3}') is None
