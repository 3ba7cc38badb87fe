"""`fraud-dagster status` and the unstored-offsets email: what an operator learns of the stream,
read from the real broker and application database after real batch runs (one of them left
unrun, as a failed batch is until it is rerun)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import pytest
from kafka import KafkaProducer

from fraud_dagster import range_runs
from fraud_dagster.alerts import size_limit_words
from fraud_dagster.batching import PlannedBatch
from fraud_dagster.definitions import build_definitions
from fraud_dagster.jobs import batch_run_config
from fraud_dagster.kafka_io import read_range, topic_retention
from fraud_dagster.local_services.kafka import LocalKafka
from fraud_dagster.producer import synthetic_transactions
from fraud_dagster.resources import resolved_resources
from fraud_dagster.settings import Settings, load_settings
from fraud_dagster.simulator import to_messages
from fraud_dagster.stream_status import Gap, StreamStatus, render_status, stream_status
from fraud_dagster_tests.helpers import MailBox, delete_before, produce, set_topic_config
from fraud_dagster_tests.operations_support import sensor_tick
from fraud_dagster_tests.unit.test_range_runs import batch_run

pytestmark = pytest.mark.services


def status_command(
    *arguments: str, dagster_home: Path | None = None
) -> subprocess.CompletedProcess:
    """The installed CLI, with this test's FRAUD_* environment (and DAGSTER_HOME, if given)."""
    env = os.environ.copy()
    env.pop("DAGSTER_HOME", None)
    if dagster_home is not None:
        env["DAGSTER_HOME"] = str(dagster_home)
    return subprocess.run(
        [sys.executable, "-m", "fraud_dagster.cli", "status", *arguments],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def status_of(settings: Settings) -> StreamStatus:
    """The stream's status as `fraud-dagster status` reads it, for `settings`."""
    resources = resolved_resources(settings)
    return stream_status(
        resources["kafka"].client_options(),
        settings.kafka_topic,
        settings.kafka_consumer_group,
        resources["database"].get_engine(),
    )


def test_status_names_the_gap_to_rerun_the_lost_offsets_and_what_waits(
    instance: dg.DagsterInstance, dagster_home: Path, database_url: str, settings: Settings
) -> None:
    defs = build_definitions(settings)
    resources = resolved_resources(settings)
    job = defs.resolve_job_def("score_transactions")
    produced_from = datetime.now(UTC).replace(microsecond=0)
    produce(settings, to_messages(synthetic_transactions(40, seed=5)))
    produced_until = datetime.now(UTC)
    delete_before(settings, 5)  # retention took offsets 0..4 before any batch read them

    def run_range(first: int, last: int) -> None:
        batch = PlannedBatch(settings.kafka_topic, 0, first, last)
        assert job.execute_in_process(run_config=batch_run_config(batch), instance=instance).success

    run_range(0, 9)
    run_range(20, 29)  # 10..19 not run: as a failed batch before its rerun; 30..39 not yet

    def status() -> StreamStatus:
        return status_of(settings)

    first = status()
    (partition,) = first.partitions
    assert (partition.beginning, partition.end, partition.committed) == (5, 40, 10)
    assert (partition.lag, partition.stored_until, partition.stored_end) == (30, 10, 30)
    assert partition.lost == [(0, 4)] and partition.waiting == 10
    (gap,) = partition.gaps
    assert (gap.first, gap.last, gap.deleted) == (10, 19, 0)
    assert produced_from <= gap.produced_at <= produced_until  # the message's Kafka timestamp
    retention = topic_retention(resources["kafka"].client_options(), settings.kafka_topic).ms
    assert retention is not None and retention > 0 and first.retention.ms == retention
    assert gap.deletable_from == gap.produced_at + timedelta(milliseconds=retention)
    shown = status_command("--check")  # no Dagster instance (the demo's is not there)
    assert shown.returncode == 2, shown.stderr
    assert "NOT STORED: offsets 10-19 (10)" in shown.stdout
    assert "fraud_dagster/first_offset=10" in shown.stdout
    assert f"may delete it from {gap.deletable_from:%Y-%m-%d %H:%M} UTC on" in shown.stdout
    assert "LOST: offsets 0-4 (5)" in shown.stdout
    assert "10 offset(s) after the last stored one" in shown.stdout
    assert "no Dagster instance at" in shown.stderr

    # The batch's run failed twice (Dagster's retry too), as the instance records it.
    failed = [
        batch_run(instance, 10, 19, topic=settings.kafka_topic, topic_id=None) for _ in range(2)
    ]
    shown = status_command("--check", dagster_home=dagster_home)
    assert shown.returncode == 2, shown.stderr
    assert "NOT STORED: offsets 10-19 (10)" in shown.stdout and "its runs below" in shown.stdout
    assert (
        f"    batch 10-19: run {failed[-1]} FAILURE (2 run(s) of it in all): re-execute it from "
        f"failure, {settings.dagster_ui_url}/runs/{failed[-1]}"
    ) in shown.stdout.splitlines()
    assert "first_offset=10" not in shown.stdout

    delete_before(settings, 20)  # the failed batch was left until retention reached it
    (gap,) = status().partitions[0].gaps
    assert (gap.first, gap.last, gap.deleted, gap.produced_at) == (10, 19, 10, None)
    assert "NOT STORED, and deleted by retention since: offsets 10-19" in status_command().stdout

    run_range(10, 19)  # the rerun records them as lost, and the group moves on
    run_range(30, 39)

    after = status()
    (partition,) = after.partitions
    assert (partition.committed, partition.lag, partition.gaps, partition.waiting) == (40, 0, [], 0)
    assert partition.lost == [(0, 4), (10, 19)]  # lost stays lost, and on record
    assert not after.needs_attention
    assert not any("NOT STORED" in line for line in render_status(after))
    assert status_command("--check").returncode == 0


def test_a_later_batch_records_the_deleted_unstored_range_before_the_group_moves_past_it(
    instance: dg.DagsterInstance, database_url: str, settings: Settings
) -> None:
    """Nobody reran the failed batch 10-19 and retention deleted it; the next batch of the
    partition commits the group from the log's beginning, past 10-19. Before, the range then
    left the status (it lists gaps above the committed offset) with nothing recorded: lost
    without a trace. Now that batch records it in lost_ranges first."""
    defs = build_definitions(settings)
    job = defs.resolve_job_def("score_transactions")
    produce(settings, to_messages(synthetic_transactions(40, seed=6)))

    def run_range(first: int, last: int) -> dg.ExecuteInProcessResult:
        batch = PlannedBatch(settings.kafka_topic, 0, first, last)
        result = job.execute_in_process(run_config=batch_run_config(batch), instance=instance)
        assert result.success
        return result

    def status() -> StreamStatus:
        return status_of(settings)

    run_range(0, 9)
    run_range(20, 29)  # 10..19: a failed batch nobody reran
    delete_before(settings, 20)
    later = run_range(30, 39)

    (partition,) = status().partitions
    assert (partition.committed, partition.gaps) == (40, [])
    assert partition.lost == [(10, 19)]
    logged = [entry.user_message or "" for entry in instance.all_logs(later.run_id)]
    assert any("offsets 10..19" in text and "lost_ranges" in text for text in logged)
    assert "LOST: offsets 10-19 (10)" in status_command().stdout

    rerun = run_range(10, 19)  # an operator's late rerun: the loss stays recorded once
    assert status().partitions[0].lost == [(10, 19)]
    (check,) = [e for e in rerun.get_asset_check_evaluations() if e.check_name == "offsets_read"]
    assert not check.passed


def ten_to_nineteen_left_unstored(
    instance: dg.DagsterInstance, monkeypatch: pytest.MonkeyPatch, seed: int
) -> tuple[Settings, dg.Definitions, dg.JobDefinition]:
    """30 messages on the test's topic, batches 0-9 and 20-29 stored and 10-19 left as a failed
    batch would be; the operators are mailed about a range at the first look."""
    monkeypatch.setenv("FRAUD_UNSTORED_ALERT_SECONDS", "0")
    settings = load_settings()
    defs = build_definitions(settings)
    job = defs.resolve_job_def("score_transactions")
    produce(settings, to_messages(synthetic_transactions(30, seed=seed)))
    for first, last in ((0, 9), (20, 29)):
        batch = PlannedBatch(settings.kafka_topic, 0, first, last)
        assert job.execute_in_process(run_config=batch_run_config(batch), instance=instance).success
    return settings, defs, job


def test_the_operators_are_mailed_once_about_a_range_left_unstored(
    instance: dg.DagsterInstance,
    mailbox: MailBox,
    monkeypatch: pytest.MonkeyPatch,
    settings: Settings,
) -> None:
    """A batch nobody reran: its offsets wait unstored until retention deletes them."""
    settings, defs, job = ten_to_nineteen_left_unstored(instance, monkeypatch, seed=6)

    looked_up: list[tuple[int, int]] = []  # the ranges whose runs a tick read
    find_batches = range_runs.batches_of_range

    def counted(
        instance: dg.DagsterInstance, job: str, topic: str, partition: int, gap: Gap, *rest: object
    ) -> tuple[range_runs.BatchRuns, ...]:
        looked_up.append((gap.first, gap.last))
        return find_batches(instance, job, topic, partition, gap, *rest)

    monkeypatch.setattr(range_runs, "batches_of_range", counted)

    def watch(cursor: str | None) -> dg.SensorResult:
        looked_up.clear()
        return sensor_tick(
            "email_operators_about_unstored_offsets", defs, instance, settings, cursor
        )

    def notices() -> list:  # the analysts' fraud alerts go to the same test server
        return [m for m in mailbox.messages() if m["X-Fraud-Unstored-Notice"]]

    # Its rerun queued (an operator's, or a retry): not mailed, it may be stored in a minute.
    rerun = instance.create_run_for_job(
        job_def=job,
        run_config=batch_run_config(PlannedBatch(settings.kafka_topic, 0, 10, 19)),
        tags=PlannedBatch(settings.kafka_topic, 0, 10, 19).tags(),
        status=dg.DagsterRunStatus.NOT_STARTED,
    )
    queued = watch(None)
    assert notices() == [] and queued.cursor == "[]"
    assert looked_up == [], "no email, no run queries"
    instance.report_run_canceled(rerun)  # canceled after all: the range is left unstored

    first = watch(queued.cursor)
    (notice,) = notices()
    assert notice["To"] == ", ".join(settings.operator_recipients)
    assert f"of {settings.kafka_topic} not stored (partition 0 offsets 10-19)" in notice["Subject"]
    body = notice.get_content()
    assert "Partition 0, offsets 10-19 (10): not stored" in body
    assert "retention may delete it from" in body
    assert (
        f"  batch 10-19: run {rerun.run_id} CANCELED (1 run(s) of it in all): re-execute it "
        f"from failure, {settings.dagster_ui_url}/runs/{rerun.run_id}"
    ) in body.splitlines()

    assert looked_up == [(10, 19)]

    second = watch(first.cursor)
    assert len(notices()) == 1, "one email per range, not one per tick"
    assert looked_up == [], "a range already mailed is not looked up again"

    batch = PlannedBatch(settings.kafka_topic, 0, 10, 19)  # the rerun
    assert job.execute_in_process(run_config=batch_run_config(batch), instance=instance).success
    cleared = watch(second.cursor)
    assert len(notices()) == 1
    assert cleared.cursor == "[]" and "0 unstored offset range(s)" in str(cleared.skip_reason)


# How `size_limit_words` says the partition's rate; the figure moves with the clock.
GROWING = re.compile(r", growing by about [0-9.,]+ (B|KiB|MiB|GiB) an hour\)")


def size_deadline_in(text: str) -> datetime:
    """The moment `alerts.size_deadline_words` names in a line of the email or the status."""
    found = re.search(r"retention.bytes may delete this range from (.+) UTC on$", text)
    assert found, text
    return datetime.strptime(found[1], "%Y-%m-%d %H:%M").replace(tzinfo=UTC)


def the_last_call_on_ten_to_nineteen(
    defs: dg.Definitions, instance: dg.DagsterInstance, settings: Settings, mailbox: MailBox
) -> str:
    """One tick of the unstored-offsets sensor: its one email, a last call about offsets 10-19
    (and the cursor says so); the email's text."""
    tick = sensor_tick("email_operators_about_unstored_offsets", defs, instance, settings, None)
    assert json.loads(tick.cursor) == ["0/10/last_call"]
    (notice,) = [m for m in mailbox.messages() if m["X-Fraud-Unstored-Notice"]]
    assert notice["Subject"].endswith(
        "not stored: last call before retention (partition 0 offsets 10-19)"
    )
    return notice.get_content()


def partition_on_disk(kafka_broker: LocalKafka, settings: Settings) -> int:
    """Partition 0's size from the broker's own files: its segments (one, still active, so not
    deletable)."""
    segments = kafka_broker.data_dir / "data" / f"{settings.kafka_topic}-0"
    return sum(path.stat().st_size for path in segments.glob("*.log"))


def test_a_range_on_a_topic_near_its_size_limit_gets_a_last_call_with_the_partition_size(
    instance: dg.DagsterInstance,
    kafka_broker: LocalKafka,
    mailbox: MailBox,
    monkeypatch: pytest.MonkeyPatch,
    settings: Settings,
) -> None:
    """retention.bytes deletes a partition's oldest segments whatever their age: a range left
    unstored there is mailed as a last call once the partition nears the limit, days before
    its age deadline, and the status and the email say how full the partition is. (Written in
    seconds, it would get one for its rate too; unit/test_gap_watch tells the two apart.)"""
    settings, defs, _ = ten_to_nineteen_left_unstored(instance, monkeypatch, seed=7)
    options = resolved_resources(settings)["kafka"].client_options()
    unlimited = topic_retention(options, settings.kafka_topic)
    assert unlimited.max_bytes == -1 and unlimited.sizes == unlimited.fill_rates == {}

    on_disk = partition_on_disk(kafka_broker, settings)
    limit = on_disk * 100 // 95  # the partition fills 95 % of it
    set_topic_config(settings, {"retention.bytes": str(limit)})

    retention = topic_retention(options, settings.kafka_topic)
    assert (retention.ms, retention.max_bytes, retention.sizes) == (
        unlimited.ms,
        limit,
        {0: on_disk},
    )
    said = size_limit_words(retention, 0)
    assert said is not None and "95% of it, growing by about" in said
    steady_part = GROWING.sub(")", said)  # the words without the rate

    body = the_last_call_on_ten_to_nineteen(defs, instance, settings, mailbox)
    assert "Partition 0, offsets 10-19 (10): LAST CALL, retention may delete it soon" in body
    assert f"  {steady_part}" in GROWING.sub(")", body).splitlines()
    assert f"retention.bytes is {limit}." in body

    shown = status_command("--check")
    assert shown.returncode == 2, shown.stderr
    (line,) = [line for line in shown.stdout.splitlines() if "NOT STORED" in line]
    assert f"; {steady_part}; at that rate, retention.bytes may delete" in GROWING.sub(")", line)


def test_a_range_on_a_roomy_partition_that_fills_fast_gets_a_last_call_with_its_deadline(
    instance: dg.DagsterInstance,
    kafka_broker: LocalKafka,
    mailbox: MailBox,
    monkeypatch: pytest.MonkeyPatch,
    settings: Settings,
) -> None:
    """A partition at a tenth of its size limit that wrote all it holds in the last minute
    fills the rest within the hour, days before the range's age deadline: the rate, read from
    the broker's offsets and timestamps, makes the email a last call that says when."""
    settings, defs, _ = ten_to_nineteen_left_unstored(instance, monkeypatch, seed=8)
    options = resolved_resources(settings)["kafka"].client_options()
    on_disk = partition_on_disk(kafka_broker, settings)
    set_topic_config(settings, {"retention.bytes": str(on_disk * 10)})

    now = datetime.now(UTC)
    retention = topic_retention(options, settings.kafka_topic, now)
    (oldest_ms,) = read_range(options, settings.kafka_topic, 0, 0, 0).timestamps_ms
    retained = now - datetime.fromtimestamp(oldest_ms / 1000, UTC)
    # All 30 messages were written in the last hour: the mean over them is the faster rate.
    assert timedelta(0) < retained < timedelta(minutes=10)
    assert retention.fill_rates == {0: pytest.approx(on_disk / retained.total_seconds())}
    assert retention.share_of_size_limit(0) == pytest.approx(0.1)
    age = retention.size_limit_age(0)  # the time the partition takes to write the limit
    assert age is not None
    assert age.total_seconds() == pytest.approx(10 * retained.total_seconds())

    body = the_last_call_on_ten_to_nineteen(defs, instance, settings, mailbox)
    assert "10% of it, growing by about" in body
    (deadline,) = [size_deadline_in(line) for line in body.splitlines() if "at that rate" in line]
    assert now - timedelta(minutes=1) < deadline < now + timedelta(hours=2)

    shown = status_command()
    (line,) = [line for line in shown.stdout.splitlines() if "NOT STORED" in line]
    assert "10% of it, growing by about" in line
    # Read a little later: the same rate over a longer time is slower, the deadline later.
    assert deadline <= size_deadline_in(line) < now + timedelta(hours=2)


def produce_in_transactions(settings: Settings, transactions: list[list[bytes]]) -> None:
    """Each list of values in one Kafka transaction: the broker writes a commit marker, an
    offset with no message, after each."""
    options = resolved_resources(settings)["kafka"].client_options()
    allowed = {k: v for k, v in options.items() if k in KafkaProducer.DEFAULT_CONFIG}
    client = KafkaProducer(**allowed, transactional_id=f"{settings.kafka_topic}-tx")
    try:
        client.init_transactions()
        for values in transactions:
            client.begin_transaction()
            for value in values:
                client.send(settings.kafka_topic, key=b"k", value=value)
            client.commit_transaction()
    finally:
        client.close()


def test_a_range_that_starts_at_a_transaction_marker_is_still_mailed(
    instance: dg.DagsterInstance,
    mailbox: MailBox,
    monkeypatch: pytest.MonkeyPatch,
    settings: Settings,
) -> None:
    """A transactional producer's commit marker takes an offset that holds no message. An
    unstored range that starts at one is aged by its first message after the marker: it is
    mailed like any other, not taken for a range too young to mention."""
    monkeypatch.setenv("FRAUD_UNSTORED_ALERT_SECONDS", "0")  # on top of the test's settings
    settings = load_settings()
    defs = build_definitions(settings)
    job = defs.resolve_job_def("score_transactions")
    values = [json.dumps(m).encode() for m in to_messages(synthetic_transactions(20, seed=8))]
    produced_from = datetime.now(UTC).replace(microsecond=0)
    produce_in_transactions(settings, [values[:10], values[10:]])  # 0-9, marker 10, 11-20, 21
    produced_until = datetime.now(UTC)
    for first, last in ((0, 9), (15, 21)):  # 10-14 left as a failed batch leaves them
        batch = PlannedBatch(settings.kafka_topic, 0, first, last)
        assert job.execute_in_process(run_config=batch_run_config(batch), instance=instance).success

    (partition,) = status_of(settings).partitions
    assert partition.end == 22
    (gap,) = partition.gaps
    assert (gap.first, gap.last, gap.size) == (10, 14, 5)
    assert gap.produced_at is not None, "aged by offset 11, the first message of the range"
    assert produced_from <= gap.produced_at <= produced_until
    assert gap.deadline is not None

    tick = sensor_tick("email_operators_about_unstored_offsets", defs, instance, settings, None)
    assert json.loads(tick.cursor) == ["0/10/unstored"]
    (notice,) = [m for m in mailbox.messages() if m["X-Fraud-Unstored-Notice"]]
    assert "(partition 0 offsets 10-14)" in notice["Subject"]
