"""The Kafka sensor against a real broker and a real Dagster instance."""

from __future__ import annotations

import json

import dagster as dg
import pytest

from fraud_dagster.batching import PlannedBatch
from fraud_dagster.definitions import build_definitions
from fraud_dagster.jobs import batch_run_config
from fraud_dagster.producer import synthetic_transactions
from fraud_dagster.settings import Settings
from fraud_dagster.simulator import to_messages
from fraud_dagster_tests.helpers import evaluate_sensor, produce

# The sensor reads the broker and the Dagster instance, never the application database.
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
    from fraud_dagster.local_services.process import free_port
    from fraud_dagster.settings import load_settings

    monkeypatch.setenv("FRAUD_KAFKA_BOOTSTRAP_SERVERS", f"127.0.0.1:{free_port()}")
    monkeypatch.setenv("FRAUD_KAFKA_CONNECT_TIMEOUT_SECONDS", "2")
    unreachable = load_settings()
    defs = build_definitions(unreachable)
    cursor = json.dumps({"topic": unreachable.kafka_topic, "next_offsets": {"0": 7}})
    result = evaluate_sensor(defs, unreachable, instance, cursor=cursor)
    assert result.run_requests == []
    assert "Kafka unavailable" in result.skip_message
    assert result.cursor in (None, cursor)
