"""Wiring: the code location loads, every job resolves, lineage is as documented."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace

import dagster as dg

from fraud_dagster.definitions import defs
from fraud_dagster.sensors import build_kafka_transactions_sensor, dagster_minimum_interval
from fraud_dagster.settings import load_settings


def test_every_job_resolves() -> None:
    names = {job.name for job in defs.resolve_all_job_defs()}
    assert names - {"__ASSET_JOB"} == {
        "score_transactions",
        "send_pending_alerts",
        "reload_model",
        "train_model",
    }


def test_score_transactions_runs_in_process_with_the_seven_ops() -> None:
    job = defs.resolve_job_def("score_transactions")
    assert job.executor_def.name == "in_process"
    graph = job.graph.node_dict["transaction_batch"].definition
    assert set(graph.node_names()) == {
        "fetch",
        "wait_for_earlier_batches",
        "preprocess",
        "score",
        "persist",
        "alert",
        "check_batch",
    }


def test_every_batch_run_evaluates_the_asset_checks() -> None:
    expected = {
        dg.AssetCheckKey(dg.AssetKey("scored_transactions"), "rejected_share"),
        dg.AssetCheckKey(dg.AssetKey("scored_transactions"), "offsets_read"),
        dg.AssetCheckKey(dg.AssetKey("suspicious_transactions"), "score_drift"),
        dg.AssetCheckKey(dg.AssetKey("suspicious_transactions"), "model_file_verified"),
    }
    assert defs.resolve_asset_graph().asset_check_keys == expected
    job = defs.resolve_job_def("score_transactions")
    assert job.asset_layer.asset_graph.asset_check_keys == expected
    for key in expected:
        assert job.asset_layer.get_op_output_name(key), key


def test_everything_an_operator_sees_has_a_description() -> None:
    graph = defs.resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        assert graph.get(key).description, key
    for check_key in graph.asset_check_keys:
        assert graph.get_check_spec(check_key).description, check_key
    jobs = [job for job in defs.resolve_all_job_defs() if not job.name.startswith("__")]
    assert {job.name for job in jobs} == {
        "score_transactions",
        "send_pending_alerts",
        "reload_model",
        "train_model",
    }
    for job in jobs:
        assert job.description, job.name
    repository = defs.get_repository_def()
    assert {s.name for s in repository.sensor_defs} == {
        "kafka_transactions_sensor",
        "retry_alerts",
        "email_operators_on_run_failure",
        "email_operators_on_canceled_batch",
        "email_operators_when_kafka_is_unreachable",
        "fail_runs_whose_worker_died",
        "email_operators_about_unstored_offsets",
        "recover_lost_automatic_retries",
    }
    for sensor in repository.sensor_defs:
        assert sensor.description, sensor.name
    for schedule in repository.schedule_defs:
        assert schedule.description, schedule.name
    resources = repository.get_top_level_resources()
    assert set(resources) == {"kafka", "model", "database", "smtp", "batch_checks"}
    for name, resource in resources.items():
        assert resource.description, name
        for field_name, field in resource.config_schema.config_type.fields.items():
            assert field.description, f"{name}.{field_name}"


def test_lineage() -> None:
    graph = defs.resolve_asset_graph()

    def parents(name: str) -> set[str]:
        return {key.to_user_string() for key in graph.get(dg.AssetKey(name)).parent_keys}

    assert parents("scored_transactions") == {"transactions_topic", "fraud_model"}
    assert parents("suspicious_transactions") == {"scored_transactions"}
    assert parents("fraud_alerts") == {"suspicious_transactions"}


def test_sensor_is_on_by_default() -> None:
    sensor = defs.resolve_sensor_def("kafka_transactions_sensor")
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING


def test_kafka_sensor_ticks_on_every_daemon_loop_its_interval_allows() -> None:
    """Interval 5 must not become 10: Dagster's 5-s loop would skip every other tick at exactly
    5 (its elapsed time is measured from the previous tick's start, just after its loop's)."""
    assert dagster_minimum_interval(5) == 4
    assert dagster_minimum_interval(30) == 29
    assert dagster_minimum_interval(1) == 1
    sensor = build_kafka_transactions_sensor(replace(load_settings(), sensor_interval_seconds=5))
    assert sensor.minimum_interval_seconds == 4


def test_loading_the_code_location_prints_no_warning() -> None:
    """What a code server or run worker prints to the operator's terminal as it loads `defs`:
    a fresh interpreter with Python's default warning filters (pytest's would hide them)."""
    load = (
        "import fraud_dagster.definitions as d; "
        "d.defs.get_repository_def(); "
        "d.defs.resolve_all_job_defs()"
    )
    result = subprocess.run(
        [sys.executable, "-c", load],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env={**os.environ, "PYTHONWARNINGS": ""},
    )
    assert "Warning" not in result.stderr, result.stderr
