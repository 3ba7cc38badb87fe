"""Which model serves, and what a newly published model must pass before it does.

Batch runs load the *active* version: the last one promoted into `model_promotions`, or the
manifest's `default_version` before any promotion (the shipped model). Publishing a model
(`fraud-dagster train`, the `fraud_model` asset) does not put it in service. `reload_model` takes
the newest manifest entry, verifies its SHA-256 and unpickles it, scores a fixed sanity batch,
checks that its recorded metrics are not worse than the active model's beyond a tolerance, and
only then records the promotion. A refused model changes nothing: the model in service stays in
service, because every batch run (a fresh process) loads the active version, which did not move.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score
from sqlalchemy.engine import Engine

from fraud_dagster.errors import ModelIntegrityError
from fraud_dagster.features import FEATURE_COLUMNS, compute_features
from fraud_dagster.model import (
    LoadedModel,
    Manifest,
    ModelEntry,
    load_verified,
    model_file_path,
    sha256_of_file,
    threshold_problem,
)
from fraud_dagster.simulator import SimulationConfig, simulate_transactions
from fraud_dagster.storage.promotions import (
    active_model_version,
    promoted_sha256,
    record_promotion,
)

logger = logging.getLogger(__name__)

DEFAULT_METRIC_TOLERANCE = 0.02
COMPARED_METRICS = ("auc_roc", "average_precision", "card_precision_at_100")
# The sanity batch: a fixed simulated history; its last days are scored by every candidate.
SANITY_SIMULATION = SimulationConfig(n_days=40, seed=20_240_101, id_prefix="SANITY")
SANITY_SCORED_DAYS = 3
SANITY_MIN_AUC = 0.75
SANITY_MAX_ALERT_RATE = 0.10

PROMOTED, UNCHANGED, REFUSED = "promoted", "unchanged", "refused"


@dataclass(frozen=True)
class Check:
    """One validation step of a candidate model and what it found."""

    name: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class ReloadDecision:
    """What `reload_model` decided, and why: promoted, unchanged or refused."""

    outcome: str
    reason: str
    candidate: ModelEntry | None
    previous_version: str | None
    active_version: str | None
    checks: tuple[Check, ...] = field(default=())


def active_version(engine: Engine, manifest: Manifest) -> str:
    """The version batch runs load (see `Manifest.serving_version`), pins aside."""
    return manifest.serving_version(active_model_version(engine))


def require_promoted_hash(engine: Engine, entry: ModelEntry) -> None:
    """Refuse a promoted version whose manifest entry no longer records the promoted SHA-256.

    The manifest sits next to the model files, so replacing a file *and* its manifest hash passes
    the manifest check; the hash `reload_model` recorded in the database at promotion does not
    move with them. Versions never promoted (the shipped default) have nothing to compare with.
    """
    recorded = promoted_sha256(engine, entry.version)
    if recorded is not None and recorded.lower() != entry.sha256:
        raise ModelIntegrityError(
            f"model version {entry.version} was promoted with SHA-256 {recorded.lower()}, but "
            f"the manifest now records {entry.sha256}: refusing to load it. Restore the promoted "
            "file and its manifest entry, or publish a new version and promote it with "
            "`reload_model`."
        )


def candidate_fingerprint(
    models_dir: Path,
    candidate: ModelEntry,
    active: str | None,
    serving_threshold: float | None = None,
) -> str:
    """Identifies one validation question: this entry (every field of it, so fixing a refused
    entry's threshold asks again), these file bytes, against this active version. The schedule
    does not ask a question again once it was answered with a refusal."""
    try:
        actual = sha256_of_file(model_file_path(models_dir, candidate))
    except ModelIntegrityError as exc:
        actual = f"refused: {exc}"
    except OSError:
        actual = "unreadable"
    entry = json.dumps(candidate.to_json(), sort_keys=True)
    text = f"{entry}|{actual}|{active}|{serving_threshold}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@lru_cache(maxsize=1)
def sanity_batch() -> tuple[pd.DataFrame, np.ndarray]:
    """Features and labels of the fixed sanity batch (built once per process)."""
    history = simulate_transactions(SANITY_SIMULATION)
    features = compute_features(history)
    dates = pd.to_datetime(history["transaction_date"])
    scored = (
        dates >= dates.max().normalize() - pd.Timedelta(days=SANITY_SCORED_DAYS - 1)
    ).to_numpy()
    return features.loc[scored].reset_index(drop=True), history["is_fraud"].to_numpy()[scored]


def check_sanity(model: LoadedModel) -> list[Check]:
    """Score the sanity batch: valid probabilities, frauds ranked first, few alerts, and at least
    one fraud alerted."""
    features, labels = sanity_batch()
    scores = model.predict_proba(features)
    if len(scores) != len(features) or not np.all(np.isfinite(scores)):
        return [
            Check("sanity_scores", False, "predict_proba returned missing or non-finite values")
        ]
    if scores.min() < 0 or scores.max() > 1:
        return [
            Check("sanity_scores", False, f"scores outside [0, 1]: {scores.min()}..{scores.max()}")
        ]
    checks = [Check("sanity_scores", True, f"{len(scores):,} valid probabilities")]
    auc = float(roc_auc_score(labels, scores))
    checks.append(
        Check(
            "sanity_auc",
            auc >= SANITY_MIN_AUC,
            f"AUC {auc:.3f} on the sanity batch ({int(labels.sum())} frauds), "
            f"minimum {SANITY_MIN_AUC}",
        )
    )
    flagged = scores >= model.threshold
    alert_rate = float(np.mean(flagged))
    checks.append(
        Check(
            "sanity_alert_rate",
            alert_rate <= SANITY_MAX_ALERT_RATE,
            f"{alert_rate:.2%} of the sanity batch at or above threshold {model.threshold:.3f} "
            f"(fraud rate {labels.mean():.2%}), maximum {SANITY_MAX_ALERT_RATE:.0%}",
        )
    )
    # A threshold above every fraud's score passes the checks above and never alerts.
    frauds, caught = int(labels.sum()), int(np.sum(flagged & (labels == 1)))
    checks.append(
        Check(
            "sanity_frauds_flagged",
            caught >= 1,
            f"{caught} of the sanity batch's {frauds} frauds at or above threshold "
            f"{model.threshold:.3f}, minimum 1",
        )
    )
    return checks


def compare_metrics(
    candidate: ModelEntry, active: ModelEntry | None, tolerance: float
) -> list[Check]:
    """Each recorded metric of the candidate must be >= the active model's minus `tolerance`."""
    if active is None:
        return [Check("metrics", True, "no active model in the manifest to compare with")]
    checks = []
    for name in COMPARED_METRICS:
        theirs = (active.metrics or {}).get(name)
        ours = (candidate.metrics or {}).get(name)
        if theirs is None:
            checks.append(Check(f"metric_{name}", True, f"active {active.version} records none"))
        elif ours is None:
            checks.append(Check(f"metric_{name}", False, "the candidate's manifest entry has none"))
        else:
            checks.append(
                Check(
                    f"metric_{name}",
                    ours >= theirs - tolerance,
                    f"{ours:.4f} vs active {theirs:.4f} (tolerance {tolerance})",
                )
            )
    return checks


def validate_candidate(
    models_dir: Path,
    candidate: ModelEntry,
    active: ModelEntry | None,
    tolerance: float,
    serving_threshold: float | None = None,
) -> list[Check]:
    """All checks of `candidate`; stops after the first one that makes the rest meaningless.

    The sanity batch is judged at the threshold batch runs will use: `serving_threshold`
    (FRAUD_MODEL_THRESHOLD) when set, else the candidate's own."""
    problem = threshold_problem(candidate.threshold)
    if problem is not None:
        return [Check("threshold", False, problem)]
    try:
        model = load_verified(models_dir, candidate, serving_threshold)
    except ModelIntegrityError as exc:
        return [Check("integrity", False, str(exc))]
    checks = [Check("integrity", True, f"SHA-256 {candidate.sha256[:12]}… matches; unpickled")]
    unknown = sorted(set(candidate.features) - set(FEATURE_COLUMNS))
    if unknown:
        checks.append(
            Check("features", False, f"features the pipeline does not compute: {unknown}")
        )
        return checks
    checks.append(Check("features", True, f"{len(candidate.features)} known features"))
    try:
        checks.extend(check_sanity(model))
    except Exception as exc:  # a model that cannot score the batch is refused, whatever the cause
        checks.append(Check("sanity_scores", False, f"scoring the sanity batch failed: {exc!r}"))
        return checks
    checks.extend(compare_metrics(candidate, active, tolerance))
    return checks


def reload_model(
    models_dir: Path,
    manifest: Manifest,
    engine: Engine,
    tolerance: float = DEFAULT_METRIC_TOLERANCE,
    run_id: str | None = None,
    serving_threshold: float | None = None,
) -> ReloadDecision:
    """Validate the newest manifest entry (at `serving_threshold`, if batch runs override the
    entry's threshold) and promote it if it passes every check."""
    promoted = active_model_version(engine)
    previous = manifest.serving_version(promoted)
    candidate = manifest.newest()
    if candidate.version == previous:
        return ReloadDecision(
            UNCHANGED,
            f"the newest model {previous} is already active",
            candidate,
            previous,
            previous,
        )
    try:
        active_entry = manifest.get(previous)
    except ModelIntegrityError:
        active_entry = None  # the active version left the manifest: nothing to compare with
    checks = tuple(
        validate_candidate(models_dir, candidate, active_entry, tolerance, serving_threshold)
    )
    failed = [check for check in checks if not check.passed]
    if failed:
        reason = f"model {candidate.version} refused, {previous} stays active: " + "; ".join(
            f"{check.name}: {check.detail}" for check in failed
        )
        logger.warning("%s", reason)
        return ReloadDecision(REFUSED, reason, candidate, previous, previous, checks)
    reason = f"validated against {previous}: " + ", ".join(c.name for c in checks)
    if not record_promotion(
        engine, candidate.version, candidate.sha256, reason, run_id, replacing=promoted
    ):
        now = active_version(engine, manifest)
        return ReloadDecision(
            UNCHANGED,
            f"model {candidate.version} passed its checks against {previous}, but another run "
            f"promoted {now} meanwhile: not promoted (the next reload validates the newest "
            f"model against {now})",
            candidate,
            previous,
            now,
            checks,
        )
    logger.info("promoted model %s (was %s)", candidate.version, previous)
    return ReloadDecision(
        PROMOTED,
        f"model {candidate.version} promoted, replacing {previous}",
        candidate,
        previous,
        candidate.version,
        checks,
    )
