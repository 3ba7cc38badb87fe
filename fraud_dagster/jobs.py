"""Jobs: what a run executes. Batch runs execute in process: no process per op, seconds saved."""

from __future__ import annotations

from typing import Any

import dagster as dg

from fraud_dagster.batching import PlannedBatch
from fraud_dagster.ops import transaction_batch_assets

SCORE_TRANSACTIONS_JOB = "score_transactions"

score_transactions_job = dg.define_asset_job(
    name=SCORE_TRANSACTIONS_JOB,
    selection=dg.AssetSelection.assets(transaction_batch_assets),
    executor_def=dg.in_process_executor,
    description=(
        "Score one offset range of one Kafka partition: fetch, preprocess, score, persist, alert. "
        "Launched by kafka_transactions_sensor; safe to re-execute (nothing is written twice)."
    ),
)


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
