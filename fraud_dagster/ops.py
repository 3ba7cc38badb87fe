"""The ops of a batch run and the graph-backed assets they write (no postponed annotations here:
Dagster reads the config and resource types of op signatures at import time).

Each op is a few lines around a function of `pipeline.py`. The graph `transaction_batch` is
turned into the assets scored_transactions, suspicious_transactions and fraud_alerts, so every
batch run materializes them with the batch's metadata (offsets, counts, model version).
"""

import time
import uuid
from datetime import timedelta

import dagster as dg

from fraud_dagster import pipeline
from fraud_dagster.assets import GROUP
from fraud_dagster.errors import FraudDagsterError
from fraud_dagster.messages import RawBatch
from fraud_dagster.resources import DatabaseResource, KafkaResource, ModelResource, SmtpResource
from fraud_dagster.storage.store import contiguous_end, outbox_status

FRAUD_ALERTS_KEY = dg.AssetKey("fraud_alerts")

# Kafka and the database can blink; a few retries with backoff absorb that without a rerun.
IO_RETRY_POLICY = dg.RetryPolicy(max_retries=3, delay=2.0, backoff=dg.Backoff.EXPONENTIAL)


class BatchConfig(dg.Config):
    """The offset range of one batch: partition `partition` of `topic`, first..last inclusive."""

    topic: str
    partition: int
    first_offset: int
    last_offset: int


@dg.op(ins={"topic": dg.In(dg.Nothing)}, retry_policy=IO_RETRY_POLICY)
def fetch(context: dg.OpExecutionContext, config: BatchConfig, kafka: KafkaResource) -> RawBatch:
    """Read exactly the batch's offset range from Kafka, stopping at its last offset."""
    raw = kafka.read_range(config.topic, config.partition, config.first_offset, config.last_offset)
    context.log.info(
        f"read {len(raw)} messages from {config.topic}/{config.partition} "
        f"offsets {config.first_offset}..{config.last_offset}"
    )
    return raw


@dg.op(retry_policy=IO_RETRY_POLICY)
def preprocess(
    context: dg.OpExecutionContext, raw: RawBatch, database: DatabaseResource
) -> pipeline.PreparedBatch:
    """Validate messages, set types and timestamps, and compute the model's features."""
    prepared = pipeline.prepare_batch(raw, database.get_engine())
    context.log.info(
        f"{len(prepared.transactions)} valid transactions, {len(prepared.rejections)} rejected"
    )
    for rejection in prepared.rejections[:20]:
        context.log.warning(f"rejected offset {rejection.offset}: {rejection.reason}")
    return prepared


@dg.op(ins={"prepared": dg.In(), "model_ready": dg.In(dg.Nothing)})
def score(
    context: dg.OpExecutionContext,
    prepared: pipeline.PreparedBatch,
    model: ModelResource,
    database: DatabaseResource,
) -> pipeline.ScoredBatch:
    """Score the whole batch in one predict_proba call with the verified, promoted model."""
    loaded = model.load(database.get_engine())
    scored = pipeline.score_batch(prepared, loaded)
    context.log.info(
        f"model {loaded.version} (threshold {loaded.threshold:.3f}) flagged "
        f"{scored.suspicious_count} of {len(scored.transactions)} transactions"
    )
    return scored


@dg.op(
    out={
        "scored_transactions": dg.Out(dg.Nothing),
        "suspicious_transactions": dg.Out(dg.Nothing),
        "batch": dg.Out(pipeline.BatchRef),
    },
    retry_policy=IO_RETRY_POLICY,
)
def persist(
    context: dg.OpExecutionContext,
    scored: pipeline.ScoredBatch,
    database: DatabaseResource,
    kafka: KafkaResource,
):
    """Upsert the batch in one transaction, then commit its end offset for the consumer group."""
    engine = database.get_engine()
    result = pipeline.store_batch(scored, engine, context.run_id)
    ref = scored.ref
    committed: int | None = None
    try:
        committed = kafka.commit_stored(
            ref.topic,
            ref.partition,
            lambda start: contiguous_end(engine, ref.topic, ref.partition, start),
        )
    except FraudDagsterError as exc:
        context.log.warning(f"stored, but committing the consumer group offset failed: {exc}")
    else:
        if committed is None or committed <= ref.last_offset:
            context.log.warning(
                f"stored, but the consumer group stays at offset {committed}: an earlier batch "
                f"of {ref.topic}/{ref.partition} is not stored yet (failed? rerun it), so the "
                "lag keeps showing it"
            )
    latency = (
        time.time() - scored.oldest_kafka_timestamp_ms / 1000
        if scored.oldest_kafka_timestamp_ms
        else None
    )
    batch_metadata = {
        "topic": ref.topic,
        "partition": ref.partition,
        "first_offset": ref.first_offset,
        "last_offset": ref.last_offset,
        "model_version": scored.model_version,
    }
    yield dg.Output(
        None,
        "scored_transactions",
        metadata={
            **batch_metadata,
            "read": scored.read_count,
            "rejected": len(scored.rejections) + result.duplicates_rejected,
            "scored": len(scored.transactions),
            "inserted": result.inserted,
            "already_stored": result.already_stored,
            "suspicious": scored.suspicious_count,
            "batch_latency_seconds": dg.MetadataValue.float(round(latency, 3))
            if latency is not None
            else dg.MetadataValue.null(),
            "score_histogram": dg.MetadataValue.json(scored.score_histogram()),
            "consumer_group_offset": dg.MetadataValue.int(committed)
            if committed is not None
            else dg.MetadataValue.null(),
        },
    )
    yield dg.Output(
        None,
        "suspicious_transactions",
        metadata={
            **batch_metadata,
            "suspicious": scored.suspicious_count,
            "newly_stored": result.suspicious_inserted,
            "threshold": scored.threshold,
        },
    )
    yield dg.Output(ref, "batch")


@dg.op(out=dg.Out(dg.Nothing))
def alert(
    context: dg.OpExecutionContext,
    batch: pipeline.BatchRef,
    database: DatabaseResource,
    smtp: SmtpResource,
):
    """Email every due alert of the batch from the outbox: one email per suspicious transaction.

    An SMTP outage does not fail the run: the batch's data is stored and its offset committed,
    so failing would only make run retries redo finished work against a server that is still
    down. The alerts stay in the outbox with their error and are sent by the `retry_alerts`
    sensor once SMTP is back; this run shows a warning and `pending_retry`/`last_error` metadata.
    """
    report = pipeline.deliver_alerts(
        database.get_engine(),
        smtp.smtp_settings(),
        smtp.sender,
        smtp.recipients,
        token=f"{context.run_id}:{uuid.uuid4().hex[:8]}",
        batch=batch,
        retry_base_seconds=smtp.retry_base_seconds,
        retry_max_seconds=smtp.retry_max_seconds,
    )
    if report.error:
        context.log.warning(
            f"{report.failed} alert(s) stay in the outbox for the retry_alerts sensor: "
            f"{report.error}"
        )
    context.log.info(f"sent {report.sent} alert email(s) for {batch.label}")
    return dg.Output(
        None,
        metadata={
            "topic": batch.topic,
            "partition": batch.partition,
            "first_offset": batch.first_offset,
            "last_offset": batch.last_offset,
            "alerted": report.sent,
            "pending_retry": report.failed,
            "last_error": report.error or "",
        },
    )


class AlertRetryConfig(dg.Config):
    """Which outbox alerts a retry run takes: due ones, at most `max_alerts`."""

    pending_grace_seconds: float = 120.0
    max_alerts: int = 500


@dg.op(out=dg.Out(dg.Nothing))
def send_due_alerts(
    context: dg.OpExecutionContext,
    config: AlertRetryConfig,
    database: DatabaseResource,
    smtp: SmtpResource,
):
    """Send the outbox's due alerts (failed ones past their backoff, pending ones left behind).

    Unlike a batch run, this run exists only to send: if SMTP still fails it fails, so the
    operator sees it; the alerts stay in the outbox with a longer backoff.
    """
    engine = database.get_engine()
    report = pipeline.deliver_alerts(
        engine,
        smtp.smtp_settings(),
        smtp.sender,
        smtp.recipients,
        token=f"{context.run_id}:{uuid.uuid4().hex[:8]}",
        limit=config.max_alerts,
        pending_grace=timedelta(seconds=config.pending_grace_seconds),
        retry_base_seconds=smtp.retry_base_seconds,
        retry_max_seconds=smtp.retry_max_seconds,
    )
    status = outbox_status(engine)
    metadata = {
        "claimed": report.claimed,
        "alerted": report.sent,
        "pending_retry": report.failed,
        "last_error": report.error or "",
        "outbox_unsent": status.unsent,
        "outbox_by_status": dg.MetadataValue.json(status.counts),
        "next_attempt_at": status.next_attempt_at.isoformat() + "Z"
        if status.next_attempt_at
        else "",
    }
    context.log_event(dg.AssetObservation(asset_key=FRAUD_ALERTS_KEY, metadata=metadata))
    if report.error:
        raise dg.Failure(
            description=(
                f"sent {report.sent} of {report.claimed} due alert(s); {report.failed} stay in "
                f"the outbox for the next retry: {report.error}"
            ),
            metadata=metadata,
            allow_retries=False,
        )
    context.log.info(f"sent {report.sent} due alert email(s); {status.unsent} still unsent")


@dg.graph(
    out={
        "scored_transactions": dg.GraphOut(),
        "suspicious_transactions": dg.GraphOut(),
        "fraud_alerts": dg.GraphOut(),
    }
)
def transaction_batch(transactions_topic, fraud_model):
    """fetch -> preprocess -> score -> persist -> alert, for one offset range of one partition."""
    scored_out, suspicious_out, batch = persist(
        score(preprocess(fetch(transactions_topic)), fraud_model)
    )
    return {
        "scored_transactions": scored_out,
        "suspicious_transactions": suspicious_out,
        "fraud_alerts": alert(batch),
    }


_KEYS = {
    name: dg.AssetKey(name)
    for name in ("scored_transactions", "suspicious_transactions", "fraud_alerts")
}

transaction_batch_assets = dg.AssetsDefinition.from_graph(
    transaction_batch,
    keys_by_input_name={
        "transactions_topic": dg.AssetKey("transactions_topic"),
        "fraud_model": dg.AssetKey("fraud_model"),
    },
    keys_by_output_name=_KEYS,
    internal_asset_deps={
        "scored_transactions": {dg.AssetKey("transactions_topic"), dg.AssetKey("fraud_model")},
        "suspicious_transactions": {_KEYS["scored_transactions"]},
        "fraud_alerts": {_KEYS["suspicious_transactions"]},
    },
    group_name=GROUP,
    descriptions_by_output_name={
        "scored_transactions": (
            "Every transaction read from Kafka and scored: the seed's fields, extra fields, Kafka "
            "coordinates, fraud probability and the model version that scored it. Table "
            "scored_transactions; also the history the online features are computed from."
        ),
        "suspicious_transactions": (
            "Transactions whose fraud probability reached the model's threshold: the risk "
            "analysts' queue. Table suspicious_transactions."
        ),
        "fraud_alerts": (
            "The alert outbox: one email per suspicious transaction, with its delivery status "
            "(pending, sent, failed), attempts and last error. Table fraud_alerts."
        ),
    },
)
