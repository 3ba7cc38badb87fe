"""The data assets of the system and where they come from, for the lineage in the Dagster UI.

transactions_topic (Kafka) -> scored_transactions -> suspicious_transactions -> fraud_alerts,
with fraud_model feeding the scoring. The three tables are written by each batch run of the
`transaction_batch` graph (see `ops.py`); the topic is declared here; the model is trained and
published by the `fraud_model` asset of `model_ops.py`.
"""

from __future__ import annotations

import dagster as dg

GROUP = "fraud_detection"

transactions_topic = dg.AssetSpec(
    key="transactions_topic",
    description=(
        "Card transactions as JSON objects on a Kafka topic, keyed by account id. Written by the "
        "bank's card systems (or `fraud-dagster produce`); read in offset ranges by batch runs."
    ),
    group_name=GROUP,
    kinds={"kafka"},
)
