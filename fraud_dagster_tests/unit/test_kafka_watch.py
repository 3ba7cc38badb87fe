"""When the operators hear about an unreadable transaction topic: once per long outage, and
once when it is over; short blips stay quiet."""

from __future__ import annotations

from fraud_dagster import kafka_io
from fraud_dagster.alerts import render_kafka_notice
from fraud_dagster.errors import KafkaUnavailableError
from fraud_dagster.kafka_watch import KafkaNotice, KafkaWatch, observe

ALERT_AFTER = 300.0
T0 = 1_800_000_000.0


def looks(*steps: tuple[float, str | None]) -> list[KafkaNotice | None]:
    """The notices of a sequence of (seconds after T0, error or None) looks, each starting from
    the watch the previous one left."""
    watch, notices = KafkaWatch(), []
    for offset, error in steps:
        watch, notice = observe(
            KafkaWatch.parse(watch.serialize()), error, T0 + offset, ALERT_AFTER
        )
        notices.append(notice)
    return notices


def test_a_long_outage_gives_one_down_notice_at_the_threshold_and_one_back_notice() -> None:
    notices = looks((0, None), (10, "timeout"), (309, "timeout"), (310, "refused"), (900, None))
    assert notices[:3] == [None, None, None]
    down, back = notices[3], notices[4]
    assert down == KafkaNotice("down", T0 + 10, T0 + 310, "refused")
    assert back == KafkaNotice("back", T0 + 10, T0 + 900, "refused")


def test_later_looks_while_down_and_while_readable_say_nothing_more() -> None:
    notices = looks((0, "x"), (300, "x"), (330, "x"), (360, "x"), (390, None), (420, None))
    assert [n.kind if n else None for n in notices] == [None, "down", None, None, "back", None]


def test_a_blip_shorter_than_the_threshold_stays_quiet() -> None:
    assert looks((0, "timeout"), (60, None), (90, "timeout"), (120, None)) == [None] * 4


def test_an_outage_that_ends_unnoticed_but_lasted_long_enough_is_still_told() -> None:
    # e.g. the down notice could not be sent (SMTP down too) and the broker came back first
    watch, _ = observe(KafkaWatch(), "timeout", T0, ALERT_AFTER)
    _, notice = observe(watch, None, T0 + 400, ALERT_AFTER)
    assert notice is not None and notice.kind == "back"


def test_a_cursor_of_another_format_starts_a_fresh_watch() -> None:
    assert KafkaWatch.parse(None) == KafkaWatch()
    assert KafkaWatch.parse('{"0": 15}') == KafkaWatch()
    assert KafkaWatch.parse("not json") == KafkaWatch()


def test_notices_name_the_topic_the_outage_and_keep_one_message_id_per_outage() -> None:
    down = KafkaNotice("down", T0, T0 + 360, "KafkaUnavailableError: no broker\nsecond line")
    back = KafkaNotice("back", T0, T0 + 1200, down.error)
    first = render_kafka_notice(down, "transactions", "127.0.0.1:9092", "from@x", ["ops@x"])
    again = render_kafka_notice(down, "transactions", "127.0.0.1:9092", "from@x", ["ops@x"])
    over = render_kafka_notice(back, "transactions", "127.0.0.1:9092", "from@x", ["ops@x"])
    assert first["Message-ID"] == again["Message-ID"] != over["Message-ID"]
    assert first["Subject"] == (
        "[fraud-dagster] Kafka unreachable since 08:00 UTC: no transactions are being scored"
    )
    body = first.get_payload(decode=True).decode()
    expected = "transactions on 127.0.0.1:9092 cannot be read since 2027-01-15 08:00:00 UTC (6 min)"
    assert expected in " ".join(body.split())
    assert "  second line" in body
    assert over["Subject"].startswith("[fraud-dagster] Kafka reachable again after 20 min")


def test_a_deleted_topic_is_not_reported_as_a_broker_that_does_not_answer() -> None:
    """The broker answered; the topic was gone. "Nothing is lost" was false there: what no
    batch had stored went with the topic."""
    try:  # the error as the pipeline raises it
        kafka_io.partitions_of(_NoTopicConsumer(), "transactions")
    except KafkaUnavailableError as exc:
        error = f"{type(exc).__name__}: {exc}"
    down = KafkaNotice("down", T0, T0 + 360, error)
    message = render_kafka_notice(down, "transactions", "127.0.0.1:9092", "from@x", ["ops@x"])
    assert message["Subject"] == (
        "[fraud-dagster] Topic transactions missing since 08:00 UTC: no transactions are being "
        "scored"
    )
    body = " ".join(message.get_payload(decode=True).decode().split())
    assert "the broker answers, but the topic was deleted" in body
    assert "Nothing is lost" not in body


class _NoTopicConsumer:
    """A client whose broker has no such topic (pure logic: how the error is worded)."""

    def partitions_for_topic(self, topic: str) -> None:
        return None
