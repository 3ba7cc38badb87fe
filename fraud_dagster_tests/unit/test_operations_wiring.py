"""Wiring and pure logic of the operations features: retry sensors, backoff, operator email."""

from __future__ import annotations

import email
import email.policy
from datetime import timedelta

import dagster as dg
import pytest
import yaml
from pydantic import ValidationError

from fraud_dagster.alert_delivery import retry_delay
from fraud_dagster.alerts import RunFailureNotice, render_run_failure, run_failure_message_id
from fraud_dagster.definitions import defs
from fraud_dagster.ops import AlertRetryConfig, OrderConfig
from fraud_dagster.sensors import run_failure_notice
from fraud_dagster.settings import PROJECT_ROOT


def test_retry_and_failure_sensors_are_on_by_default() -> None:
    for name in (
        "retry_alerts",
        "email_operators_on_run_failure",
        "email_operators_on_canceled_batch",
        "email_operators_when_kafka_is_unreachable",
        "email_operators_about_unstored_offsets",
        "recover_lost_automatic_retries",
    ):
        assert defs.resolve_sensor_def(name).default_status == dg.DefaultSensorStatus.RUNNING
    assert defs.resolve_sensor_def("retry_alerts").job_name == "send_pending_alerts"


def test_alert_retry_job_opts_out_of_run_retries_and_is_limited_to_one_at_a_time() -> None:
    job = defs.resolve_job_def("send_pending_alerts")
    assert job.tags["dagster/max_retries"] == "0"
    assert job.executor_def.name == "in_process"
    config = yaml.safe_load((PROJECT_ROOT / "dagster.yaml").read_text())
    limits = config["run_coordinator"]["config"]["tag_concurrency_limits"]
    assert {"key": "fraud_dagster/alert_sender", "limit": 1} in limits
    assert config["run_retries"] == {"enabled": True, "max_retries": 2}


def test_reload_model_runs_are_limited_to_one_at_a_time() -> None:
    """Two reload runs at once could each validate against the model serving when they began,
    and the slower one put its older candidate back in service."""
    job = defs.resolve_job_def("reload_model")
    config = yaml.safe_load((PROJECT_ROOT / "dagster.yaml").read_text())
    limits = config["run_coordinator"]["config"]["tag_concurrency_limits"]
    (limit,) = [lim for lim in limits if lim["key"] in job.tags]
    assert limit["limit"] == 1 and "value" not in limit


def test_backoff_doubles_up_to_the_maximum() -> None:
    assert [retry_delay(n).total_seconds() for n in (1, 2, 3, 4)] == [30, 60, 120, 240]
    assert retry_delay(30) == timedelta(hours=1)
    assert retry_delay(3, base_seconds=1, max_seconds=3) == timedelta(seconds=3)


def test_operator_email_carries_run_offsets_error_and_no_injected_header() -> None:
    notice = RunFailureNotice(
        run_id="0123456789abcdef",
        job_name="score_transactions",
        offset_range="tx/1 offsets 10-19\r\nBcc: someone@evil.example",
        errors=("ModelIntegrityError: refusing to load it\nsecond line",),
        retry_note="attempt 3; no automatic retry left, rerun it by hand",
    )
    raw = render_run_failure(notice, "from@x", ["ops@x"]).as_bytes()
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert message["To"] == "ops@x"
    assert message["Bcc"] is None
    assert message["X-Fraud-Run-Id"] == "0123456789abcdef"
    assert "tx/1 offsets 10-19" in message["Subject"]
    body = message.get_content()
    assert "0123456789abcdef" in body
    assert "refusing to load it" in body and "  second line" in body
    assert "no automatic retry left" in body
    assert "fraud-dagster status" in body  # a batch's failure: where to see every unstored range


def test_failure_notice_names_the_offsets_and_whether_dagster_retries_the_run() -> None:
    tags = {
        "fraud_dagster/topic": "transactions",
        "fraud_dagster/partition": "2",
        "fraud_dagster/offset_range": "100-199",
    }
    first = run_failure_notice(
        "r1", "score_transactions", tags, ["boom"], True, 2, "http://dagster.bank:3000"
    )
    assert first.run_url == "http://dagster.bank:3000/runs/r1"
    assert "In the UI:     http://dagster.bank:3000/runs/r1" in (
        render_run_failure(first, "from@x", ["ops@x"]).get_payload()
    )
    assert first.offset_range == "transactions/2 offsets 100-199"
    assert first.errors == ("boom",)
    assert first.retry_note == "attempt 1 of 3; Dagster retries it"

    last = run_failure_notice(
        "r3", "score_transactions", {**tags, "dagster/retry_number": "2"}, ["boom"], True, 2
    )
    assert last.retry_note == "attempt 3; no automatic retry left, rerun it by hand"

    opted_out = run_failure_notice(
        "r4", "reload_model", {"dagster/max_retries": "0"}, ["refused"], True, 2
    )
    assert opted_out.offset_range is None
    assert "no automatic retry left" in opted_out.retry_note
    assert "no automatic retry" in run_failure_notice("r5", "j", {}, ["e"], False, 2).retry_note
    final = run_failure_notice(
        "r6",
        "score_transactions",
        {**tags, "dagster/retry_on_asset_or_op_failure": "false"},
        ["topic deleted"],
        True,
        2,
    )
    assert final.retry_note == "attempt 1; not retried: a retry would fail the same way"
    assert final.advice is not None and "Do not re-execute it" in final.advice

    # Dagster's own decision, once written, wins: it counts re-executions by hand, which
    # carry no retry number (an operator's rerun after the two retries is not retried).
    rerun = {**tags, "dagster/parent_run_id": "r3", "dagster/will_retry": "false"}
    assert run_failure_notice("r7", "score_transactions", rerun, ["e"], True, 2).retry_note == (
        "a re-execution; no automatic retry left, rerun it by hand"
    )
    retried = {**tags, "dagster/retry_number": "1", "dagster/will_retry": "true"}
    assert run_failure_notice("r8", "score_transactions", retried, ["e"], True, 2).retry_note == (
        "attempt 2 of 3; Dagster retries it"
    )
    odd = {"fraud_dagster/offset_range": "1-2", "dagster/max_retries": "two"}  # a hand launch
    assert run_failure_notice("r9", "score_transactions", odd, ["e"], True, 2).offset_range == (
        "?/? offsets 1-2"
    )


def test_a_failed_alert_sender_run_asks_for_no_rerun() -> None:
    """retry_alerts is the alert sender's retry: its failures must not ask for a rerun."""
    notice = run_failure_notice(
        "r1", "send_pending_alerts", {"dagster/max_retries": "0"}, ["smtp down"], True, 2
    )
    assert "retry_alerts sensor" in notice.retry_note
    body = render_run_failure(notice, "from@x", ["ops@x"]).get_payload(decode=True).decode()
    assert "Nothing to re-execute" in body and "Re-execute > From failure" not in body


def test_a_resent_failure_email_has_the_same_one_line_message_id() -> None:
    run_id = "7f0ffb1b-e328-4379-b001-1da34c5f1fd8"
    notice = RunFailureNotice(run_id, "score_transactions", None, ("e",), "attempt 1")
    first = render_run_failure(notice, "from@x", ["ops@x"])
    again = render_run_failure(notice, "from@x", ["ops@x"])
    assert first["Message-ID"] == again["Message-ID"] == run_failure_message_id(run_id)
    assert b"Message-ID: <failed-run.7f0ffb1b" in first.as_bytes()  # not folded


def test_op_config_out_of_bounds_is_refused_when_the_run_starts() -> None:
    """Before: max_alerts -1 became SQL `LIMIT -1` (no limit on SQLite, an error on
    PostgreSQL) and a negative grace or wait was taken as given."""
    assert AlertRetryConfig().max_alerts == 500 and OrderConfig().max_wait_seconds == 300
    for config, values in (
        (AlertRetryConfig, {"max_alerts": 0}),
        (AlertRetryConfig, {"max_alerts": -1}),
        (AlertRetryConfig, {"pending_grace_seconds": -5}),
        (OrderConfig, {"max_wait_seconds": -1}),
    ):
        with pytest.raises(ValidationError, match="greater than or equal to"):
            config(**values)
