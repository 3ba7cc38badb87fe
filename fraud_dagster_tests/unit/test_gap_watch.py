"""When an unstored offset range is mailed to the operators, and what the email says (pure; the
sensor against a real broker, database and SMTP server is in test_stream_status)."""

from __future__ import annotations

import email
import email.policy
from datetime import UTC, datetime, timedelta

from fraud_dagster.alerts import render_unstored_notice
from fraud_dagster.batch_order import RunningBatch
from fraud_dagster.gap_watch import GapWatch, gaps_to_mail
from fraud_dagster.kafka_io import Retention
from fraud_dagster.storage.outbox import OutboxStatus
from fraud_dagster.stream_status import Gap, PartitionStatus, StreamStatus

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
WEEK = timedelta(days=7)
HOUR = timedelta(hours=1)


def gap(first: int, produced_ago: timedelta | None, deleted: int = 0) -> Gap:
    if produced_ago is None:
        return Gap(first, first + 9, deleted=10)
    produced = NOW - produced_ago
    return Gap(first, first + 9, deleted, produced, produced + WEEK)


WEEK_RETENTION = Retention(604800000)


def status(*gaps: Gap, retention: Retention = WEEK_RETENTION) -> StreamStatus:
    partition = PartitionStatus(0, 0, 1000, 0, 0, 1000, gaps=list(gaps))
    return StreamStatus(
        "tx", "g", [partition], OutboxStatus({}, 0, None, None, None, None), retention
    )


def kinds(notices: list) -> list[tuple[int, str]]:
    return [(n.gap.first, n.kind) for n in notices]


def test_a_range_is_mailed_once_it_is_old_enough_and_only_once() -> None:
    young, old = gap(10, timedelta(minutes=5)), gap(30, 2 * HOUR)

    watch, notices = gaps_to_mail(GapWatch(), status(young, old), NOW, HOUR)
    again, more = gaps_to_mail(GapWatch.parse(watch.serialize()), status(young, old), NOW, HOUR)

    assert kinds(notices) == [(30, "unstored")]
    assert more == [] and again == watch


def test_a_last_call_a_day_before_retention_and_a_notice_once_it_deleted_the_range() -> None:
    watch, _ = gaps_to_mail(GapWatch(), status(gap(30, 2 * HOUR)), NOW, HOUR)

    watch, last_call = gaps_to_mail(watch, status(gap(30, WEEK - 3 * HOUR)), NOW, HOUR)
    watch, deleted = gaps_to_mail(watch, status(gap(30, None)), NOW, HOUR)
    _, nothing = gaps_to_mail(watch, status(gap(30, None)), NOW, HOUR)

    assert kinds(last_call) == [(30, "last_call")]
    assert kinds(deleted) == [(30, "deleted")]
    assert nothing == []


def test_a_rerun_range_leaves_the_cursor_and_a_new_failure_at_the_same_place_is_mailed_again() -> (
    None
):
    watch, _ = gaps_to_mail(GapWatch(), status(gap(30, 2 * HOUR)), NOW, HOUR)

    cleared, _ = gaps_to_mail(watch, status(), NOW, HOUR)
    _, notices = gaps_to_mail(cleared, status(gap(30, 2 * HOUR)), NOW, HOUR)

    assert cleared.mailed == frozenset()
    assert kinds(notices) == [(30, "unstored")]


def test_the_email_names_each_range_its_deadline_and_what_to_do() -> None:
    _, notices = gaps_to_mail(GapWatch(), status(gap(10, 2 * HOUR), gap(30, None)), NOW, HOUR)

    raw = render_unstored_notice(notices, "tx", WEEK_RETENTION, "from@x", ["ops@x"]).as_bytes()
    message = email.message_from_bytes(raw, policy=email.policy.default)
    body = message.get_content()

    assert message["To"] == "ops@x"
    assert message["Subject"] == (
        "[fraud-dagster] 2 offset range(s) of tx not stored: retention deleted one "
        "(partition 0 offsets 10-19, ...)"
    )
    assert "Partition 0, offsets 10-19 (10): not stored" in body
    assert "retention may delete it from 2026-12-07 10:00 UTC" in body
    assert "Partition 0, offsets 30-39 (10): deleted by retention unread" in body
    assert "fraud_dagster/first_offset=30" in body and "Re-execute > From" in body
    assert "The topic's retention.ms is 604800000." in body and "retention.bytes" not in body
    assert message["X-Fraud-Unstored-Notice"] == "0/10/unstored,0/30/deleted"


def test_the_subject_names_the_most_urgent_range_wherever_it_stands() -> None:
    """A last call behind an ordinary unstored range used to leave "last call" out."""
    _, notices = gaps_to_mail(
        GapWatch(), status(gap(10, 2 * HOUR), gap(30, WEEK - HOUR)), NOW, HOUR
    )
    assert kinds(notices) == [(10, "unstored"), (30, "last_call")]
    raw = render_unstored_notice(notices, "tx", WEEK_RETENTION, "from@x", ["ops@x"]).as_bytes()
    subject = email.message_from_bytes(raw, policy=email.policy.default)["Subject"]
    assert "2 offset range(s) of tx not stored: last call before retention" in subject


MIB = 1024 * 1024


def test_a_partition_near_its_size_limit_makes_the_notice_a_last_call_that_says_why() -> None:
    young_range = gap(30, 2 * HOUR)  # six days and more before its age deadline
    roomy = Retention(WEEK_RETENTION.ms, 10 * MIB, {0: 8 * MIB})  # 80 % of retention.bytes
    full = Retention(WEEK_RETENTION.ms, 10 * MIB, {0: 9 * MIB + 1})  # past 90 %

    watch, first = gaps_to_mail(GapWatch(), status(young_range, retention=roomy), NOW, HOUR)
    _, last_call = gaps_to_mail(watch, status(young_range, retention=full), NOW, HOUR)
    _, unknown = gaps_to_mail(
        GapWatch(), status(young_range, retention=Retention(WEEK_RETENTION.ms, 10 * MIB)), NOW, HOUR
    )  # the broker would not say the partition's size: no last call on a guess

    assert kinds(first) == [(30, "unstored")] and kinds(unknown) == [(30, "unstored")]
    assert kinds(last_call) == [(30, "last_call")]
    raw = render_unstored_notice(last_call, "tx", full, "from@x", ["ops@x"]).as_bytes()
    body = email.message_from_bytes(raw, policy=email.policy.default).get_content()
    assert "Partition 0, offsets 30-39 (10): LAST CALL, retention may delete it soon" in body
    assert (
        "  retention.bytes limits the partition to 10.0 MiB (9.0 MiB now, 90% of it): past "
        "that, retention deletes its oldest segments whatever their age"
    ) in body
    assert "The topic's retention.ms is 604800000 and retention.bytes is 10485760." in body


def test_a_range_the_size_limit_reaches_within_a_day_is_a_last_call_on_a_roomy_partition() -> None:
    """A partition far below its limit that fills it in hours (a burst) deletes a range days
    before its age deadline: the last call comes a day before the size deadline too."""
    produced = NOW - 2 * HOUR
    rate = 10 * MIB / (20 * HOUR).total_seconds()  # 10 MiB in 20 hours
    filling = Retention(WEEK_RETENTION.ms, 10 * MIB, {0: 2 * MIB}, {0: rate})  # 20 % full
    age = filling.size_limit_age(0)
    assert age == 20 * HOUR
    soon = Gap(30, 39, 0, produced, produced + WEEK, size_deadline=produced + age)
    later = Gap(30, 39, 0, produced, produced + WEEK, size_deadline=produced + 3 * age)

    _, last_call = gaps_to_mail(GapWatch(), status(soon, retention=filling), NOW, HOUR)
    _, not_yet = gaps_to_mail(GapWatch(), status(later, retention=filling), NOW, HOUR)

    assert kinds(last_call) == [(30, "last_call")] and kinds(not_yet) == [(30, "unstored")]
    raw = render_unstored_notice(last_call, "tx", filling, "from@x", ["ops@x"]).as_bytes()
    body = email.message_from_bytes(raw, policy=email.policy.default).get_content()
    assert "Partition 0, offsets 30-39 (10): LAST CALL, retention may delete it soon" in body
    assert "  retention may delete it from 2026-12-07 10:00 UTC" in body.splitlines()
    assert (
        "(2.0 MiB now, 20% of it, growing by about 512.0 KiB an hour): past that" in body
        and "  at that rate, retention.bytes may delete this range from 2026-12-01 06:00 UTC on"
        in body.splitlines()
    )


def test_a_range_a_run_is_working_on_waits_and_keeps_what_was_mailed_about_it() -> None:
    old = gap(30, 2 * HOUR)  # after an outage a retry's messages are old at once
    watch, notices = gaps_to_mail(
        GapWatch(), status(old), NOW, HOUR, in_flight=[RunningBatch(35, 39, "r1", 0)]
    )
    assert notices == [] and watch.mailed == frozenset()

    watch, _ = gaps_to_mail(GapWatch(), status(old), NOW, HOUR)
    kept, notices = gaps_to_mail(
        watch, status(old), NOW, HOUR, in_flight=[RunningBatch(30, 39, "r2", 0)]
    )
    _, mailed = gaps_to_mail(
        GapWatch(), status(old), NOW, HOUR, [RunningBatch(30, 39, "r3", 1)]
    )  # another partition

    assert notices == [] and kept == watch
    assert kinds(mailed) == [(30, "unstored")]
