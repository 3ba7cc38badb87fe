"""The Kafka sensor against a real broker and a real Dagster instance."""

from __future__ import annotations

import json

import dagster as dg
import pytest

from fraud_dagster.batching import PlannedBatch, SensorCursor
from fraud_dagster.definitions import build_definitions
from fraud_dagster.errors import KafkaUnavailableError
from fraud_dagster.jobs import batch_run_config
from fraud_dagster.kafka_io import producer as kafka_producer
from fraud_dagster.kafka_io import topic_offsets
from fraud_dagster.local_services.process import free_port
from fraud_dagster.producer import synthetic_transactions
from fraud_dagster.resources import resolved_resources
from fraud_dagster.settings import Settings, load_settings
from fraud_dagster.simulator import to_messages
from fraud_dagster_tests.helpers import admin_client, delete_before, evaluate_sensor, produce

# The sensor reads the broker and the Dagster instance; the application database only to set
# aside a recreated topic's stored ranges.
pytestmark = [pytest.mark.services, pytest.mark.backends("sqlite")]


@pytest.mark.partitions(2)
def test_a_partition_with_a_batch_waiting_in_the_queue_gets_no_other_until_it_starts(
    settings: Settings, instance: dg.DagsterInstance
) -> None:
    assert isinstance(instance.run_coordinator, dg.QueuedRunCoordinator)  # the repo's dagster.yaml
    defs = build_definitions(settings)
    job = defs.resolve_job_def("score_transactions")

    def create_run(request: dg.RunRequest, status: dg.DagsterRunStatus) -> dg.DagsterRun:
        return instance.create_run_for_job(
            job_def=job,
            run_config=request.run_config,
            tags={**request.tags, "dagster/run_key": request.run_key},
            status=status,
        )

    produce(settings, to_messages(synthetic_transactions(60, seed=5)))
    first = evaluate_sensor(defs, settings, instance, cursor=None)
    by_partition = {
        request.tags["fraud_dagster/partition"]: request for request in first.run_requests
    }
    assert set(by_partition) == {"0", "1"}
    first_end = json.loads(first.cursor)["next_offsets"]

    # Partition 0's batch waits in the queue; partition 1's was never submitted.
    waiting = create_run(by_partition["0"], dg.DagsterRunStatus.NOT_STARTED)
    produce(settings, to_messages(synthetic_transactions(60, seed=6)))
    second = evaluate_sensor(defs, settings, instance, cursor=first.cursor)
    assert {r.tags["fraud_dagster/partition"] for r in second.run_requests} == {"1"}
    assert json.loads(second.cursor)["next_offsets"]["0"] == first_end["0"]

    # Once it runs, partition 0's next batch (everything that arrived meanwhile) is requested,
    # to wait behind it in the queue.
    instance.report_run_canceled(waiting)
    create_run(by_partition["0"], dg.DagsterRunStatus.STARTED)
    third = evaluate_sensor(defs, settings, instance, cursor=second.cursor)
    (request,) = third.run_requests
    first_offset = int(request.tags["fraud_dagster/first_offset"])
    assert (request.tags["fraud_dagster/partition"], first_offset) == ("0", first_end["0"])
    assert request.run_config == batch_run_config(
        PlannedBatch(
            settings.kafka_topic,
            0,
            first_offset,
            int(request.tags["fraud_dagster/last_offset"]),
        )
    )
    assert json.loads(third.cursor)["next_offsets"]["0"] > first_offset


def test_broker_down_skips_with_the_reason_and_keeps_the_cursor(
    settings: Settings, instance: dg.DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FRAUD_KAFKA_BOOTSTRAP_SERVERS", f"127.0.0.1:{free_port()}")
    monkeypatch.setenv("FRAUD_KAFKA_CONNECT_TIMEOUT_SECONDS", "2")
    unreachable = load_settings()
    defs = build_definitions(unreachable)
    cursor = json.dumps({"topic": unreachable.kafka_topic, "next_offsets": {"0": 7}})
    result = evaluate_sensor(defs, unreachable, instance, cursor=cursor)
    assert result.run_requests == []
    assert "Kafka unavailable" in result.skip_message
    assert result.cursor in (None, cursor)


def test_a_recreated_topic_with_the_database_down_skips_and_keeps_the_cursor(
    settings: Settings, instance: dg.DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No batch of the new topic before the previous one's stored ranges are set aside: they
    would let the consumer group be committed past the new batches."""
    from fraud_dagster.settings import load_settings

    produce(settings, to_messages(synthetic_transactions(5, seed=7)))
    monkeypatch.setenv(
        "FRAUD_DATABASE_URL", f"postgresql+psycopg2://nobody:x@127.0.0.1:{free_port()}/none"
    )
    no_database = load_settings()
    cursor = SensorCursor(no_database.kafka_topic, {0: 5}, topic_id="an-earlier-topic").serialize()
    result = evaluate_sensor(build_definitions(no_database), no_database, instance, cursor=cursor)
    assert result.run_requests == []
    assert "recreated" in result.skip_message and "cursor unchanged" in result.skip_message
    assert result.cursor in (None, cursor)


def test_a_recreated_topic_is_not_read_while_a_run_of_the_previous_one_is_unfinished(
    settings: Settings, instance: dg.DagsterInstance
) -> None:
    """Such a run would store its range after the set-aside, as if it were the new topic's."""
    defs = build_definitions(settings)
    produce(settings, to_messages(synthetic_transactions(5, seed=8)))
    old_batch = PlannedBatch(settings.kafka_topic, 0, 0, 4)
    unfinished = instance.create_run_for_job(
        job_def=defs.resolve_job_def("score_transactions"),
        run_config=batch_run_config(old_batch),
        tags={**old_batch.tags(), "dagster/run_key": old_batch.run_key},
        status=dg.DagsterRunStatus.STARTED,
    )
    cursor = SensorCursor(settings.kafka_topic, {0: 5}, topic_id="an-earlier-topic").serialize()

    waiting = evaluate_sensor(defs, settings, instance, cursor=cursor)
    assert waiting.run_requests == []
    assert "waiting for 1 run(s) of the previous topic" in waiting.skip_message
    assert waiting.cursor in (None, cursor)

    instance.report_run_failed(unfinished)
    resumed = evaluate_sensor(defs, settings, instance, cursor=cursor)
    (request,) = resumed.run_requests
    assert request.run_key.startswith(f"{settings.kafka_topic}@")
    assert request.tags["fraud_dagster/offset_range"] == "0-4"


@pytest.mark.partitions(2)
def test_topic_offsets_are_the_topic_id_and_both_ends_of_every_partition(
    settings: Settings,
) -> None:
    """What each tick plans from, read by one admin client (`kafka_io.topic_offsets`)."""
    options = resolved_resources(settings)["kafka"].client_options()
    client = kafka_producer(options)
    for partition, count in ((0, 10), (1, 4)):
        for _ in range(count):
            client.send(settings.kafka_topic, value=b"{}", partition=partition)
    client.flush()
    client.close()
    delete_before(settings, 3)  # partition 0's beginning moves, as retention moves it
    admin = admin_client(settings)
    try:
        (described,) = admin.describe_topics([settings.kafka_topic])
    finally:
        admin.close()

    offsets = topic_offsets(options, settings.kafka_topic)

    assert offsets.beginning == {0: 3, 1: 0}
    assert offsets.end == {0: 10, 1: 4}
    assert offsets.topic_id == str(described["topic_id"]) and offsets.topic_id


def test_a_topic_that_does_not_exist_skips_the_tick_with_how_to_create_it(
    settings: Settings, instance: dg.DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FRAUD_KAFKA_TOPIC", f"{settings.kafka_topic}-never-created")
    missing = load_settings()
    options = resolved_resources(missing)["kafka"].client_options()
    with pytest.raises(KafkaUnavailableError, match="does not exist on the broker"):
        topic_offsets(options, missing.kafka_topic)

    result = evaluate_sensor(build_definitions(missing), missing, instance, cursor=None)
    assert result.run_requests == []
    assert "Kafka unavailable" in result.skip_message
    assert "fraud-dagster topic create" in result.skip_message
