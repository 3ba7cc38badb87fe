"""Schedules: the periodic model reload."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from fraud_dagster import model_registry
from fraud_dagster.errors import ConfigurationError
from fraud_dagster.model import read_manifest
from fraud_dagster.model_ops import (
    RELOAD_MODEL_JOB,
    TAG_FINGERPRINT,
    TAG_OUTCOME,
    reload_model_job,
)
from fraud_dagster.resources import DatabaseResource, ModelResource
from fraud_dagster.settings import Settings


def build_reload_model_schedule(settings: Settings) -> dg.ScheduleDefinition:
    """Run `reload_model` on `settings.reload_model_cron` when there is something to decide.

    A tick is skipped, with the reason shown in the UI, when the newest model is already active
    or when the same candidate (same entry, same file bytes, same active model) was refused
    before: the refusal stays visible in that run, and nobody is paged every 15 minutes for it.
    Launching the job by hand always validates again.
    """

    def reload_model_schedule(
        context: dg.ScheduleEvaluationContext, model: ModelResource, database: DatabaseResource
    ) -> dg.RunRequest | dg.SkipReason:
        models_dir = Path(model.models_dir)
        manifest = read_manifest(models_dir)
        active = model_registry.active_version(database.get_engine(), manifest)
        candidate = manifest.newest()
        if candidate.version == active:
            return dg.SkipReason(f"the newest model {active} is already active")
        fingerprint = model_registry.candidate_fingerprint(
            models_dir, candidate, active, model.threshold
        )
        refused = context.instance.get_runs(
            filters=dg.RunsFilter(
                job_name=RELOAD_MODEL_JOB,
                tags={TAG_FINGERPRINT: fingerprint, TAG_OUTCOME: model_registry.REFUSED},
            ),
            limit=1,
        )
        if refused:
            return dg.SkipReason(
                f"model {candidate.version} was refused by run {refused[0].run_id} and nothing "
                f"changed since ({active} stays active); publish a new model or fix the file"
            )
        return dg.RunRequest()

    try:
        return dg.schedule(
            name="reload_model_schedule",
            cron_schedule=settings.reload_model_cron,
            job=reload_model_job,
            default_status=dg.DefaultScheduleStatus.RUNNING,
            description=(
                "Validates and promotes the newest published model "
                f"({settings.reload_model_cron}, FRAUD_RELOAD_MODEL_CRON)."
            ),
        )(reload_model_schedule)
    except dg.DagsterInvalidDefinitionError as exc:  # Dagster's words name neither variable
        raise ConfigurationError(
            f"FRAUD_RELOAD_MODEL_CRON={settings.reload_model_cron[:60]!r} is not a cron "
            "expression of 5 fields, e.g. '*/15 * * * *'"
        ) from exc
