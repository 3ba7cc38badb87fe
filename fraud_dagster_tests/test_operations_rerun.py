"""Rerunning a failed batch through Dagster's own re-execution: same offsets, nothing twice.

The fault is real: a trigger in the database refuses the outbox insert, the last write of the
persist transaction, so the scored, rejected and suspicious rows of that transaction were
already written when it fails: the test shows they were rolled back.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta

import dagster as dg
import pytest

from fraud_dagster import kafka_io
from fraud_dagster.definitions import build_definitions
from fraud_dagster.local_services.kafka import LocalKafka
from fraud_dagster.messages import ValidationLimits
from fraud_dagster.producer import synthetic_transactions
from fraud_dagster.resources import resolved_resources
from fraud_dagster.settings import Settings, load_settings
from fraud_dagster.simulator import to_messages
from fraud_dagster.storage import schema
from fraud_dagster.storage.database import create_engine, ensure_schema
from fraud_dagster_tests.helpers import (
    evaluate_sensor,
    produce,
    produce_raw,
    suspicious_ids,
    table_rows,
)
from fraud_dagster_tests.operations_support import (
    accept_writes,
    accounting,
    emails_by_transaction,
    executed_steps,
    materializations,
    reexecute,
    refuse_writes,
    run_request,
)
from fraud_dagster_tests.test_end_to_end import known_transactions

pytestmark = pytest.mark.services


def test_failed_batch_reexecuted_from_failure_then_all_steps_processes_the_same_offsets_once(
    settings: Settings, instance: dg.DagsterInstance, mailbox, database_url: str
) -> None:
    defs = build_definitions(settings)
    messages, obvious_frauds, _ = known_transactions()
    produce(settings, messages)
    produce_raw(settings, [b"{not json", json.dumps(messages[0]).encode()])  # bad + duplicate
    total = len(messages) + 2
    tick = evaluate_sensor(defs, settings, instance, cursor=None)
    (request,) = tick.run_requests
    assert request.tags["fraud_dagster/offset_range"] == f"0-{total - 1}"

    ensure_schema(create_engine(database_url))
    refuse_writes(database_url, "fraud_alerts", "injected fault: outbox insert refused")
    failed = run_request(request, instance)

    assert not failed.success
    failure = next(event for event in failed.all_events if event.event_type_value == "STEP_FAILURE")
    assert failure.step_key == "transaction_batch.persist"
    error = failure.step_failure_data.error
    assert "rolled back" in error.cause.message
    assert "injected fault" in error.cause.message
    for table in (
        schema.scored_transactions,
        schema.rejected_transactions,
        schema.suspicious_transactions,
        schema.fraud_alerts,
    ):
        assert table_rows(database_url, table) == [], f"{table.name} was half-written"
    resources = build_definitions(settings).resources
    assert resources["kafka"].committed_offsets() == {}  # offset not committed for a failed batch
    assert mailbox.messages() == []

    accept_writes(database_url, "fraud_alerts")
    from_failure = reexecute(instance, failed.run_id, from_failure=True)

    assert from_failure.success
    resumed = executed_steps(instance, from_failure.run_id)
    assert {"persist", "alert"} <= resumed  # the failed step and what follows it
    assert not {"fetch", "preprocess", "score"} & resumed  # their outputs are reused
    (scored_meta,) = materializations(instance, from_failure.run_id, "scored_transactions")
    assert (scored_meta["first_offset"], scored_meta["last_offset"]) == (0, total - 1)
    assert scored_meta["read"] == total
    assert (scored_meta["scored"], scored_meta["rejected"]) == (len(messages), 2)
    assert accounting(database_url, settings.kafka_topic) == {(0, o): 1 for o in range(total)}
    suspicious = suspicious_ids(database_url)
    assert obvious_frauds <= suspicious
    emails = mailbox.wait_for(len(suspicious))
    assert emails_by_transaction(emails) == dict.fromkeys(suspicious, 1)
    assert resources["kafka"].committed_offsets() == {0: total}
    run = instance.get_run_by_id(from_failure.run_id)
    assert run.tags["fraud_dagster/offset_range"] == f"0-{total - 1}"
    assert run.parent_run_id == failed.run_id

    # An operator re-executes the whole (original) run: every step runs again, same offsets.
    all_steps = reexecute(instance, failed.run_id, from_failure=False)

    assert all_steps.success
    assert {"fetch", "preprocess", "score", "persist", "alert"} <= executed_steps(
        instance, all_steps.run_id
    )
    (again,) = materializations(instance, all_steps.run_id, "scored_transactions")
    assert (again["first_offset"], again["last_offset"], again["read"]) == (0, total - 1, total)
    assert again["inserted"] == 0
    assert again["already_stored"] == len(messages)
    (alert_meta,) = materializations(instance, all_steps.run_id, "fraud_alerts")
    assert alert_meta["alerted"] == 0
    assert accounting(database_url, settings.kafka_topic) == {(0, o): 1 for o in range(total)}
    assert len(table_rows(database_url, schema.fraud_alerts)) == len(suspicious)
    assert emails_by_transaction(mailbox.wait_for(len(suspicious) + 1, 3)) == dict.fromkeys(
        suspicious, 1
    )


def test_consumer_group_is_never_committed_past_a_batch_that_failed(
    settings: Settings,
    instance: dg.DagsterInstance,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FRAUD_MAX_BATCH_SIZE", "10")
    settings = load_settings()
    defs = build_definitions(settings)
    produce(settings, to_messages(synthetic_transactions(30, seed=61)))
    first, second, third = evaluate_sensor(defs, settings, instance, cursor=None).run_requests
    ensure_schema(create_engine(database_url))
    refuse_writes(
        database_url, "scored_transactions", "injected fault", condition="NEW.source_offset < 10"
    )
    kafka = resolved_resources(settings)["kafka"]

    failed = run_request(first, instance)
    later = [run_request(request, instance) for request in (second, third)]

    assert not failed.success
    assert all(result.success for result in later)
    assert kafka.committed_offsets() == {}, "offsets 0-9 are not stored: the lag must show them"
    for result in later:
        (meta,) = materializations(instance, result.run_id, "scored_transactions")
        assert meta["consumer_group_offset"] is None
        assert meta["history_complete"] is False  # scored without offsets 0-9 in the history
        warnings = [r.user_message for r in instance.all_logs(result.run_id) if r.level >= 30]
        assert any("an earlier batch" in message for message in warnings)

    accept_writes(database_url, "scored_transactions")
    rerun = reexecute(instance, failed.run_id, from_failure=True)

    assert rerun.success
    (meta,) = materializations(instance, rerun.run_id, "scored_transactions")
    assert meta["consumer_group_offset"] == 30  # the gap is closed: past all three batches
    assert meta["history_complete"] is True
    assert kafka.committed_offsets() == {0: 30}
    assert accounting(database_url, settings.kafka_topic) == {(0, o): 1 for o in range(30)}


def test_a_rerun_keeps_each_message_as_first_stored_even_when_the_clock_changes_the_verdict(
    settings: Settings, instance: dg.DagsterInstance, mailbox, database_url: str
) -> None:
    """The date window moves with the clock: a message a little too far in the future is
    rejected by the batch's run and would pass in a rerun a few seconds later. The rerun keeps
    the rejection: the offset is not stored twice and gets no alert."""
    defs = build_definitions(settings)
    messages, obvious_frauds, _ = known_transactions()
    skew = ValidationLimits().max_clock_skew
    valid_from = datetime.now(UTC) + timedelta(seconds=15)  # the date passes the window then
    soon_valid = valid_from + skew
    too_early = {
        "transaction_id": "FROM-TOMORROW",
        "account_id": "A-X0",
        "merchant": "M-Z",
        "transaction_amount": 8_000.0,  # suspicious, were it scored
        "transaction_date": soon_valid.isoformat(),
    }
    produce(settings, [*messages, too_early])
    total = len(messages) + 1
    (request,) = evaluate_sensor(defs, settings, instance, cursor=None).run_requests
    first = run_request(request, instance)
    assert first.success
    (rejected,) = table_rows(database_url, schema.rejected_transactions)
    assert (rejected["source_offset"], rejected["transaction_id"]) == (total - 1, "FROM-TOMORROW")
    assert "is outside" in rejected["reason"]
    suspicious = suspicious_ids(database_url)
    assert obvious_frauds <= suspicious
    mailbox.wait_for(len(suspicious))

    time.sleep(max(0.0, (valid_from - datetime.now(UTC)).total_seconds() + 1))
    rerun = reexecute(instance, first.run_id, from_failure=False)

    assert rerun.success
    (meta,) = materializations(instance, rerun.run_id, "scored_transactions")
    assert (meta["inserted"], meta["already_stored"]) == (0, total)
    assert accounting(database_url, settings.kafka_topic) == {(0, o): 1 for o in range(total)}
    assert table_rows(database_url, schema.rejected_transactions) == [rejected]
    assert suspicious_ids(database_url) == suspicious
    assert emails_by_transaction(mailbox.wait_for(len(suspicious) + 1, 3)) == dict.fromkeys(
        suspicious, 1
    )


def test_the_consumer_group_never_moves_back_when_two_runs_of_a_partition_commit_together(
    kafka_broker: LocalKafka, topic: str
) -> None:
    """Run A reads the stored ranges (up to 120), run B commits 150 meanwhile, then A commits:
    the group stays at 150 (moving back would show lag for stored batches)."""
    options = {"bootstrap_servers": [kafka_broker.bootstrap_servers]}
    group = f"group-{topic}"
    client = kafka_io.producer(options)
    for future in [client.send(topic, value=b"{}") for _ in range(150)]:
        future.get(timeout=10)
    client.close()
    assert kafka_io.commit_stored(options, topic, 0, group, lambda start: 100) == 100

    def stored_until_while_b_commits(start: int) -> int:
        assert kafka_io.commit_stored(options, topic, 0, group, lambda _: 150) == 150
        return 120

    assert kafka_io.commit_stored(options, topic, 0, group, stored_until_while_b_commits) == 150
    assert kafka_io.committed_offsets(options, topic, group) == {0: 150}


def test_a_range_edited_in_the_launchpad_is_refused_before_anything_is_read_or_recorded(
    settings: Settings, instance: dg.DagsterInstance, database_url: str
) -> None:
    """Before: a negative first offset was read as offsets deleted by retention and recorded
    in lost_ranges (offsets -5..-1), a range edited away from the run's tags was stored under
    the tags' range for ordering and `status`, and a range ending before it starts ran and
    succeeded storing nothing."""
    defs = build_definitions(settings)
    produce(settings, to_messages(synthetic_transactions(20, seed=67)))
    (request,) = evaluate_sensor(defs, settings, instance, cursor=None).run_requests
    fetch_config = request.run_config["ops"]["transaction_batch"]["ops"]["fetch"]["config"]
    edits = [
        ({"first_offset": -5}, {}, "first_offset -5 does not exist"),
        ({"first_offset": 12, "last_offset": 4}, {}, "last_offset 4 is before first_offset 12"),
        ({"last_offset": 9}, request.tags, "but its tags say"),
    ]
    for number, (edit, tags, said) in enumerate(edits):
        run_config = json.loads(json.dumps(request.run_config))
        run_config["ops"]["transaction_batch"]["ops"]["fetch"]["config"].update(edit)
        edited = dg.RunRequest(run_key=f"edited-{number}", run_config=run_config, tags=tags)
        result = run_request(edited, instance)

        assert not result.success
        (failure,) = [
            e
            for e in instance.all_logs(result.run_id)
            if e.dagster_event and e.dagster_event.is_step_failure
        ]
        assert said in failure.dagster_event.step_failure_data.error.message
        assert (
            instance.get_run_by_id(result.run_id).tags["dagster/retry_on_asset_or_op_failure"]
            == "false"
        )
        assert executed_steps(instance, result.run_id) == {"fetch"}

    ensure_schema(create_engine(database_url))
    assert table_rows(database_url, schema.lost_ranges) == []
    assert accounting(database_url, settings.kafka_topic) == {}
    assert fetch_config["first_offset"] == 0 and fetch_config["last_offset"] == 19
    assert run_request(request, instance).success  # the batch as planned is untouched
    assert accounting(database_url, settings.kafka_topic) == {(0, o): 1 for o in range(20)}
