"""Model files are unpickled only when their SHA-256 matches the manifest."""

from __future__ import annotations

import builtins
import io
import os
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import joblib
import pytest

from fraud_dagster.errors import ModelIntegrityError
from fraud_dagster.model import Manifest, load_verified, read_manifest
from fraud_dagster.settings import PROJECT_ROOT
from fraud_dagster_tests.helpers import ordinary_and_large_amount


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    target = tmp_path / "models"
    shutil.copytree(PROJECT_ROOT / "models", target)
    return target


def test_shipped_model_loads_and_scores(models_dir: Path) -> None:
    manifest = read_manifest(models_dir)
    entry = manifest.get(manifest.default_version)
    model = load_verified(models_dir, entry)
    ordinary, large = model.predict_proba(ordinary_and_large_amount(entry.features))
    assert ordinary < entry.threshold < large


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


SWAPPED_IN_CODE_RAN: list[str] = []


class _Impostor:
    """What the swapped-in file turns into: it looks like a classifier."""

    def predict_proba(self, features: Any) -> Any:
        raise AssertionError("the swapped-in model scored")


def _swapped_in_payload() -> _Impostor:
    """What unpickling the swapped-in file runs: proof that unverified bytes were unpickled."""
    SWAPPED_IN_CODE_RAN.append("ran")
    return _Impostor()


class _Payload:
    def __reduce__(self) -> tuple:
        return (_swapped_in_payload, ())


class _SwapOnClose:
    """A file handle that replaces the file on disk the moment its reader closes it."""

    def __init__(self, handle: Any, swap: Callable[[], None]) -> None:
        self._handle, self._swap = handle, swap

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)

    def __enter__(self) -> _SwapOnClose:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._handle.close()
        self._swap()


def test_file_swapped_right_after_hashing_is_never_unpickled(
    models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An attacker replaces the file as soon as the verifier has read it (TOCTOU): what is
    unpickled must be the bytes that were hashed, never the file opened again."""
    manifest = read_manifest(models_dir)
    entry = manifest.get(manifest.default_version)
    path = (models_dir / entry.file).resolve()
    evil = io.BytesIO()
    joblib.dump(_Payload(), evil)
    real_open = builtins.open
    opened: list[str] = []

    def swap() -> None:
        with real_open(path, "wb") as handle:
            handle.write(evil.getvalue())

    def swapping_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        handle = real_open(file, *args, **kwargs)
        is_model = isinstance(file, str | os.PathLike) and Path(file).resolve() == path
        if is_model:
            opened.append(str(file))
            if len(opened) == 1:
                return _SwapOnClose(handle, swap)
        return handle

    SWAPPED_IN_CODE_RAN.clear()
    monkeypatch.setattr(builtins, "open", swapping_open)  # joblib opens paths with open()
    monkeypatch.setattr(io, "open", swapping_open)  # pathlib.Path.open goes through io.open
    try:
        model = load_verified(models_dir, entry)
    finally:
        monkeypatch.undo()
    assert path.read_bytes() == evil.getvalue()  # the swap did happen, after the first read
    assert SWAPPED_IN_CODE_RAN == []
    assert model.version == entry.version
    ordinary, large = model.predict_proba(ordinary_and_large_amount(entry.features))
    assert ordinary < entry.threshold < large
    # The next load reads the swapped file, hashes it and refuses it before unpickling.
    with pytest.raises(ModelIntegrityError, match="SHA-256"):
        load_verified(models_dir, entry)
    assert SWAPPED_IN_CODE_RAN == []
