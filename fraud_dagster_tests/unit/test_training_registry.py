"""The promotion checks as plain functions: sanity batch, metric comparison, fingerprints."""

from __future__ import annotations

import os
import shutil
import threading
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from sklearn.dummy import DummyClassifier

from fraud_dagster import model_registry
from fraud_dagster.errors import ConfigurationError, ModelIntegrityError
from fraud_dagster.model import LoadedModel, Manifest, load_verified, read_manifest
from fraud_dagster.resources import resolved_resources
from fraud_dagster.settings import PROJECT_ROOT, load_settings
from fraud_dagster.storage import promotions
from fraud_dagster.storage.database import create_engine, ensure_schema
from fraud_dagster.storage.promotions import active_model_version, record_promotion


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    target = tmp_path / "models"
    shutil.copytree(PROJECT_ROOT / "models", target)
    return target


@pytest.fixture
def shipped(models_dir: Path) -> LoadedModel:
    manifest = read_manifest(models_dir)
    return load_verified(models_dir, manifest.get(manifest.default_version))


def test_shipped_model_passes_the_sanity_batch(shipped: LoadedModel) -> None:
    checks = model_registry.check_sanity(shipped)
    assert [c.name for c in checks] == [
        "sanity_scores",
        "sanity_auc",
        "sanity_alert_rate",
        "sanity_frauds_flagged",
    ]
    assert all(c.passed for c in checks), checks


def test_sanity_batch_refuses_a_model_that_cannot_rank_frauds(shipped: LoadedModel) -> None:
    features, labels = model_registry.sanity_batch()
    constant = DummyClassifier(strategy="prior").fit(features, labels)
    checks = {c.name: c for c in model_registry.check_sanity(replace(shipped, estimator=constant))}
    assert checks["sanity_scores"].passed
    assert not checks["sanity_auc"].passed
    assert "AUC 0.500" in checks["sanity_auc"].detail


def test_sanity_batch_refuses_a_threshold_that_alerts_on_everything(
    shipped: LoadedModel,
) -> None:
    checks = {c.name: c for c in model_registry.check_sanity(replace(shipped, threshold=1e-9))}
    assert checks["sanity_auc"].passed
    assert not checks["sanity_alert_rate"].passed
    assert "100.00%" in checks["sanity_alert_rate"].detail


def test_a_candidate_is_judged_at_the_threshold_batch_runs_will_use(
    models_dir: Path, shipped: LoadedModel
) -> None:
    """With FRAUD_MODEL_THRESHOLD set, batch runs alert at it, not at the manifest's: the
    sanity batch must be judged there too (and a changed override asks the question again)."""
    checks = model_registry.validate_candidate(models_dir, shipped.entry, None, 0.02)
    assert all(c.passed for c in checks)
    at_override = {
        c.name: c
        for c in model_registry.validate_candidate(
            models_dir, shipped.entry, None, 0.02, serving_threshold=1e-6
        )
    }
    assert not at_override["sanity_alert_rate"].passed
    assert "threshold 0.000" in at_override["sanity_alert_rate"].detail
    plain = model_registry.candidate_fingerprint(models_dir, shipped.entry, "v1")
    assert model_registry.candidate_fingerprint(models_dir, shipped.entry, "v1", 0.5) != plain


def test_sanity_batch_refuses_a_threshold_above_every_frauds_score(shipped: LoadedModel) -> None:
    features, labels = model_registry.sanity_batch()
    highest = float(shipped.predict_proba(features)[labels == 1].max())
    assert highest < 0.999  # else this model cannot show the check
    checks = {c.name: c for c in model_registry.check_sanity(replace(shipped, threshold=0.999))}
    assert checks["sanity_auc"].passed and checks["sanity_alert_rate"].passed
    assert not checks["sanity_frauds_flagged"].passed
    assert checks["sanity_frauds_flagged"].detail.startswith("0 of the sanity batch's")


@pytest.mark.parametrize("threshold", [float("nan"), 0.0, -0.5, 1.0, 34.4086])
def test_a_threshold_that_cannot_decide_alerts_is_refused_for_promotion_and_serving(
    models_dir: Path, shipped: LoadedModel, threshold: float
) -> None:
    candidate = replace(shipped.entry, threshold=threshold)
    (check,) = model_registry.validate_candidate(models_dir, candidate, shipped.entry, 0.02)
    assert (check.name, check.passed) == ("threshold", False)
    assert "is not between 0 and 1" in check.detail
    with pytest.raises(ModelIntegrityError, match=r"the manifest's threshold .* not between"):
        load_verified(models_dir, candidate)
    with pytest.raises(ModelIntegrityError, match=r"the configured threshold .* not between"):
        load_verified(models_dir, shipped.entry, threshold)


def test_metrics_may_drop_only_within_the_tolerance(shipped: LoadedModel) -> None:
    active = shipped.entry
    metrics = dict(active.metrics or {})
    slightly_worse = replace(active, metrics={k: v - 0.015 for k, v in metrics.items()})
    assert all(c.passed for c in model_registry.compare_metrics(slightly_worse, active, 0.02))
    worse_ap = replace(
        active, metrics={**metrics, "average_precision": metrics["average_precision"] - 0.05}
    )
    checks = {c.name: c for c in model_registry.compare_metrics(worse_ap, active, 0.02)}
    assert not checks["metric_average_precision"].passed
    assert checks["metric_auc_roc"].passed
    no_metrics = replace(active, metrics=None)
    assert not any(c.passed for c in model_registry.compare_metrics(no_metrics, active, 0.02))
    assert all(c.passed for c in model_registry.compare_metrics(active, no_metrics, 0.02))
    assert model_registry.compare_metrics(active, None, 0.02)[0].passed


def test_fingerprint_changes_with_the_file_bytes_and_the_active_version(models_dir: Path) -> None:
    entry = read_manifest(models_dir).newest()
    first = model_registry.candidate_fingerprint(models_dir, entry, "v1")
    assert model_registry.candidate_fingerprint(models_dir, entry, "v1") == first
    assert model_registry.candidate_fingerprint(models_dir, entry, "v2") != first
    path = models_dir / entry.file
    path.write_bytes(path.read_bytes() + b"x")
    assert model_registry.candidate_fingerprint(models_dir, entry, "v1") != first
    path.unlink()
    assert model_registry.candidate_fingerprint(models_dir, entry, "v1") != first


def test_fingerprint_does_not_read_a_file_outside_the_models_directory(
    models_dir: Path, tmp_path: Path
) -> None:
    """The schedule fingerprints the newest entry every tick, before validating it: an entry
    naming a path elsewhere was read there (`/dev/zero` never ends, so every tick hung)."""
    outside = tmp_path / "elsewhere.joblib"
    outside.write_bytes(b"first")
    entry = replace(read_manifest(models_dir).newest(), file=str(outside))

    first = model_registry.candidate_fingerprint(models_dir, entry, "v1")
    outside.write_bytes(b"second")

    assert model_registry.candidate_fingerprint(models_dir, entry, "v1") == first
    with pytest.raises(ModelIntegrityError, match="points outside"):
        load_verified(models_dir, entry)


def test_a_model_file_that_is_not_a_regular_file_is_refused_unread(models_dir: Path) -> None:
    """A FIFO (or device) in place of the file would block the reader forever."""
    entry = read_manifest(models_dir).newest()
    path = models_dir / entry.file
    path.unlink()
    os.mkfifo(path)
    outcome: list[object] = []

    def load() -> None:
        try:
            load_verified(models_dir, entry)
        except ModelIntegrityError as exc:
            outcome.append(exc)

    reader = threading.Thread(target=load, daemon=True)
    reader.start()
    reader.join(timeout=10)
    if reader.is_alive():  # unblock the reader: open the FIFO's other end
        with path.open("wb"):
            pass
        reader.join(timeout=10)
        pytest.fail("load_verified opened the FIFO and waited for a writer")
    assert "not a regular file" in str(outcome[0])
    assert model_registry.candidate_fingerprint(models_dir, entry, "v1")


def test_fingerprint_changes_with_any_field_of_the_entry(models_dir: Path) -> None:
    """A refused entry whose threshold an engineer fixed in the manifest asks the question
    again: the schedule must not skip it as "nothing changed since"."""
    entry = read_manifest(models_dir).newest()
    first = model_registry.candidate_fingerprint(models_dir, entry, "v1")
    fixed = replace(entry, threshold=entry.threshold / 2)
    assert model_registry.candidate_fingerprint(models_dir, fixed, "v1") != first


def test_the_newest_promotion_serves_whatever_the_clocks_said(tmp_path: Path) -> None:
    """A promotion recorded while a host's clock ran ahead must not outrank later ones."""
    engine = create_engine(f"sqlite:///{tmp_path / 'promotions.db'}")
    try:
        ensure_schema(engine)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(promotions, "utcnow", lambda: datetime(2100, 1, 1))
            assert record_promotion(engine, "A", "a" * 64, "clock ahead", replacing=None)
        assert record_promotion(engine, "B", "b" * 64, "clock right", replacing="A")
        assert active_model_version(engine) == "B"
        assert model_registry.promoted_sha256(engine, "B") == "b" * 64
    finally:
        engine.dispose()


def test_a_reload_does_not_promote_over_a_promotion_made_while_it_validated(
    models_dir: Path, tmp_path: Path
) -> None:
    """Two reload runs overlap: a later-published model is promoted by the second while the
    first validates an older one. The first must not put its older model back in service."""
    manifest = read_manifest(models_dir)
    shipped = manifest.get(manifest.default_version)
    older = replace(shipped, version="N1", created_at="2100-01-01T00:00:00+00:00")
    manifest = Manifest((*manifest.entries, older), manifest.default_version)
    engine = create_engine(f"sqlite:///{tmp_path / 'promotions.db'}")
    validate = model_registry.validate_candidate

    def promoted_meanwhile(*args: Any, **kwargs: Any) -> list[model_registry.Check]:
        checks = validate(*args, **kwargs)
        assert record_promotion(engine, "N2", "2" * 64, "the other run", replacing=None)
        return checks

    try:
        ensure_schema(engine)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(model_registry, "validate_candidate", promoted_meanwhile)
            decision = model_registry.reload_model(models_dir, manifest, engine)
        assert decision.outcome == model_registry.UNCHANGED, decision.reason
        assert all(check.passed for check in decision.checks)  # refused for the race alone
        assert "another run promoted N2 meanwhile" in decision.reason
        assert (decision.active_version, active_model_version(engine)) == ("N2", "N2")
    finally:
        engine.dispose()


def test_promoted_version_must_keep_its_promoted_hash(shipped: LoadedModel, tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'promotions.db'}")
    try:
        ensure_schema(engine)
        entry = shipped.entry
        model_registry.require_promoted_hash(engine, entry)  # never promoted: nothing to compare
        assert record_promotion(engine, entry.version, "0" * 64, "first", replacing=None)
        assert record_promotion(
            engine, entry.version, entry.sha256.upper(), "promoted again", replacing=entry.version
        )
        assert model_registry.promoted_sha256(engine, entry.version) == entry.sha256.upper()
        model_registry.require_promoted_hash(engine, entry)  # the latest promotion counts
        replaced = replace(entry, sha256="f" * 64)
        with pytest.raises(ModelIntegrityError, match="was promoted with SHA-256"):
            model_registry.require_promoted_hash(engine, replaced)
        assert model_registry.promoted_sha256(engine, "never-promoted") is None
    finally:
        engine.dispose()


@pytest.mark.parametrize("configured", ["nan", "34.4086", "0"])
def test_a_configured_threshold_that_cannot_decide_alerts_stops_the_code_location_loading(
    configured: str,
) -> None:
    with pytest.raises(ConfigurationError, match=r"FRAUD_MODEL_THRESHOLD.*not between 0 and 1"):
        resolved_resources(load_settings({"FRAUD_MODEL_THRESHOLD": configured}))
