"""reload_model on a real Dagster instance and a real SQLite database, and what scoring uses after;
last, the schedule launching it from a real dagster-daemon.

Candidate models are published into a per-test copy of models/: copies of the shipped model's
bytes under new versions with chosen recorded metrics (the gate compares recorded metrics), a
file tampered after publishing, a file that is not a pickle, a missing file; and one model
trained by materializing the `fraud_model` asset.
"""

from __future__ import annotations

import re
import shutil
import time
from dataclasses import replace
from pathlib import Path

import dagster as dg
import joblib
import pytest

from fraud_dagster import model_registry
from fraud_dagster.definitions import build_definitions
from fraud_dagster.errors import ModelIntegrityError
from fraud_dagster.local_services.dagster_processes import running_daemon
from fraud_dagster.model import (
    LoadedModel,
    Manifest,
    ModelEntry,
    load_verified,
    read_manifest,
    sha256_of_file,
    write_manifest,
)
from fraud_dagster.model_ops import TAG_OUTCOME, fraud_model
from fraud_dagster.producer import synthetic_transactions
from fraud_dagster.resources import build_resources, resolved_resources
from fraud_dagster.settings import PROJECT_ROOT, Settings, load_settings
from fraud_dagster.simulator import to_messages
from fraud_dagster.storage import schema
from fraud_dagster_tests.helpers import evaluate_sensor, execute_requests, produce, table_rows


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    target = tmp_path / "models"
    shutil.copytree(PROJECT_ROOT / "models", target)
    return target


@pytest.fixture
def reload_settings(
    settings: Settings, models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    monkeypatch.setenv("FRAUD_MODELS_DIR", str(models_dir))
    return load_settings()


def publish_copy(
    models_dir: Path,
    version: str,
    order: int,
    metrics_delta: float = 0.0,
    content: bytes | None = None,
) -> ModelEntry:
    """Publish the shipped model's bytes (or `content`) as `version`, newer than all before."""
    manifest = read_manifest(models_dir)
    base = manifest.get(manifest.default_version)
    file = f"fraud-model-{version}.joblib"
    path = models_dir / file
    path.write_bytes(content if content is not None else (models_dir / base.file).read_bytes())
    entry = replace(
        base,
        version=version,
        file=file,
        sha256=sha256_of_file(path),
        created_at=f"2100-01-01T00:00:{order:02d}+00:00",
        metrics={name: value + metrics_delta for name, value in (base.metrics or {}).items()},
    )
    write_manifest(models_dir, Manifest((*manifest.entries, entry), manifest.default_version))
    return entry


def run_reload(
    defs: dg.Definitions, instance: dg.DagsterInstance, tolerance: float | None = None
) -> dg.ExecuteInProcessResult:
    config = (
        {"ops": {"validate_and_promote_model": {"config": {"metric_tolerance": tolerance}}}}
        if tolerance is not None
        else None
    )
    return defs.resolve_job_def("reload_model").execute_in_process(
        run_config=config, instance=instance, raise_on_error=False
    )


def refusal(result: dg.ExecuteInProcessResult) -> tuple[str, dict]:
    """The description and metadata the UI shows for a refused candidate."""
    assert not result.success
    (event,) = result.get_step_failure_events()
    failure = event.step_failure_data.user_failure_data
    assert failure is not None, event.step_failure_data.error
    return failure.description, {k: v.value for k, v in failure.metadata.items()}


def output_metadata(result: dg.ExecuteInProcessResult) -> dict:
    (event,) = [e for e in result.all_events if e.event_type_value == "STEP_OUTPUT"]
    return {k: v.value for k, v in event.event_specific_data.metadata.items()}


def promotions(database_url: str) -> list[str]:
    rows = table_rows(database_url, schema.model_promotions)
    return [row["model_version"] for row in sorted(rows, key=lambda r: r["id"])]


def score_new_messages(
    defs: dg.Definitions,
    settings: Settings,
    instance: dg.DagsterInstance,
    cursor: str | None,
    seed: int,
) -> tuple[str | None, set[str]]:
    """Stream a few transactions through sensor-requested runs; their ids and the new cursor."""
    messages = to_messages(synthetic_transactions(30, seed=seed))
    produce(settings, messages)
    tick = evaluate_sensor(defs, settings, instance, cursor)
    assert all(result.success for result in execute_requests(defs, instance, tick))
    return tick.cursor, {m["transaction_id"] for m in messages}


def versions_of(database_url: str, ids: set[str]) -> set[str]:
    rows = table_rows(database_url, schema.scored_transactions)
    return {row["model_version"] for row in rows if row["transaction_id"] in ids}


def evaluate_schedule(
    defs: dg.Definitions, settings: Settings, instance: dg.DagsterInstance
) -> dg.ScheduleExecutionData:
    schedule = defs.resolve_schedule_def("reload_model_schedule")
    # As a context manager: an open context leaves the instance it opened as Dagster's
    # current state storage, dead once collected, for whichever test resolves definitions next.
    with dg.build_schedule_context(
        instance=instance, resources=build_resources(settings)
    ) as context:
        return schedule.evaluate_tick(context)


@pytest.mark.services
def test_promoted_model_scores_and_refused_models_change_nothing(
    reload_settings: Settings, instance, database_url: str, models_dir: Path
) -> None:
    settings = reload_settings
    defs = build_definitions(settings)
    shipped = read_manifest(models_dir).default_version
    cursor, first_ids = score_new_messages(defs, settings, instance, None, seed=1)
    assert versions_of(database_url, first_ids) == {shipped}
    assert evaluate_schedule(defs, settings, instance).skip_message == (
        f"the newest model {shipped} is already active"
    )

    better = publish_copy(models_dir, "better", order=1, metrics_delta=0.01)
    tick = evaluate_schedule(defs, settings, instance)
    assert len(tick.run_requests) == 1
    result = run_reload(defs, instance)
    assert result.success
    metadata = output_metadata(result)
    assert metadata["outcome"] == "promoted"
    assert (metadata["previous_version"], metadata["active_version"]) == (shipped, "better")
    assert "| sanity_auc | pass |" in metadata["checks"]
    assert promotions(database_url) == ["better"]
    (observation,) = result.get_asset_observation_events()
    assert observation.asset_key == dg.AssetKey("fraud_model")

    cursor, second_ids = score_new_messages(defs, settings, instance, cursor, seed=2)
    assert versions_of(database_url, second_ids) == {better.version}
    assert versions_of(database_url, first_ids) == {shipped}  # stored scores keep their version

    tampered = publish_copy(models_dir, "tampered", order=2, metrics_delta=0.02)
    with (models_dir / tampered.file).open("ab") as handle:
        handle.write(b"\x00injected")
    result = run_reload(defs, instance)
    description, failure_metadata = refusal(result)
    assert "model tampered refused, better stays active" in description
    assert "SHA-256" in description
    assert failure_metadata["active_version"] == "better"
    assert "| integrity | FAIL |" in failure_metadata["checks"]
    run = instance.get_run_by_id(result.run_id)
    assert run.tags[TAG_OUTCOME] == "refused"
    assert promotions(database_url) == ["better"]

    skipped = evaluate_schedule(defs, settings, instance)
    assert skipped.run_requests == []
    assert f"refused by run {result.run_id}" in skipped.skip_message

    cursor, third_ids = score_new_messages(defs, settings, instance, cursor, seed=3)
    assert versions_of(database_url, third_ids) == {"better"}


def test_unreadable_missing_and_worse_models_are_refused(
    reload_settings: Settings, instance, database_url: str, models_dir: Path
) -> None:
    defs = build_definitions(reload_settings)
    shipped = read_manifest(models_dir).default_version

    publish_copy(models_dir, "garbage", order=1, metrics_delta=0.05, content=b"not a pickle")
    description, _ = refusal(run_reload(defs, instance))
    assert "could not be unpickled" in description

    missing = publish_copy(models_dir, "missing", order=2, metrics_delta=0.05)
    (models_dir / missing.file).unlink()
    description, _ = refusal(run_reload(defs, instance))
    assert "cannot be read" in description

    publish_copy(models_dir, "worse", order=3, metrics_delta=-0.05)
    description, metadata = refusal(run_reload(defs, instance))
    assert "metric_auc_roc" in description
    assert "| metric_average_precision | FAIL |" in metadata["checks"]
    assert promotions(database_url) == []
    assert metadata["active_version"] == shipped

    # Within the tolerance, the same kind of drop is accepted.
    publish_copy(models_dir, "slightly-worse", order=4, metrics_delta=-0.01)
    assert output_metadata(run_reload(defs, instance))["outcome"] == "promoted"
    assert promotions(database_url) == ["slightly-worse"]
    result = run_reload(defs, instance)
    assert output_metadata(result)["outcome"] == model_registry.UNCHANGED


def test_promoted_version_must_keep_the_hash_recorded_at_promotion(
    reload_settings: Settings, instance, database_url: str, models_dir: Path
) -> None:
    """Replacing a promoted file *and* its manifest hash passes the manifest check, not the
    SHA-256 that reload_model recorded in the database when it promoted the version."""
    defs = build_definitions(reload_settings)
    better = publish_copy(models_dir, "better", order=1, metrics_delta=0.01)
    assert output_metadata(run_reload(defs, instance))["outcome"] == "promoted"

    def load_for_a_batch_run() -> LoadedModel:
        resources = resolved_resources(reload_settings)  # a fresh run: nothing loaded yet
        return resources["model"].load(resources["database"].get_engine())

    assert load_for_a_batch_run().version == "better"

    # Another valid model under the promoted version, its hash written into the manifest.
    path = models_dir / better.file
    promoted_bytes = path.read_bytes()
    joblib.dump(load_verified(models_dir, better).estimator, path, compress=1)
    replaced = replace(better, sha256=sha256_of_file(path))
    assert replaced.sha256 != better.sha256
    manifest = read_manifest(models_dir)
    entries = tuple(replaced if e.version == better.version else e for e in manifest.entries)
    write_manifest(models_dir, Manifest(entries, manifest.default_version))
    assert load_verified(models_dir, replaced).version == "better"  # file and manifest agree

    expected = (
        f"model version better was promoted with SHA-256 {better.sha256}, "
        f"but the manifest now records {replaced.sha256}: refusing to load it"
    )
    with pytest.raises(ModelIntegrityError, match=re.escape(expected)):
        load_for_a_batch_run()

    # Restoring the promoted bytes and hash serves the promoted version again.
    path.write_bytes(promoted_bytes)
    write_manifest(models_dir, manifest)
    assert load_for_a_batch_run().version == "better"


def test_schedule_cron_comes_from_settings(
    reload_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    schedule = build_definitions(reload_settings).resolve_schedule_def("reload_model_schedule")
    assert schedule.cron_schedule == "*/15 * * * *"
    assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING
    assert schedule.job_name == "reload_model"
    monkeypatch.setenv("FRAUD_RELOAD_MODEL_CRON", "0 * * * *")
    hourly = build_definitions(load_settings()).resolve_schedule_def("reload_model_schedule")
    assert hourly.cron_schedule == "0 * * * *"


def test_fraud_model_asset_trains_publishes_and_can_be_promoted(
    reload_settings: Settings, instance, database_url: str, models_dir: Path
) -> None:
    defs = build_definitions(reload_settings)
    config = {"simulated_days": 50, "seed": 3, "model_kind": "logistic"}
    result = dg.materialize(
        [fraud_model],
        run_config={"ops": {"fraud_model": {"config": config}}},
        resources={"model": build_resources(reload_settings)["model"]},
        instance=instance,
    )
    assert result.success
    (materialization,) = result.asset_materializations_for_node("fraud_model")
    metadata = {k: v.value for k, v in materialization.metadata.items()}
    manifest = read_manifest(models_dir)
    newest = manifest.newest()
    assert metadata["version"] == newest.version
    assert metadata["sha256"] == newest.sha256 == sha256_of_file(models_dir / newest.file)
    assert metadata["kind"] == "logistic"
    assert metadata["threshold"] == newest.threshold
    assert metadata["auc_roc"] == pytest.approx(newest.metrics["auc_roc"], abs=1e-6)
    assert newest.training_data["source"] == "simulator(days=50, seed=3)"
    assert manifest.default_version != newest.version  # published, not yet in service

    promoted = run_reload(defs, instance, tolerance=1.0)
    assert output_metadata(promoted)["outcome"] == "promoted"
    assert promotions(database_url) == [newest.version]


@pytest.mark.services
@pytest.mark.slow
# SQLite only: the promotion itself runs on both backends in the tests above; this one is
# about the daemon firing the schedule.
@pytest.mark.backends("sqlite")
def test_real_daemon_schedule_promotes_a_published_model(
    env: dict[str, str],
    dagster_home: Path,
    instance: dg.DagsterInstance,
    database_url: str,
    models_dir: Path,
    tmp_path: Path,
) -> None:
    publish_copy(models_dir, "better", order=1, metrics_delta=0.01)
    daemon_env = {
        **env,
        "FRAUD_MODELS_DIR": str(models_dir),
        "FRAUD_RELOAD_MODEL_CRON": "* * * * *",  # the next minute, not the next quarter hour
    }
    log = tmp_path / "daemon.log"
    runs: list[dg.DagsterRun] = []
    with running_daemon(dagster_home, daemon_env, log):
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            runs = list(instance.get_runs(filters=dg.RunsFilter(job_name="reload_model")))
            if runs and runs[0].is_finished:
                break
            time.sleep(1)
    output = log.read_text(errors="replace")[-3000:]
    assert runs, f"no reload_model run within 150 s; daemon log:\n{output}"
    run = runs[-1]  # the first one the schedule launched
    assert run.status == dg.DagsterRunStatus.SUCCESS, output
    assert run.tags["dagster/schedule_name"] == "reload_model_schedule"
    assert run.tags[TAG_OUTCOME] == "promoted"
    assert promotions(database_url)[0] == "better"
