"""Everything Dagster loads: assets, jobs, sensors and resources, assembled from `settings`."""

from __future__ import annotations

import warnings

import dagster as dg

from fraud_dagster.assets import transactions_topic
from fraud_dagster.jobs import score_transactions_job, send_pending_alerts_job
from fraud_dagster.model_ops import fraud_model, reload_model_job, train_model_job
from fraud_dagster.ops import transaction_batch_assets
from fraud_dagster.resources import build_resources
from fraud_dagster.schedules import build_reload_model_schedule
from fraud_dagster.sensors import (
    build_canceled_batch_sensor,
    build_dead_worker_sensor,
    build_kafka_transactions_sensor,
    build_kafka_watch_sensor,
    build_lost_retry_sensor,
    build_retry_alerts_sensor,
    build_run_failure_sensor,
    build_unstored_offsets_sensor,
)
from fraud_dagster.settings import Settings, load_settings


def build_definitions(settings: Settings) -> dg.Definitions:
    """The code location for `settings`; tests build their own with their services' settings."""
    jobs = [score_transactions_job, send_pending_alerts_job, reload_model_job, train_model_job]
    job_names = [job.name for job in jobs]
    return dg.Definitions(
        assets=[transactions_topic, fraud_model, transaction_batch_assets],
        jobs=jobs,
        schedules=[build_reload_model_schedule(settings)],
        sensors=[
            build_kafka_transactions_sensor(settings),
            build_kafka_watch_sensor(settings),
            build_retry_alerts_sensor(settings),
            build_run_failure_sensor(settings, job_names),
            build_canceled_batch_sensor(settings),
            build_dead_worker_sensor(settings, job_names),
            build_lost_retry_sensor(settings, job_names),
            build_unstored_offsets_sensor(settings),
        ],
        resources=build_resources(settings),
    )


# No sensor here sets `owners`. When Definitions binds the resources to a sensor's job,
# Dagster's own `SensorDefinition.with_attributes` passes the empty `owners` on (1.13.27-29),
# and that warns that the parameter is in beta. Every code server and run worker would print it
# to the operator's terminal. Only that message is silenced.
warnings.filterwarnings(
    "ignore",
    message=r"Parameter `owners` of initializer `SensorDefinition.__init__` is currently in beta",
    category=dg.BetaWarning,
)

defs = build_definitions(load_settings())
