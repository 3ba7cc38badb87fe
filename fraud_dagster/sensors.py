"""Sensors: the Kafka poller that launches batch runs."""

from __future__ import annotations

import dagster as dg

from fraud_dagster.batching import SensorCursor, plan_batches
from fraud_dagster.errors import FraudDagsterError
from fraud_dagster.jobs import batch_run_config, score_transactions_job
from fraud_dagster.resources import KafkaResource
from fraud_dagster.settings import Settings


def build_kafka_transactions_sensor(settings: Settings) -> dg.SensorDefinition:
    """Poll the topic's end offsets and request one run per new offset range of a partition.

    The cursor holds {partition: next offset}; run keys are `<topic>/<partition>/<first>-<last>`,
    so a range is never launched twice. If the broker cannot be reached the tick is skipped
    with the reason and the cursor stays where it was: nothing is skipped over.
    """

    @dg.sensor(
        name="kafka_transactions_sensor",
        job=score_transactions_job,
        minimum_interval_seconds=settings.sensor_interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=(
            "Launches a score_transactions run for each new offset range (at most "
            f"{settings.max_batch_size} messages) of each partition of the transaction topic."
        ),
    )
    def kafka_transactions_sensor(
        context: dg.SensorEvaluationContext, kafka: KafkaResource
    ) -> dg.SensorResult | dg.SkipReason:
        cursor = SensorCursor.parse(context.cursor, kafka.topic)
        try:
            beginning, end = kafka.offset_bounds()
            new_partitions = set(end) - set(cursor.next_offsets)
            committed = kafka.committed_offsets() if new_partitions else {}
        except FraudDagsterError as exc:
            return dg.SkipReason(f"Kafka unavailable, cursor unchanged: {exc}")
        plan = plan_batches(
            cursor,
            beginning,
            end,
            committed,
            max_batch_size=settings.max_batch_size,
            max_batches=settings.max_runs_per_tick,
        )
        for note in plan.notes:
            context.log.warning(note)
        if plan.backlog_messages:
            context.log.info(f"{plan.backlog_messages} messages left for the next tick")
        if not plan.batches:
            return dg.SensorResult(
                skip_reason=dg.SkipReason(f"no new messages on {kafka.topic}"),
                cursor=plan.cursor.serialize(),
            )
        return dg.SensorResult(
            run_requests=[
                dg.RunRequest(
                    run_key=batch.run_key,
                    run_config=batch_run_config(batch),
                    tags=batch.tags(),
                )
                for batch in plan.batches
            ],
            cursor=plan.cursor.serialize(),
        )

    return kafka_transactions_sensor
