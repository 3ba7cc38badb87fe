"""The batch checks' computations: rejected share, PSI against the model's reference, model file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from fraud_dagster.batch_checks import (
    check_model_file,
    check_offsets_read,
    check_rejected_share,
    check_score_drift,
    histogram_counts,
    population_stability_index,
    recorded_score_histogram,
    reference_histogram,
    rejected_share,
    score_bins,
    share_bar,
)
from fraud_dagster.model import (
    Manifest,
    ModelEntry,
    read_manifest,
    sha256_of_file,
    write_manifest,
)
from fraud_dagster.settings import PROJECT_ROOT

SHIPPED_MODELS = PROJECT_ROOT / "models"
REFERENCE = {"edges": [0.0, 0.25, 0.5, 0.75, 1.0], "counts": [700, 200, 60, 40]}


def sample_like(reference: dict, n: int, seed: int) -> np.ndarray:
    """Scores drawn from `reference`: a bin by its share, then uniformly inside the bin."""
    rng = np.random.default_rng(seed)
    edges = np.asarray(reference["edges"], dtype=float)
    counts = np.asarray(reference["counts"], dtype=float)
    bins = rng.choice(len(counts), size=n, p=counts / counts.sum())
    return rng.uniform(edges[bins], edges[bins + 1])


# --- rejected share ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("read", "rejected", "share"), [(0, 0, 0.0), (100, 0, 0.0), (100, 5, 0.05), (8, 8, 1.0)]
)
def test_rejected_share(read: int, rejected: int, share: float) -> None:
    assert rejected_share(read, rejected) == pytest.approx(share)


def test_rejected_share_refuses_negative_counts() -> None:
    with pytest.raises(ValueError, match="rejected"):
        rejected_share(10, -1)


def test_rejected_share_check_passes_at_the_limit_and_fails_above() -> None:
    at_limit = check_rejected_share(read=200, rejected=10, max_share=0.05)
    assert at_limit.passed
    assert at_limit.metadata == {
        "read": 200,
        "rejected": 10,
        "rejected_share": 0.05,
        "max_rejected_share": 0.05,
    }
    above = check_rejected_share(read=200, rejected=11, max_share=0.05)
    assert not above.passed
    assert "11 of 200" in above.description
    assert "rejected_transactions" in above.description


# --- PSI -----------------------------------------------------------------------------------------


def test_psi_of_a_distribution_with_itself_is_zero() -> None:
    assert population_stability_index([10, 30, 60], [1, 3, 6]) == pytest.approx(0.0, abs=1e-12)


def test_psi_by_hand() -> None:
    # (0.25 - 0.5) ln(0.25 / 0.5) + (0.75 - 0.5) ln(0.75 / 0.5)
    expected = -0.25 * math.log(0.5) + 0.25 * math.log(1.5)
    assert population_stability_index([50, 50], [25, 75]) == pytest.approx(expected)
    assert population_stability_index([25, 75], [50, 50]) == pytest.approx(expected)


def test_psi_of_an_empty_bin_is_finite_and_large() -> None:
    psi = population_stability_index([50, 50], [100, 0])
    assert math.isfinite(psi)
    assert psi > 1.0


def test_psi_needs_matching_non_empty_histograms() -> None:
    with pytest.raises(ValueError, match="same bins"):
        population_stability_index([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="positive total"):
        population_stability_index([1, 2], [0, 0])


def test_histogram_counts_keep_the_edges_and_out_of_range_scores() -> None:
    edges = np.array([0.0, 0.5, 1.0])
    assert histogram_counts([0.0, 0.49, 0.5, 1.0, 1.2, -0.1], edges).tolist() == [3, 3]


@pytest.mark.parametrize(
    ("recorded", "problem"),
    [
        (None, "records no score_histogram"),
        ({"edges": [0, 1]}, "malformed"),
        ({"edges": [0, 0.5, 1], "counts": [1, 2, 3]}, r"n \+ 1 edges"),
        ({"edges": [0, 0.7, 0.5], "counts": [1, 2]}, "increasing"),
        ({"edges": [0, 0.5, 1], "counts": [0, 0]}, "positive total"),
    ],
)
def test_unusable_reference_histograms_are_refused(recorded: dict | None, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        reference_histogram(recorded)


# --- score drift -------------------------------------------------------------------------------


def test_scores_like_the_reference_pass() -> None:
    outcome = check_score_drift(
        sample_like(REFERENCE, 2000, seed=1), REFERENCE, "v1", max_psi=0.1, min_scores=200
    )
    assert outcome.passed, outcome.description
    assert outcome.metadata["psi"] < 0.02
    assert outcome.metadata["scores"] == 2000


def test_shifted_scores_fail_with_the_bins_compared() -> None:
    shifted = {"edges": REFERENCE["edges"], "counts": [100, 200, 300, 400]}
    outcome = check_score_drift(
        sample_like(shifted, 500, seed=2), REFERENCE, "v1", max_psi=0.25, min_scores=200
    )
    assert not outcome.passed
    assert outcome.metadata["psi"] > 0.25
    assert "PSI" in outcome.description and "limit 0.25" in outcome.description
    bins = outcome.metadata["bins"]
    assert [b.label for b in bins] == ["0.00-0.25", "0.25-0.50", "0.50-0.75", "0.75-1.00"]
    assert [b.reference_share for b in bins] == pytest.approx([0.7, 0.2, 0.06, 0.04])
    assert sum(b.batch_count for b in bins) == 500


def test_too_few_scores_are_not_judged_but_shown() -> None:
    outcome = check_score_drift([0.9] * 20, REFERENCE, "v1", max_psi=0.25, min_scores=200)
    assert outcome.passed
    assert "too few" in outcome.description
    assert outcome.metadata["psi"] > 0.25


def test_a_batch_without_scores_passes() -> None:
    outcome = check_score_drift([], REFERENCE, "v1", max_psi=0.25, min_scores=200)
    assert outcome.passed
    assert "psi" not in outcome.metadata


def test_a_model_without_reference_fails_the_drift_check() -> None:
    outcome = check_score_drift([0.1] * 500, None, "v1", max_psi=0.25, min_scores=200)
    assert not outcome.passed
    assert "cannot be checked" in outcome.description
    assert "fraud-dagster train" in outcome.description


def test_the_shipped_models_reference_tells_its_own_scores_from_shifted_ones() -> None:
    manifest = read_manifest(SHIPPED_MODELS)
    version = manifest.default_version or manifest.newest().version
    recorded = recorded_score_histogram(SHIPPED_MODELS, version)
    assert recorded is not None
    like = check_score_drift(
        sample_like(recorded, 1000, seed=3), recorded, version, max_psi=0.25, min_scores=200
    )
    assert like.passed and like.metadata["psi"] < 0.05
    # Ten times the held-out share above 0.5: an alert storm.
    heavy = sample_like(recorded, 1000, seed=4)
    heavy[:150] = 0.8
    assert not check_score_drift(heavy, recorded, version, 0.25, 200).passed


def test_score_bins_of_an_empty_batch_are_zero() -> None:
    edges, counts = reference_histogram(REFERENCE)
    assert [b.batch_share for b in score_bins([], edges, counts)] == [0.0] * 4


# --- model file --------------------------------------------------------------------------------


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "models"
    directory.mkdir()
    model_file = directory / "fraud-model-v1.joblib"
    model_file.write_bytes(b"model bytes")
    entry = ModelEntry(
        version="v1",
        file=model_file.name,
        sha256=sha256_of_file(model_file),
        threshold=0.5,
        features=("transaction_amount",),
        score_histogram=REFERENCE,
    )
    write_manifest(directory, Manifest(entries=(entry,), default_version="v1"))
    return directory


def test_an_intact_model_file_passes(models_dir: Path) -> None:
    outcome = check_model_file(models_dir, "v1")
    assert outcome.passed, outcome.description
    assert outcome.metadata["sha256"] == sha256_of_file(models_dir / "fraud-model-v1.joblib")
    assert recorded_score_histogram(models_dir, "v1") == REFERENCE


def test_a_changed_model_file_fails(models_dir: Path) -> None:
    (models_dir / "fraud-model-v1.joblib").write_bytes(b"other bytes")
    outcome = check_model_file(models_dir, "v1")
    assert not outcome.passed
    assert "SHA-256" in outcome.description


def test_a_missing_model_file_or_version_fails(models_dir: Path) -> None:
    assert not check_model_file(models_dir, "v2").passed
    assert recorded_score_histogram(models_dir, "v2") is None
    (models_dir / "fraud-model-v1.joblib").unlink()
    outcome = check_model_file(models_dir, "v1")
    assert not outcome.passed
    assert "cannot be read" in outcome.description


def test_a_model_file_outside_the_directory_fails(models_dir: Path) -> None:
    manifest = json.loads((models_dir / "manifest.json").read_text())
    manifest["models"][0]["file"] = "../elsewhere.joblib"
    (models_dir / "manifest.json").write_text(json.dumps(manifest))
    outcome = check_model_file(models_dir, "v1")
    assert not outcome.passed
    assert "outside" in outcome.description


def test_shipped_model_file_is_verified() -> None:
    manifest = read_manifest(SHIPPED_MODELS)
    assert check_model_file(SHIPPED_MODELS, manifest.default_version or "").passed


@pytest.mark.parametrize(
    ("share", "bar"), [(0.0, ""), (0.001, "█"), (0.5, "█" * 20), (1.0, "█" * 40)]
)
def test_share_bar(share: float, bar: str) -> None:
    assert share_bar(share) == bar


def test_offsets_read_check_passes_without_lost_offsets_and_names_them_otherwise() -> None:
    complete = check_offsets_read(100, 399, [])
    assert complete.passed and complete.metadata == {"lost_offsets": 0}
    partial = check_offsets_read(100, 399, [(100, 149), (200, 249)])
    assert not partial.passed
    assert partial.metadata == {"lost_offsets": 100, "lost_ranges": "100..149, 200..249"}
    assert "100 of the range's 300 offsets (100..149, 200..249)" in partial.description
    assert "lost_ranges" in partial.description
