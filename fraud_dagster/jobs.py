"""Jobs: what a run executes. Batch runs execute in process: no process per op, seconds saved."""

from __future__ import annotations

from typing import Any

import dagster as dg

from fraud_dagster.batching import SCORE_TRANSACTIONS_JOB, PlannedBatch
from fraud_dagster.ops import send_due_alerts, transaction_batch_assets

SEND_PENDING_ALERTS_JOB = "send_pending_alerts"
# At most one alert-retry run at a time (dagster.yaml limits this tag to 1).
TAG_ALERT_SENDER = "fraud_dagster/alert_sender"

score_transactions_job = dg.define_asset_job(
    name=SCORE_TRANSACTIONS_JOB,
    selection=dg.AssetSelection.assets(transaction_batch_assets),
    executor_def=dg.in_process_executor,
    description=(
        "Score one offset range of one Kafka partition: fetch, wait for earlier batches of the "
        "partition, preprocess, score, persist, alert, check. Launched by "
        "kafka_transactions_sensor; safe to re-execute (nothing is written twice)."
    ),
)


@dg.job(
    name=SEND_PENDING_ALERTS_JOB,
    executor_def=dg.in_process_executor,
    # The retry_alerts sensor is this job's retry (with backoff); run retries would only hit a
    # still-down SMTP server again at once.
    tags={TAG_ALERT_SENDER: "outbox", "dagster/max_retries": "0"},
    description=(
        "Send the alert outbox's due emails: failed ones whose backoff has passed and pending "
        "ones no batch run sent. Launched by the retry_alerts sensor; fails while SMTP does."
    ),
)
def send_pending_alerts_job() -> None:
    send_due_alerts()


def batch_run_config(batch: PlannedBatch) -> dict[str, Any]:
    """Run config of a batch run: the offset range, nothing else (never message contents)."""
    return {
        "ops": {
            "transaction_batch": {
                "ops": {
                    "fetch": {
                        "config": {
                            "topic": batch.topic,
                            "partition": batch.partition,
                            "first_offset": batch.first_offset,
                            "last_offset": batch.last_offset,
                        }
                    }
                }
            }
        }
    }
