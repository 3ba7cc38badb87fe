"""The transaction topic deleted and recreated under the running pipeline (an operator action).

The new topic's offsets start at 0 again, at coordinates the previous topic's messages are stored
under. Every message of the new topic must still be read and stored exactly once, as itself:
scored and alerted, or rejected with its own reason (not as a clash with the previous topic's row
at its coordinates); the previous topic's rows are kept, under `<topic>@before-<tag>`; and the
consumer group must be committed exactly as far as the new topic is stored.

Runs go through a real broker and a real Dagster instance; the sensor's run requests are submitted
as the sensor daemon submits them: a request whose run key an earlier run of the sensor already
used is skipped (dagster/_daemon/sensor.py, `_get_or_create_sensor_run`) while the tick's cursor
is saved all the same.
"""

from __future__ import annotations

import time

import dagster as dg
import pytest
from kafka.admin import NewTopic
from kafka.errors import KafkaError

from fraud_dagster.definitions import build_definitions
from fraud_dagster.errors import KafkaUnavailableError
from fraud_dagster.kafka_io import offset_bounds
from fraud_dagster.producer import synthetic_transactions
from fraud_dagster.resources import resolved_resources
from fraud_dagster.sensors import run_failure_notice
from fraud_dagster.settings import Settings, load_settings
from fraud_dagster.simulator import to_messages
from fraud_dagster.storage import schema
from fraud_dagster.storage.database import create_engine, ensure_schema
from fraud_dagster_tests.helpers import (
    RUN_KEY_TAG,
    MailBox,
    admin_client,
    evaluate_sensor,
    produce,
    suspicious_ids,
    table_rows,
    tick_and_run,
)

pytestmark = pytest.mark.services


def topic_id(settings: Settings) -> str:
    """The topic's id (KIP-516), as the broker describes it."""
    admin = admin_client(settings)
    try:
        return str(admin.describe_topics([settings.kafka_topic])[0]["topic_id"])
    finally:
        admin.close()


def recreate_topic(settings: Settings) -> None:
    """Delete the topic and create it again (new topic id, offsets from 0), as an operator does."""
    options = resolved_resources(settings)["kafka"].client_options()
    before = topic_id(settings)
    admin = admin_client(settings)
    try:
        admin.delete_topics([settings.kafka_topic])
        deadline = time.monotonic() + 60
        while True:  # the deletion finishes in the background
            try:
                admin.create_topics([NewTopic(settings.kafka_topic, 1, 1)])
                break
            except KafkaError:
                assert time.monotonic() < deadline, "the topic was not deleted within 60 s"
                time.sleep(0.2)
    finally:
        admin.close()
    deadline = time.monotonic() + 60
    while True:
        try:
            if offset_bounds(options, settings.kafka_topic) == ({0: 0}, {0: 0}):
                break
        except KafkaUnavailableError:
            pass
        assert time.monotonic() < deadline, "the recreated topic did not answer within 60 s"
        time.sleep(0.2)
    assert topic_id(settings) != before


def outcomes(database_url: str, transaction_id: str) -> list[tuple[str, str, int, str]]:
    """Where a transaction id is stored: (table, topic, offset, reason) for every row of it."""
    scored = [
        ("scored", row["source_topic"], row["source_offset"], "")
        for row in table_rows(database_url, schema.scored_transactions)
        if row["transaction_id"] == transaction_id
    ]
    rejected = [
        ("rejected", row["source_topic"], row["source_offset"], row["reason"])
        for row in table_rows(database_url, schema.rejected_transactions)
        if row["transaction_id"] == transaction_id
    ]
    return scored + rejected


def with_a_bad_message_at(messages: list[dict], offset: int, tag: str) -> list[dict]:
    """The messages with the one at `offset` made invalid (a negative amount)."""
    messages[offset] = {
        **messages[offset],
        "transaction_id": f"bad-{tag}",
        "transaction_amount": -1,
    }
    return messages


@pytest.mark.parametrize(
    ("before", "after", "reset_cursor"),
    [
        # The new end (40) lies below the cursor (60): restarted at 0, batch 0-24 as before.
        pytest.param(60, 40, False, id="new-end-below-cursor"),
        # The new end (50) lies past the cursor (30): nothing in the offsets says "recreated".
        pytest.param(30, 50, False, id="new-end-past-cursor"),
        # The sensor's cursor reset as well (a fresh cursor, as after a sensor reset).
        pytest.param(60, 40, True, id="cursor-reset-too"),
    ],
)
def test_every_message_of_the_recreated_topic_is_stored_once_and_committed(
    instance: dg.DagsterInstance,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    before: int,
    after: int,
    reset_cursor: bool,
    settings: Settings,
    mailbox: MailBox,
) -> None:
    monkeypatch.setenv("FRAUD_MAX_BATCH_SIZE", "25")
    settings = load_settings()
    defs = build_definitions(settings)
    kafka = resolved_resources(settings)["kafka"]

    bad_offset = 7  # a bad message at the same offset of both topics
    old = with_a_bad_message_at(to_messages(synthetic_transactions(before, seed=31)), 7, "old")
    produce(settings, old)
    cursor, executed, skipped = tick_and_run(defs, settings, instance, cursor=None)
    assert skipped == [] and len(executed) == -(-before // 25)
    assert kafka.committed_offsets() == {0: before}
    old_alerts = len(suspicious_ids(database_url))

    recreate_topic(settings)
    new = to_messages(synthetic_transactions(after, seed=32))
    for message in new:
        message["transaction_id"] = f"new-{message['transaction_id']}"
    new = with_a_bad_message_at(new, bad_offset, "new")
    for offset in (3, 30):  # at the previous topic's coordinates; above 220 the simulator's fraud
        new[offset]["transaction_amount"] = 900.0
    produce(settings, new)

    cursor, executed, skipped = tick_and_run(
        defs, settings, instance, cursor=None if reset_cursor else cursor
    )
    cursor, more, skipped_later = tick_and_run(defs, settings, instance, cursor=cursor)

    # Every violation is collected, so that a failure shows all of them at once.
    problems = []
    if skipped or skipped_later:
        problems.append(f"run keys used before, so never run: {skipped + skipped_later}")
    if more:
        problems.append(f"a second tick found more batches: {more}")
    topic = settings.kafka_topic
    for offset, message in enumerate(new):
        stored = outcomes(database_url, message["transaction_id"])
        expected = ("rejected" if offset == bad_offset else "scored", topic, offset)
        if len(stored) != 1:
            problems.append(f"new offset {offset} stored {len(stored)} times: {stored}")
        elif stored[0][:3] != expected or (
            offset == bad_offset and "transaction_amount" not in stored[0][3]
        ):
            problems.append(f"new offset {offset} stored as {stored[0]}, not {expected}")
    set_aside = {f"{topic}@before-{run.split('/')[0].split('@')[1]}" for run in executed}
    for offset, message in enumerate(old):  # the previous topic's rows are kept, set aside
        stored = outcomes(database_url, message["transaction_id"])
        table = "rejected" if offset == bad_offset else "scored"
        if [(t, o) for t, tp, o, _ in stored if tp in set_aside] != [(table, offset)]:
            problems.append(f"old offset {offset} not kept under {set_aside}: {stored}")
    new_suspicious = {i for i in suspicious_ids(database_url) if i.startswith("new-")}
    mailed = mailbox.wait_for(old_alerts + len(new_suspicious))
    mailed_new = [
        m["X-Fraud-Transaction-Id"]
        for m in mailed
        if m["X-Fraud-Transaction-Id"].startswith("new-")
    ]
    if not new_suspicious or sorted(mailed_new) != sorted(new_suspicious):
        problems.append(f"new suspicious {sorted(new_suspicious)}, mailed {sorted(mailed_new)}")
    committed = kafka.committed_offsets()
    if committed != {0: after}:
        problems.append(f"consumer group committed at {committed}, not {{0: {after}}}")
    new_runs = [
        run for key in executed for run in instance.get_runs(dg.RunsFilter(tags={RUN_KEY_TAG: key}))
    ]
    if {run.tags.get("fraud_dagster/topic_id") for run in new_runs} != {topic_id(settings)}:
        problems.append("the new runs are not tagged with the new topic id")
    assert not problems, "\n".join(problems)


@pytest.mark.backends("sqlite")  # only the broker is asked
def test_a_batch_of_a_deleted_topic_or_a_missing_partition_fails_saying_which(
    settings: Settings,
) -> None:
    """An operator's rerun of a batch whose topic was deleted since (or recreated with fewer
    partitions) must fail with what is missing, not with a client timeout after 30 s an attempt."""
    kafka = resolved_resources(settings)["kafka"]
    options = kafka.client_options()
    produce(settings, to_messages(synthetic_transactions(5, seed=21)))
    assert len(kafka.read_range(settings.kafka_topic, 0, 0, 4)) == 5

    with pytest.raises(KafkaUnavailableError, match=r"has no partition 3 on the broker"):
        kafka.read_range(settings.kafka_topic, 3, 0, 4)

    admin = admin_client(settings)
    try:
        admin.delete_topics([settings.kafka_topic])
    finally:
        admin.close()
    deadline = time.monotonic() + 60
    while True:  # the deletion finishes in the background
        try:
            offset_bounds(options, settings.kafka_topic)
        except KafkaUnavailableError as exc:
            if "does not exist on the broker" in str(exc):
                break
        assert time.monotonic() < deadline, "the topic was not deleted within 60 s"
        time.sleep(0.2)

    with pytest.raises(KafkaUnavailableError, match=r"does not exist on the broker"):
        kafka.read_range(settings.kafka_topic, 0, 0, 4)


@pytest.mark.backends("sqlite")
def test_a_batch_planned_for_the_deleted_topic_reads_nothing_of_the_new_one(
    instance: dg.DagsterInstance, database_url: str, settings: Settings
) -> None:
    """A batch of the previous topic still queued (or in its retries) when the topic is deleted
    and created again, and producers fill the new one past its range. Before: its fetch read
    the new topic's messages at its offsets and stored them as its own; set aside with the
    previous topic's rows, they made the new topic's batches reject those messages as
    duplicates of themselves. Now the run fails at once, without retries, saying why, and
    stores nothing."""
    defs = build_definitions(settings)
    produce(settings, to_messages(synthetic_transactions(10, seed=41)))
    (request,) = evaluate_sensor(defs, settings, instance, cursor=None).run_requests
    planned_for = request.tags["fraud_dagster/topic_id"]
    assert planned_for == topic_id(settings)

    recreate_topic(settings)
    produce(settings, to_messages(synthetic_transactions(10, seed=42)))
    job = defs.resolve_job_def("score_transactions")
    result = job.execute_in_process(
        run_config=request.run_config,
        instance=instance,
        tags={**request.tags, RUN_KEY_TAG: request.run_key},
        raise_on_error=False,
    )

    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert failure.step_key.endswith("fetch")
    said = failure.event_specific_data.error.message
    assert f"planned for topic {settings.kafka_topic!r} with id {planned_for}" in said
    assert "Do not rerun this batch" in said
    assert not [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    # Nor do Dagster's run retries take the run (each would fail and mail the operators again).
    run = instance.get_run_by_id(result.run_id)
    assert run is not None and run.tags.get("dagster/will_retry") == "false"
    notice = run_failure_notice(
        run.run_id, run.job_name, run.tags, [said], instance.run_retries_enabled, 2
    )
    assert notice.retry_note == "attempt 1; not retried: a retry would fail the same way"
    engine = create_engine(database_url)
    ensure_schema(engine)  # the run failed before it touched the database at all
    engine.dispose()
    assert table_rows(database_url, schema.scored_transactions) == []
    assert table_rows(database_url, schema.stored_ranges) == []
