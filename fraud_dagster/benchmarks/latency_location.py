"""The production code location plus a latency-floor probe, for the streaming latency benchmark.

The probe is a trivial job (four ops that do nothing, in process) requested by a sensor, in the
same code location and with the same run launcher as the real pipeline, so its request -> success
time is the floor that Dagster itself puts under every batch run. The sensor requests
`FRAUD_FLOOR_RUNS` runs, one per tick, then stops asking. Not part of the product's `defs`.
"""

from __future__ import annotations

import os

import dagster as dg

from fraud_dagster import definitions as production
from fraud_dagster.settings import load_settings

FLOOR_TAG = "fraud_dagster/latency_floor"


@dg.op
def noop_a() -> int:
    return 1


@dg.op
def noop_b(value: int) -> int:
    return value


@dg.op
def noop_c(value: int) -> int:
    return value


@dg.op
def noop_d(value: int) -> None:
    return None


@dg.job(executor_def=dg.in_process_executor, description="Four ops that do nothing: the floor.")
def latency_floor() -> None:
    noop_d(noop_c(noop_b(noop_a())))


def _floor_sensor(runs: int, interval_seconds: int) -> dg.SensorDefinition:
    @dg.sensor(
        job=latency_floor,
        minimum_interval_seconds=interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING if runs else dg.DefaultSensorStatus.STOPPED,
        description="Requests one trivial run per tick until the benchmark has its sample.",
    )
    def latency_floor_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        requested = int(context.cursor or 0)
        if requested >= runs:
            return dg.SensorResult(skip_reason=dg.SkipReason("floor sample complete"))
        return dg.SensorResult(
            run_requests=[dg.RunRequest(run_key=f"floor-{requested}", tags={FLOOR_TAG: "1"})],
            cursor=str(requested + 1),
        )

    return latency_floor_sensor


_settings = load_settings()
defs = dg.Definitions.merge(
    production.defs,
    dg.Definitions(
        jobs=[latency_floor],
        sensors=[
            _floor_sensor(
                int(os.environ.get("FRAUD_FLOOR_RUNS", "0")), _settings.sensor_interval_seconds
            )
        ],
    ),
)
