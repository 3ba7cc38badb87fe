"""Published models: the manifest, SHA-256 verification before unpickling, and scoring.

`models/manifest.json` lists every published model file with its SHA-256, training data range,
feature list, metrics and threshold. A file is unpickled only after its bytes hash to the
recorded value: joblib files are pickles, and unpickling runs code. A file pickled by another
scikit-learn version than the one installed is refused too: scikit-learn reads its pickles
reliably only in the version that wrote them (constraints.txt pins the tested versions).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd
import sklearn
from sklearn.exceptions import InconsistentVersionWarning

from fraud_dagster.errors import ModelIntegrityError

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class ModelEntry:
    """One published model, as recorded in the manifest."""

    version: str
    file: str
    sha256: str
    threshold: float
    features: tuple[str, ...]
    created_at: str = ""
    metrics: dict[str, float] | None = None
    training_data: dict[str, Any] | None = None
    score_histogram: dict[str, Any] | None = None
    kind: str = ""
    trained_with: dict[str, str] | None = None  # library versions that pickled the file

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelEntry:
        try:
            return cls(
                version=str(data["version"]),
                file=str(data["file"]),
                sha256=str(data["sha256"]).lower(),
                threshold=float(data["threshold"]),
                features=tuple(data["features"]),
                created_at=str(data.get("created_at", "")),
                metrics=data.get("metrics"),
                training_data=data.get("training_data"),
                score_histogram=data.get("score_histogram"),
                kind=str(data.get("kind", "")),
                trained_with=data.get("trained_with"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelIntegrityError(
                f"manifest entry is incomplete or malformed: {exc!r}"
            ) from exc

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "file": self.file,
            "sha256": self.sha256,
            "threshold": self.threshold,
            "features": list(self.features),
            "created_at": self.created_at,
            "metrics": self.metrics,
            "training_data": self.training_data,
            "score_histogram": self.score_histogram,
            "kind": self.kind,
            "trained_with": self.trained_with,
        }


@dataclass(frozen=True)
class Manifest:
    """The list of published models and the version to serve when none was promoted yet."""

    entries: tuple[ModelEntry, ...]
    default_version: str | None

    def get(self, version: str) -> ModelEntry:
        for entry in self.entries:
            if entry.version == version:
                return entry
        known = ", ".join(e.version for e in self.entries) or "none"
        raise ModelIntegrityError(
            f"model version {version!r} is not in the manifest (known: {known})"
        )

    def serving_version(self, promoted: str | None) -> str:
        """The version batch runs load: the last promoted one, else the default, else the newest.

        A published model serves only once `reload_model` promoted it; before any promotion the
        manifest's `default_version` (the shipped model) serves.
        """
        return promoted or self.default_version or self.newest().version

    def newest(self) -> ModelEntry:
        if not self.entries:
            raise ModelIntegrityError(
                "the model manifest lists no models; run `fraud-dagster train`"
            )
        return max(self.entries, key=lambda e: (e.created_at, e.version))


def read_manifest(models_dir: Path) -> Manifest:
    path = models_dir / MANIFEST_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelIntegrityError(
            f"no model manifest at {path}; run `fraud-dagster train` or set FRAUD_MODELS_DIR"
        ) from exc
    except json.JSONDecodeError as exc:
        raise ModelIntegrityError(f"model manifest {path} is not valid JSON: {exc}") from exc
    entries = tuple(ModelEntry.from_json(item) for item in data.get("models", []))
    return Manifest(entries=entries, default_version=data.get("default_version"))


def write_manifest(models_dir: Path, manifest: Manifest) -> None:
    path = models_dir / MANIFEST_NAME
    payload = {
        "default_version": manifest.default_version,
        "models": [entry.to_json() for entry in manifest.entries],
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.unlink(missing_ok=True)  # one a crash left behind, or a link planted there
    write_new_file(tmp, (json.dumps(payload, indent=2, sort_keys=False) + "\n").encode("utf-8"))
    tmp.replace(path)


def write_new_file(path: Path, data: bytes) -> None:
    """Write `data` to `path`, which must not exist yet, not even as a link: a link placed in
    `models/` would otherwise have a model written wherever it points. Synced, so a manifest
    never names a file that a crash left short."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def library_versions() -> dict[str, str]:
    """The versions of the libraries a pickled model depends on, to record with it."""
    return {
        "scikit-learn": sklearn.__version__,
        "numpy": np.__version__,
        "joblib": joblib.__version__,
    }


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class LoadedModel:
    """A verified model ready to score feature matrices."""

    entry: ModelEntry
    estimator: Any
    threshold: float

    @property
    def version(self) -> str:
        return self.entry.version

    def predict_proba(self, features: pd.DataFrame) -> np.ndarray:
        """Fraud probability of every row, in one call for the whole batch."""
        if features.empty:
            return np.zeros(0, dtype=np.float64)
        missing = [name for name in self.entry.features if name not in features.columns]
        if missing:
            raise ModelIntegrityError(
                f"model {self.version} needs features the pipeline did not compute: {missing}"
            )
        matrix = features[list(self.entry.features)]
        return np.asarray(self.estimator.predict_proba(matrix)[:, 1], dtype=np.float64)


def model_file_path(models_dir: Path, entry: ModelEntry) -> Path:
    """Where `entry`'s file is, links resolved, if that is a regular file inside `models_dir`.

    Whatever reads a manifest entry's file goes through here: an entry naming a path elsewhere
    (`/etc/...`, `../...`, a link out) or a device (`/dev/zero` never ends) is refused before a
    byte is read."""
    path = (models_dir / entry.file).resolve()
    if models_dir.resolve() not in path.parents:
        raise ModelIntegrityError(f"model file {entry.file!r} points outside {models_dir}")
    if path.exists() and not path.is_file():
        raise ModelIntegrityError(f"model file {entry.file!r} is not a regular file")
    return path


def read_verified_bytes(models_dir: Path, entry: ModelEntry) -> tuple[Path, bytes]:
    """The path of `entry`'s file and its bytes, read once, if they hash to the recorded SHA-256.

    The bytes returned are exactly the bytes hashed: whoever unpickles them unpickles what was
    verified, even if the file on disk is replaced right after. Raises `ModelIntegrityError`
    saying what is wrong otherwise; never unpickles anything.
    """
    path = model_file_path(models_dir, entry)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelIntegrityError(f"model file {path} cannot be read: {exc}") from exc
    actual = hashlib.sha256(data).hexdigest()
    if actual != entry.sha256:
        raise ModelIntegrityError(
            f"model file {path} has SHA-256 {actual}, but the manifest records {entry.sha256} "
            f"for version {entry.version}: refusing to load it. Restore the file or publish it "
            "again with `fraud-dagster train`."
        )
    return path, data


def verify_model_file(models_dir: Path, entry: ModelEntry) -> Path:
    """The path of `entry`'s file, if it lies in `models_dir` and hashes to the recorded SHA-256.

    Raises `ModelIntegrityError` saying what is wrong otherwise; never unpickles anything. Only
    a check: to load the model, use `load_verified`, which unpickles the bytes it hashed.
    """
    path, _ = read_verified_bytes(models_dir, entry)
    return path


def threshold_problem(threshold: float) -> str | None:
    """Why `threshold` cannot decide alerts, or None. Probabilities lie in [0, 1]: a threshold
    of 0 or less alerts on every transaction, one above 1 (a percentage, say) or NaN on none,
    and either silently."""
    if not 0.0 < threshold < 1.0:  # NaN fails this too
        return f"threshold {threshold} is not between 0 and 1"
    return None


def load_verified(
    models_dir: Path, entry: ModelEntry, threshold: float | None = None
) -> LoadedModel:
    """Unpickle `entry`'s file only if its SHA-256 matches the manifest, and only with a
    threshold that can decide alerts (`threshold` overrides the entry's).

    The file is read once; the bytes that were hashed are the bytes unpickled (never the path,
    which could be swapped between the check and the load).
    """
    source = "the manifest's" if threshold is None else "the configured"
    threshold = entry.threshold if threshold is None else threshold
    problem = threshold_problem(threshold)
    if problem is not None:
        raise ModelIntegrityError(
            f"model {entry.version}: {source} {problem}; it would alert on every transaction "
            "or on none"
        )
    path, data = read_verified_bytes(models_dir, entry)
    try:
        with warnings.catch_warnings():
            # scikit-learn only warns; a model it may misread must not score transactions.
            warnings.simplefilter("error", InconsistentVersionWarning)
            estimator = joblib.load(io.BytesIO(data))
    except InconsistentVersionWarning as exc:
        raise ModelIntegrityError(
            f"model file {path} (version {entry.version}) was pickled by scikit-learn "
            f"{exc.original_sklearn_version}, but scikit-learn {exc.current_sklearn_version} is "
            "installed, which does not promise to read it correctly: refusing to load it. "
            f"Install scikit-learn=={exc.original_sklearn_version} (`bash scripts/setup.sh` "
            "installs the versions of constraints.txt) or publish a model trained here with "
            "`fraud-dagster train`."
        ) from exc
    except Exception as exc:  # unpickling can fail in many ways; all mean "unusable file"
        raise ModelIntegrityError(f"model file {path} could not be unpickled: {exc!r}") from exc
    if not hasattr(estimator, "predict_proba"):
        raise ModelIntegrityError(
            f"model file {path} holds {type(estimator).__name__}, not a classifier"
        )
    logger.info("loaded model %s from %s (sha256 %s)", entry.version, path, entry.sha256[:12])
    return LoadedModel(
        entry=entry,
        estimator=estimator,
        threshold=threshold,
    )
