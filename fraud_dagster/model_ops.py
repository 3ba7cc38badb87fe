"""The model's life cycle in Dagster: the `fraud_model` asset (train and publish) and the
`reload_model` job (validate and promote). No postponed annotations here: Dagster reads the
config and resource types of op signatures at import time.

Both are thin: `training.py` trains and publishes, `model_registry.py` decides promotions.
"""

from pathlib import Path

import dagster as dg
from pydantic import Field

from fraud_dagster import model_registry
from fraud_dagster.assets import GROUP
from fraud_dagster.model import read_manifest
from fraud_dagster.resources import DatabaseResource, ModelResource
from fraud_dagster.training import (
    DEFAULT_MODEL_KIND,
    MODEL_KINDS,
    load_labelled_csv,
    publish_model,
    simulated_training_data,
    train_model,
)

RELOAD_MODEL_JOB = "reload_model"
TRAIN_MODEL_JOB = "train_model"
# Tags the reload op puts on its run, so the schedule can tell a question already answered.
TAG_CANDIDATE = "fraud_dagster/candidate_version"
TAG_FINGERPRINT = "fraud_dagster/candidate_fingerprint"
TAG_OUTCOME = "fraud_dagster/reload_outcome"
TAG_MODEL_RELOAD = "fraud_dagster/model_reload"


class TrainModelConfig(dg.Config):
    """What to train on and which estimator; the defaults train the shipped kind of model."""

    data_csv: str | None = Field(
        default=None,
        description="Labelled CSV (handbook columns, or the message fields plus is_fraud). "
        "Default: the project's own simulator.",
    )
    simulated_days: int = Field(default=90, description="Days to simulate when no CSV is given.")
    seed: int = Field(default=0, description="Simulator seed.")
    model_kind: str = Field(
        default=DEFAULT_MODEL_KIND, description=f"One of: {', '.join(MODEL_KINDS)}."
    )


@dg.asset(
    key="fraud_model",
    group_name=GROUP,
    kinds={"scikitlearn"},
    description=(
        "The published scikit-learn fraud model: a joblib file in models/ whose SHA-256, training "
        "data range, features, metrics and threshold are recorded in models/manifest.json. "
        "Materializing trains and publishes a new version; reload_model validates and promotes "
        "it, and scoring runs use the promoted version."
    ),
)
def fraud_model(
    context: dg.AssetExecutionContext, config: TrainModelConfig, model: ModelResource
) -> dg.MaterializeResult:
    if config.data_csv:
        transactions, source = load_labelled_csv(Path(config.data_csv)), config.data_csv
    else:
        transactions, source = simulated_training_data(config.simulated_days, config.seed)
    result = train_model(transactions, kind=config.model_kind, progress=context.log.info)
    entry = publish_model(Path(model.models_dir), result, source=source)
    context.log.info(f"published model {entry.version}; reload_model promotes it once validated")
    return dg.MaterializeResult(
        metadata={
            "version": entry.version,
            "file": entry.file,
            "sha256": entry.sha256,
            "kind": entry.kind,
            "threshold": entry.threshold,
            **{name: dg.MetadataValue.float(value) for name, value in result.metrics.items()},
            "training_data": dg.MetadataValue.json(entry.training_data or {}),
            "fit_seconds": round(result.fit_seconds, 1),
        }
    )


train_model_job = dg.define_asset_job(
    name=TRAIN_MODEL_JOB,
    selection=dg.AssetSelection.assets(fraud_model),
    executor_def=dg.in_process_executor,
    # A failed training needs a person (data, config); retrying would redo minutes of fitting.
    tags={"dagster/max_retries": "0"},
    description=(
        "Train a fraud model and publish it to models/ (materializes fraud_model; run config: "
        "data_csv, simulated_days, seed, model_kind). It does not serve until reload_model "
        "validates and promotes it."
    ),
)


class ReloadModelConfig(dg.Config):
    """How much worse than the active model a candidate's recorded metrics may be."""

    metric_tolerance: float = Field(
        default=model_registry.DEFAULT_METRIC_TOLERANCE,
        description="Allowed drop of AUC ROC, average precision and card precision@100.",
    )


@dg.op(out=dg.Out(dg.Nothing))
def validate_and_promote_model(
    context: dg.OpExecutionContext,
    config: ReloadModelConfig,
    model: ModelResource,
    database: DatabaseResource,
):
    """Validate the newest published model and promote it; a refusal fails the run with why."""
    models_dir = Path(model.models_dir)
    manifest = read_manifest(models_dir)
    engine = database.get_engine()
    active = model_registry.active_version(engine, manifest)
    candidate = manifest.newest()
    fingerprint = model_registry.candidate_fingerprint(
        models_dir, candidate, active, model.threshold
    )
    decision = model_registry.reload_model(
        models_dir,
        manifest,
        engine,
        config.metric_tolerance,
        run_id=context.run_id,
        serving_threshold=model.threshold,
    )
    context.instance.add_run_tags(
        context.run_id,
        {
            TAG_CANDIDATE: candidate.version,
            TAG_FINGERPRINT: fingerprint,
            TAG_OUTCOME: decision.outcome,
        },
    )
    metadata = {
        "outcome": decision.outcome,
        "reason": decision.reason,
        "candidate_version": candidate.version,
        "previous_version": decision.previous_version or "",
        "active_version": decision.active_version or "",
        "checks": dg.MetadataValue.md(_checks_table(decision)),
    }
    if model.version:
        metadata["pinned_version"] = model.version
        context.log.warning(
            f"FRAUD_MODEL_VERSION pins {model.version}: promotions do not change what scores"
        )
    if decision.outcome == model_registry.REFUSED:
        raise dg.Failure(description=decision.reason, metadata=metadata, allow_retries=False)
    if decision.outcome == model_registry.PROMOTED:
        context.log_event(
            dg.AssetObservation(
                asset_key="fraud_model",
                metadata={"active_version": candidate.version, "promoted_by": context.run_id},
            )
        )
    context.log.info(decision.reason)
    return dg.Output(None, metadata=metadata)


def _checks_table(decision: model_registry.ReloadDecision) -> str:
    if not decision.checks:
        return "no checks run"
    rows = [
        f"| {c.name} | {'pass' if c.passed else 'FAIL'} | {c.detail} |" for c in decision.checks
    ]
    return "\n".join(["| check | result | detail |", "|---|---|---|", *rows])


@dg.job(
    name=RELOAD_MODEL_JOB,
    executor_def=dg.in_process_executor,
    # A refusal is a decision, not an accident: retrying the run would refuse again. One reload
    # run at a time (dagster.yaml limits the tag to 1): each validates against what serves.
    tags={"dagster/max_retries": "0", TAG_MODEL_RELOAD: "reload"},
    description=(
        "Validate the newest model of the manifest (SHA-256, unpickling, a fixed sanity batch, "
        "recorded metrics vs the active model) and promote it. A refused model fails the run "
        "with the reason; the active model stays in service."
    ),
)
def reload_model_job():
    validate_and_promote_model()
