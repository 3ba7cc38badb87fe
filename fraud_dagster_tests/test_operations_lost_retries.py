"""A failed batch run whose automatic retry Dagster lost, through the real dagster-daemon, broker,
SMTP server and database: the `recover_lost_automatic_retries` sensor reports its failure again,
Dagster's daemon retries it, the batch is stored once and the operators hear once.

The race itself (Dagster's daemon reading the failure before the run's status is written) cannot
be timed from outside. The test leaves the same state by other means: the run carries
`dagster/max_retries: 0` while it fails, so the daemon reads its failure and retries nothing;
only once the daemon's cursor is past that failure does the run get the tags Dagster would
have given it (max_retries 2, will_retry true).
"""

from __future__ import annotations

import time
from pathlib import Path

import dagster as dg
import pytest

from fraud_dagster.local_services.dagster_processes import running_daemon
from fraud_dagster.lost_retries import LOST_RETRY_MARK, WILL_RETRY_TAG
from fraud_dagster.settings import Settings
from fraud_dagster_tests.helpers import MailBox, suspicious_ids
from fraud_dagster_tests.operations_support import (
    accept_writes,
    accounting,
    analyst_alerts,
    emails_by_transaction,
    operator_emails,
    stall_a_batch,
    wait_for,
    wait_for_the_batch_at_persist,
    wait_until_settled,
)
from fraud_dagster_tests.test_operations_dead_workers import OPERATORS, failure_messages
from fraud_dagster_tests.test_operations_outages import operator_sensor_ticks

pytestmark = [pytest.mark.services, pytest.mark.slow]

# Where Dagster's EventLogConsumerDaemon (the one that launches automatic retries) keeps how far
# it has read the run failures (dagster/_daemon/auto_run_reexecution/event_log_consumer.py).
RETRY_DAEMON_CURSOR = "EVENT_LOG_CONSUMER_CURSOR-PIPELINE_FAILURE"


def retry_daemon_read_past(instance: dg.DagsterInstance, storage_id: int) -> bool:
    values = instance.daemon_cursor_storage.get_cursor_values({RETRY_DAEMON_CURSOR})
    return int(values.get(RETRY_DAEMON_CURSOR, "-1")) >= storage_id


@pytest.mark.backends("sqlite")
def test_a_failed_batch_whose_retry_dagster_lost_is_retried_stored_once_and_mailed_once(
    settings: Settings,
    env: dict[str, str],
    dagster_home: Path,
    instance: dg.DagsterInstance,
    database_url: str,
    mailbox: MailBox,
    tmp_path: Path,
) -> None:
    daemon_env = {
        **env,
        "FRAUD_RUN_HEALTH_INTERVAL_SECONDS": "1",
        "FRAUD_LOST_RETRY_AFTER_SECONDS": "5",
        "FRAUD_OPERATOR_RECIPIENTS": OPERATORS,
    }
    topic = settings.kafka_topic
    sent = stall_a_batch(settings, database_url)
    log = tmp_path / "daemon.log"
    with running_daemon(dagster_home, daemon_env, log):
        run_id = wait_for_the_batch_at_persist(instance, topic)
        instance.add_run_tags(run_id, {"dagster/max_retries": "0"})
        wait_for(
            lambda: instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.FAILURE,
            120,
            "the stalled batch failing (its persist step's retries exhausted)",
        )
        # Its id in the instance-wide event index, the one the daemon's cursor counts in.
        (failure,) = [
            record
            for record in instance.fetch_run_status_changes(
                dg.RunStatusChangeRecordsFilter(dg.DagsterEventType.RUN_FAILURE), limit=10
            ).records
            if record.run_id == run_id
        ]
        wait_for(
            lambda: retry_daemon_read_past(instance, failure.storage_id),
            60,
            "Dagster's retry daemon reading the failure",
        )
        assert instance.get_run_by_id(run_id).tags[WILL_RETRY_TAG] == "false"
        # The race's state: the tags Dagster gives such a run, written after its daemon read it.
        instance.add_run_tags(run_id, {"dagster/max_retries": "2", WILL_RETRY_TAG: "true"})
        accept_writes(database_url, "scored_transactions")

        records = wait_until_settled(instance, database_url, topic, sent, log)
        wait_for(
            lambda: any(m["X-Fraud-Run-Id"] == run_id for m in operator_emails(mailbox)),
            60,
            "the operators' email about the failed run",
        )
        re_reported_at = time.time()
        wait_for(
            lambda: any(t.timestamp > re_reported_at for t in operator_sensor_ticks(instance)),
            60,
            "a tick of the operators' mailer after the failure was reported again",
        )

    first, again = failure_messages(instance, run_id)
    assert not first.startswith(LOST_RETRY_MARK)
    assert again.startswith(LOST_RETRY_MARK)
    retries = [r.dagster_run for r in records if r.dagster_run.parent_run_id == run_id]
    assert [(r.status, r.tags.get("dagster/retry_number")) for r in retries] == [
        (dg.DagsterRunStatus.SUCCESS, "1")
    ], "Dagster's own retry: a re-execution in the failed run's group"
    assert accounting(database_url, topic) == {(0, offset): 1 for offset in range(sent)}
    suspicious = suspicious_ids(database_url)
    assert suspicious, "the batch should hold suspicious transactions"
    wait_for(lambda: len(analyst_alerts(mailbox)) >= len(suspicious), 60, "the analysts' alerts")
    assert emails_by_transaction(analyst_alerts(mailbox)) == {tx: 1 for tx in suspicious}
    told = [m["X-Fraud-Run-Id"] for m in operator_emails(mailbox)]
    assert told == [run_id], "one email, for the real failure"
