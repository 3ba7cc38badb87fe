"""Wiring: the code location loads, every job resolves, lineage is as documented."""

from __future__ import annotations

import dagster as dg

from fraud_dagster.definitions import defs


def test_every_job_resolves() -> None:
    for job in defs.resolve_all_job_defs():
        assert job.name


def test_score_transactions_runs_in_process_with_the_five_ops() -> None:
    job = defs.resolve_job_def("score_transactions")
    assert job.executor_def.name == "in_process"
    graph = job.graph.node_dict["transaction_batch"].definition
    assert set(graph.node_names()) == {"fetch", "preprocess", "score", "persist", "alert"}


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
