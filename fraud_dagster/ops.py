"""The ops of a batch run and the graph-backed assets they write (no postponed annotations here:
Dagster reads the config and resource types of op signatures at import time).

Each op is a few lines around a function of `pipeline.py` (or `alert_delivery.py`). The graph
`transaction_batch` is turned into the assets scored_transactions, suspicious_transactions and
fraud_alerts, so every batch run materializes them with the batch's metadata (offsets, counts,
model version), and its `check_batch` step evaluates their asset checks (rejected share, score
drift, model file).
"""

import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from fraud_dagster import pipeline
from fraud_dagster.alert_claims import abandoned_claims, claim_token
from fraud_dagster.alert_delivery import deliver_alerts
from fraud_dagster.assets import GROUP
from fraud_dagster.batch_checks import (
    CheckOutcome,
    HistogramBin,
    check_model_file,
    check_offsets_read,
    check_rejected_share,
    check_score_drift,
    recorded_score_histogram,
    share_bar,
)
from fraud_dagster.batch_order import RunningBatch, wait_for_batches_ahead
from fraud_dagster.batching import (
    TAG_FIRST_OFFSET,
    TAG_LAST_OFFSET,
    TAG_PARTITION,
    TAG_TOPIC,
    TAG_TOPIC_ID,
    batch_config_problem,
)
from fraud_dagster.errors import FraudDagsterError, TopicChangedError
from fraud_dagster.features import HistoryRead
from fraud_dagster.messages import RawBatch
from fraud_dagster.resources import (
    BatchChecksResource,
    DatabaseResource,
    KafkaResource,
    ModelResource,
    SmtpResource,
)
from fraud_dagster.run_health import record_worker_start
from fraud_dagster.storage.batches import (
    contiguous_end,
    count_rejected,
    lost_in,
    record_deleted_unread,
)
from fraud_dagster.storage.outbox import outbox_status

FRAUD_ALERTS_KEY = dg.AssetKey("fraud_alerts")

# Kafka and the database can blink; a few retries with backoff absorb that without a rerun.
IO_RETRY_POLICY = dg.RetryPolicy(max_retries=3, delay=2.0, backoff=dg.Backoff.EXPONENTIAL)
# Dagster's run tag saying whether its run retries (dagster.yaml) take a run failed at an op.
RETRY_ON_OP_FAILURE_TAG = "dagster/retry_on_asset_or_op_failure"


class BatchConfig(dg.Config):
    """The offset range of one batch: partition `partition` of `topic`, first..last inclusive."""

    topic: str
    partition: int
    first_offset: int
    last_offset: int


def final_failure(context: dg.OpExecutionContext, description: str) -> dg.Failure:
    """A failure no retry can fix: neither the op's RetryPolicy nor Dagster's run retries try
    it again (each would fail the same way, and each failed run mails the operators again).
    Dagster decides on a run retry from the run's tags when the run fails, so the tag is set
    before the failure is raised."""
    context.instance.add_run_tags(context.run_id, {RETRY_ON_OP_FAILURE_TAG: "false"})
    return dg.Failure(description=description, allow_retries=False)


@dg.op(
    ins={"topic": dg.In(dg.Nothing)},
    out={"raw": dg.Out(RawBatch), "batch": dg.Out(pipeline.BatchRef)},
    retry_policy=IO_RETRY_POLICY,
)
def fetch(context: dg.OpExecutionContext, config: BatchConfig, kafka: KafkaResource):
    """Read exactly the batch's offset range from Kafka, stopping at its last offset; refused,
    without retries, if the topic the sensor planned it for (its id, in the run's tags) has
    been deleted since: the offsets of the topic now under that name are other messages."""
    record_worker_start(context)  # how run health recognises this worker, whatever the clock
    problem = batch_config_problem(
        config.topic, config.partition, config.first_offset, config.last_offset, context.run.tags
    )
    if problem:
        raise final_failure(context, f"this batch's offset range cannot be read: {problem}")
    try:
        raw = kafka.read_range(
            config.topic,
            config.partition,
            config.first_offset,
            config.last_offset,
            topic_id=context.run.tags.get(TAG_TOPIC_ID),
        )
    except TopicChangedError as exc:
        raise final_failure(context, str(exc)) from exc
    context.log.info(
        f"read {len(raw)} messages from {config.topic}/{config.partition} "
        f"offsets {config.first_offset}..{config.last_offset}"
    )
    if raw.deleted_by_retention:
        lost_first, lost_last = raw.deleted_by_retention
        context.log.warning(
            f"offsets {lost_first}..{lost_last} of {config.topic}/{config.partition} were deleted "
            "by Kafka retention before this run read them; those no earlier run stored are "
            f"recorded in lost_ranges (check {OFFSETS_READ_CHECK.name})"
        )
    yield dg.Output(raw, "raw")
    yield dg.Output(
        pipeline.BatchRef(config.topic, config.partition, config.first_offset, config.last_offset),
        "batch",
    )


class OrderConfig(dg.Config):
    """How long a batch waits for the batches ahead of it in its partition to be stored."""

    max_wait_seconds: float = Field(default=300.0, ge=0)


RUNNING_STATUSES = [dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED]


def batch_runs(
    instance: dg.DagsterInstance,
    job_name: str,
    topic: str,
    statuses: list[dg.DagsterRunStatus],
    partition: int | None = None,
) -> list[RunningBatch]:
    """The batch runs of `topic` (of one partition, if given) in `statuses`, by the partition
    and offset range in their tags."""
    tags = {TAG_TOPIC: topic}
    if partition is not None:
        tags[TAG_PARTITION] = str(partition)
    runs = instance.get_runs(filters=dg.RunsFilter(job_name=job_name, statuses=statuses, tags=tags))
    return [
        RunningBatch(
            int(run.tags[TAG_FIRST_OFFSET]),
            int(run.tags[TAG_LAST_OFFSET]),
            run.run_id,
            int(run.tags[TAG_PARTITION]),
        )
        for run in runs
        if {TAG_PARTITION, TAG_FIRST_OFFSET, TAG_LAST_OFFSET} <= set(run.tags)
    ]


@dg.op(out=dg.Out(dg.Nothing), retry_policy=IO_RETRY_POLICY)
def wait_for_earlier_batches(
    context: dg.OpExecutionContext,
    config: OrderConfig,
    batch: pipeline.BatchRef,
    database: DatabaseResource,
):
    """Hold the batch until every earlier batch of its partition that is running is stored.

    Two runs of a partition may be under way at once (dagster.yaml), so that the next one's
    start-up overlaps the previous one's work; the features need the earlier rows stored. A
    run ahead that fails does not hold this one back; one that takes longer than
    `max_wait_seconds` is given up on with a warning (its rows then miss from this batch's
    features, as when it fails). The step's duration in the UI is the time spent waiting.
    """

    def list_running() -> list[RunningBatch]:
        return batch_runs(
            context.instance, context.job_name, batch.topic, RUNNING_STATUSES, batch.partition
        )

    def is_stored(ahead: RunningBatch) -> bool:
        # The database only when a run is ahead: alone, the batch goes straight on.
        engine = database.get_engine()
        end = contiguous_end(engine, batch.topic, batch.partition, ahead.first_offset)
        return end > ahead.last_offset

    outcome = wait_for_batches_ahead(
        list_running, is_stored, batch.first_offset, context.run_id, config.max_wait_seconds
    )
    if outcome.gave_up:
        context.log.warning(
            f"waited {outcome.waited_seconds:.0f} s for earlier batches of {batch.label} "
            "(runs "
            + ", ".join(
                f"{b.run_id} offsets {b.first_offset}-{b.last_offset}" for b in outcome.gave_up_on
            )
            + "); going on without their rows in the features"
        )
    elif outcome.waited_for:
        context.log.info(
            f"waited {outcome.waited_seconds:.2f} s until run(s) {', '.join(outcome.waited_for)} "
            f"stored the offsets before {batch.first_offset}"
        )
    return dg.Output(
        None,
        metadata={
            "waited_seconds": round(outcome.waited_seconds, 3),
            "waited_for_runs": len(outcome.waited_for),
            "gave_up_on_runs": len(outcome.gave_up_on),
        },
    )


@dg.op(ins={"raw": dg.In(), "in_order": dg.In(dg.Nothing)}, retry_policy=IO_RETRY_POLICY)
def preprocess(
    context: dg.OpExecutionContext, raw: RawBatch, database: DatabaseResource
) -> dg.Output[pipeline.PreparedBatch]:
    """Validate messages, set types and timestamps, and compute the model's features."""
    prepared = pipeline.prepare_batch(raw, database.get_engine())
    context.log.info(
        f"{len(prepared.transactions)} valid transactions, {len(prepared.rejections)} rejected"
        + "".join(
            f"; {kind} history: {read.rows} rows and {read.sums} sums of {read.summed} "
            f"stored transactions ({read.rollup_rows} rollup rows)"
            for kind, read in _history_reads(prepared)
        )
    )
    for rejection in prepared.rejections[:20]:
        context.log.warning(f"rejected offset {rejection.offset}: {rejection.reason}")
    if prepared.history_complete is False:
        context.log.warning(
            f"offsets {prepared.history_stored_until}..{raw.first_offset - 1} of "
            f"{raw.topic}/{raw.partition} are not all stored (an earlier batch failed or is "
            "still running; rerun it): this batch's features are computed without their rows "
            "(history_complete: false)"
        )
    metadata = {
        "valid_transactions": len(prepared.transactions),
        "rejected_messages": len(prepared.rejections),
    }
    for kind, read in _history_reads(prepared):
        metadata[f"{kind}_history_rows"] = read.rows
        metadata[f"{kind}_history_sums"] = read.sums
        metadata[f"{kind}_history_summed"] = read.summed
        metadata[f"{kind}_history_rollup_rows"] = read.rollup_rows
    return dg.Output(prepared, metadata=metadata)


def _history_reads(prepared: pipeline.PreparedBatch) -> list[tuple[str, HistoryRead]]:
    """What the features read per kind of window: the figures to look at when `preprocess` slows
    down (`summed` grows with how busy the batch's accounts and merchants are; the accounts' read
    with their `rollup_rows`)."""
    reads = [("account", prepared.accounts_read), ("merchant", prepared.merchants_read)]
    return [(kind, read) for kind, read in reads if read is not None]


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

    def record_lost(first: int, last: int) -> None:
        lost = record_deleted_unread(engine, ref.topic, ref.partition, first, last, context.run_id)
        if lost:
            spans = ", ".join(f"{a}..{b}" for a, b in lost)
            context.log.error(
                f"offsets {spans} of {ref.topic}/{ref.partition} were deleted by Kafka retention "
                "before any batch stored them (their batch failed and was not rerun in time): "
                "recorded in lost_ranges, and the consumer group moves past them"
            )

    try:
        committed = kafka.commit_stored(
            ref.topic,
            ref.partition,
            lambda start: contiguous_end(engine, ref.topic, ref.partition, start),
            record_lost,
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
            "lost_offsets": result.lost_offsets,
            "suspicious": scored.suspicious_count,
            "batch_latency_seconds": dg.MetadataValue.float(round(latency, 3))
            if latency is not None
            else dg.MetadataValue.null(),
            "score_histogram": _score_histogram_table(scored.score_histogram()),
            "consumer_group_offset": dg.MetadataValue.int(committed)
            if committed is not None
            else dg.MetadataValue.null(),
            "history_complete": dg.MetadataValue.bool(scored.history_complete)
            if scored.history_complete is not None
            else dg.MetadataValue.null(),
        },
    )
    yield dg.Output(
        None,
        "suspicious_transactions",
        metadata={
            **batch_metadata,
            "scored": len(scored.transactions),
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
    record_worker_start(context)  # its claims are its own while this worker lives
    engine = database.get_engine()
    report = deliver_alerts(
        engine,
        smtp.alert_delivery(),
        token=claim_token(context.run_id),
        batch=batch,
        abandoned=abandoned_claims(context.instance, engine),
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
            "pending_retry": report.failed + report.released,
            "last_error": report.error or "",
        },
    )


REJECTED_SHARE_CHECK = dg.AssetCheckSpec(
    "rejected_share",
    asset="scored_transactions",
    description=(
        "At most FRAUD_CHECK_MAX_REJECTED_SHARE of the batch's messages were rejected (each is "
        "stored in rejected_transactions with its reason). Severity WARN: nothing is lost, but "
        "a high share usually means a producer changed its message format."
    ),
)
SCORE_DRIFT_CHECK = dg.AssetCheckSpec(
    "score_drift",
    asset="suspicious_transactions",
    description=(
        "The population stability index (PSI) of the batch's fraud probabilities against the "
        "held-out scores recorded when the model was trained is at most "
        "FRAUD_CHECK_MAX_SCORE_PSI (batches under FRAUD_CHECK_DRIFT_MIN_SCORES scores are not "
        "judged). Severity WARN: the batch is flagged as usual, but the threshold may no "
        "longer fit the traffic."
    ),
)
OFFSETS_READ_CHECK = dg.AssetCheckSpec(
    "offsets_read",
    asset="scored_transactions",
    description=(
        "No offset of the batch's range was deleted by Kafka retention before any batch read "
        "it. Severity ERROR: such offsets were never scored or alerted on; they are recorded "
        "in lost_ranges and the partition goes on past them."
    ),
)
MODEL_FILE_CHECK = dg.AssetCheckSpec(
    "model_file_verified",
    asset="suspicious_transactions",
    description=(
        "The file of the model that scored the batch still hashes to the SHA-256 recorded in "
        "models/manifest.json. Severity ERROR: a changed file means the model was tampered "
        "with or replaced, and the next batch run will refuse to load it."
    ),
)
BATCH_CHECKS = (REJECTED_SHARE_CHECK, OFFSETS_READ_CHECK, SCORE_DRIFT_CHECK, MODEL_FILE_CHECK)


@dg.op(
    ins={"scored": dg.In(), "stored": dg.In(dg.Nothing)},
    out={spec.get_python_identifier(): dg.Out(dg.Nothing) for spec in BATCH_CHECKS},
    # When both are ready, the alert step goes first: emails before checks.
    tags={"dagster/priority": "-1"},
    retry_policy=IO_RETRY_POLICY,
)
def check_batch(
    context: dg.OpExecutionContext,
    scored: pipeline.ScoredBatch,
    model: ModelResource,
    database: DatabaseResource,
    batch_checks: BatchChecksResource,
):
    """Evaluate the batch's asset checks on what persist stored (it runs after persist).

    A failed check is a signal in the UI (WARN or ERROR), never a failed run: the data is
    stored and the alerts sent either way, and the stream goes on. A separate step, so that
    nothing in it can delay or block the alert step (which runs first).
    """
    models_dir = Path(model.models_dir)
    ref = scored.ref
    engine = database.get_engine()
    rejected = count_rejected(engine, ref.topic, ref.partition, ref.first_offset, ref.last_offset)
    scores = scored.transactions["fraud_probability"].to_numpy()
    results = [
        (
            REJECTED_SHARE_CHECK,
            dg.AssetCheckSeverity.WARN,
            check_rejected_share(scored.read_count, rejected, batch_checks.max_rejected_share),
        ),
        (
            OFFSETS_READ_CHECK,
            dg.AssetCheckSeverity.ERROR,
            check_offsets_read(
                ref.first_offset,
                ref.last_offset,
                lost_in(engine, ref.topic, ref.partition, ref.first_offset, ref.last_offset),
            ),
        ),
        (
            SCORE_DRIFT_CHECK,
            dg.AssetCheckSeverity.WARN,
            check_score_drift(
                scores,
                recorded_score_histogram(models_dir, scored.model_version),
                scored.model_version,
                batch_checks.max_score_psi,
                batch_checks.drift_min_scores,
            ),
        ),
        (
            MODEL_FILE_CHECK,
            dg.AssetCheckSeverity.ERROR,
            check_model_file(models_dir, scored.model_version),
        ),
    ]
    for spec, severity, outcome in results:
        if not outcome.passed:
            context.log.warning(
                f"check {spec.name} failed ({severity.value}): {outcome.description}"
            )
        yield dg.AssetCheckResult(
            asset_key=spec.asset_key,
            check_name=spec.name,
            passed=outcome.passed,
            severity=severity,
            description=outcome.description,
            metadata=_check_metadata(outcome),
        )


def _check_metadata(outcome: CheckOutcome) -> dict[str, Any]:
    """The outcome's figures as they are, the drift check's bins as a table."""
    metadata = dict(outcome.metadata)
    if "bins" in metadata:
        metadata["score_bins"] = _drift_table(metadata.pop("bins"))
    return metadata


def _drift_table(bins: list[HistogramBin]) -> dg.TableMetadataValue:
    """The batch's score shares beside the model's held-out shares, bin by bin."""
    columns = ("fraud_probability", "held_out_share", "batch_share", "batch_count", "batch")
    return dg.MetadataValue.table(
        records=[
            dg.TableRecord(
                {
                    "fraud_probability": b.label,
                    "held_out_share": f"{b.reference_share:.2%}",
                    "batch_share": f"{b.batch_share:.2%}",
                    "batch_count": b.batch_count,
                    "batch": share_bar(b.batch_share, width=30),
                }
            )
            for b in bins
        ],
        schema=dg.TableSchema(
            columns=[
                dg.TableColumn(name, "int" if name == "batch_count" else "string")
                for name in columns
            ]
        ),
    )


def _score_histogram_table(counts: dict[str, int]) -> dg.TableMetadataValue:
    """The batch's fraud probabilities as a table with a text bar per bin (readable in the UI)."""
    total = sum(counts.values())
    return dg.MetadataValue.table(
        records=[
            dg.TableRecord(
                {
                    "fraud_probability": label,
                    "transactions": count,
                    "share": f"{count / total:.1%}" if total else "",
                    "bar": share_bar(count / total if total else 0.0, width=30),
                }
            )
            for label, count in counts.items()
        ],
        schema=dg.TableSchema(
            columns=[
                dg.TableColumn("fraud_probability", "string"),
                dg.TableColumn("transactions", "int"),
                dg.TableColumn("share", "string"),
                dg.TableColumn("bar", "string"),
            ]
        ),
    )


class AlertRetryConfig(dg.Config):
    """Which outbox alerts a retry run takes: due ones, at most `max_alerts`."""

    # Checked when the run starts (Dagster's launchpad does not check pydantic's bounds).
    pending_grace_seconds: float = Field(default=120.0, ge=0)
    max_alerts: int = Field(default=500, ge=1)


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
    record_worker_start(context)  # its claims are its own while this worker lives
    engine = database.get_engine()
    report = deliver_alerts(
        engine,
        smtp.alert_delivery(),
        token=claim_token(context.run_id),
        limit=config.max_alerts,
        pending_grace=timedelta(seconds=config.pending_grace_seconds),
        abandoned=abandoned_claims(context.instance, engine),
    )
    status = outbox_status(engine)
    metadata = {
        "claimed": report.claimed,
        "alerted": report.sent,
        "pending_retry": report.failed + report.released,
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
        **{spec.get_python_identifier(): dg.GraphOut() for spec in BATCH_CHECKS},
    }
)
def transaction_batch(transactions_topic, fraud_model):
    """fetch -> wait_for_earlier_batches -> preprocess -> score -> persist -> alert (and
    check_batch), for one offset range of one partition."""
    raw, batch_range = fetch(transactions_topic)
    in_order = wait_for_earlier_batches(batch_range)
    scored = score(preprocess(raw, in_order), fraud_model)
    scored_out, suspicious_out, batch = persist(scored)
    checks = check_batch(scored, stored=batch)
    return {
        "scored_transactions": scored_out,
        "suspicious_transactions": suspicious_out,
        "fraud_alerts": alert(batch),
        **{
            spec.get_python_identifier(): getattr(checks, spec.get_python_identifier())
            for spec in BATCH_CHECKS
        },
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
    check_specs=BATCH_CHECKS,
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
