"""Model files are unpickled only when their SHA-256 matches the manifest."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from fraud_dagster.errors import ModelIntegrityError
from fraud_dagster.model import Manifest, load_verified, read_manifest
from fraud_dagster.settings import PROJECT_ROOT


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    target = tmp_path / "models"
    shutil.copytree(PROJECT_ROOT / "models", target)
    return target


def test_shipped_model_loads_and_scores(models_dir: Path) -> None:
    manifest = read_manifest(models_dir)
    entry = manifest.get(manifest.default_version)
    model = load_verified(models_dir, entry)
    import pandas as pd

    features = pd.DataFrame([[0.0] * len(entry.features)], columns=list(entry.features))
    assert 0.0 <= model.predict_proba(features)[0] <= 1.0


def test_tampered_file_is_refused_before_unpickling(models_dir: Path) -> None:
    manifest = read_manifest(models_dir)
    entry = manifest.get(manifest.default_version)
    path = models_dir / entry.file
    path.write_bytes(path.read_bytes() + b"tampered")
    with pytest.raises(ModelIntegrityError, match="SHA-256"):
        load_verified(models_dir, entry)


def test_missing_file_and_unknown_version(models_dir: Path) -> None:
    manifest = read_manifest(models_dir)
    entry = manifest.get(manifest.default_version)
    (models_dir / entry.file).unlink()
    with pytest.raises(ModelIntegrityError, match="cannot be read"):
        load_verified(models_dir, entry)
    with pytest.raises(ModelIntegrityError, match="not in the manifest"):
        manifest.get("no-such-version")


def test_manifest_missing(tmp_path: Path) -> None:
    with pytest.raises(ModelIntegrityError, match="fraud-dagster train"):
        read_manifest(tmp_path)


def test_serving_version_prefers_promotion_then_default_then_newest(models_dir: Path) -> None:
    manifest = read_manifest(models_dir)
    shipped = manifest.default_version
    assert manifest.serving_version("promoted-v") == "promoted-v"
    assert manifest.serving_version(None) == shipped
    newer = replace(manifest.get(shipped), version="newer", created_at="2100-01-01T00:00:00+00:00")
    unvalidated = Manifest(entries=(*manifest.entries, newer), default_version=shipped)
    assert unvalidated.serving_version(None) == shipped  # published is not promoted
    assert Manifest(entries=unvalidated.entries, default_version=None).serving_version(None) == (
        "newer"
    )
