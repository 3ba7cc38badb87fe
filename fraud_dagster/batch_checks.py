"""Quality checks of one batch, as plain functions: the asset checks of every batch run call them.

* rejected share: messages stored as rejected / messages read, under a limit (a producer that
  changed its format shows here first);
* offsets read: no offset of the batch's range was deleted by retention before it was read;
* score drift: the population stability index (PSI) of the batch's fraud probabilities against
  the held-out scores recorded when the model was trained (the manifest's `score_histogram`);
* model file: the file of the model that scored the batch still hashes to its recorded SHA-256.

Each returns a `CheckOutcome`: passed or not, one sentence for the UI and plain metadata. What a
failure means (severity) and how it is shown are decided in `ops.py`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fraud_dagster.errors import ModelIntegrityError
from fraud_dagster.model import read_manifest, verify_model_file

# A bin's share below this counts as this: an empty bin is rare, not impossible (ln 0).
PSI_SHARE_FLOOR = 1e-4


@dataclass(frozen=True)
class CheckOutcome:
    """The result of one check: passed, why (for the UI) and figures (plain values)."""

    passed: bool
    description: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class HistogramBin:
    """One bin of a score histogram: its range, the reference's share and the batch's."""

    low: float
    high: float
    reference_share: float
    batch_count: int
    batch_share: float

    @property
    def label(self) -> str:
        return f"{self.low:.2f}-{self.high:.2f}"


# --- rejected share ----------------------------------------------------------------------------


def rejected_share(read: int, rejected: int) -> float:
    """Share of the messages read that were rejected; 0 for an empty batch."""
    if read < 0 or rejected < 0:
        raise ValueError(f"counts cannot be negative: {rejected} rejected of {read} read")
    return rejected / read if read else 0.0


def check_rejected_share(read: int, rejected: int, max_share: float) -> CheckOutcome:
    """Passes when at most `max_share` of the batch's messages were rejected."""
    share = rejected_share(read, rejected)
    passed = share <= max_share
    description = f"{rejected} of {read} messages rejected ({share:.1%}; limit {max_share:.1%})"
    if not passed:
        description += (
            ". Every one is stored in rejected_transactions with its reason and raw bytes: "
            "look there for this offset range (did the producer change its format?)"
        )
    return CheckOutcome(
        passed,
        description,
        {
            "read": read,
            "rejected": rejected,
            "rejected_share": round(share, 6),
            "max_rejected_share": max_share,
        },
    )


# --- offsets read ------------------------------------------------------------------------------


def check_offsets_read(
    first_offset: int, last_offset: int, lost: Sequence[tuple[int, int]]
) -> CheckOutcome:
    """Passes when no offset of the batch's range is recorded as lost: deleted by retention
    before any batch read it (`lost`: the recorded ranges, first and last offset)."""
    size = last_offset - first_offset + 1
    if not lost:
        return CheckOutcome(
            True,
            f"every offset of {first_offset}..{last_offset} was read (none deleted unread)",
            {"lost_offsets": 0},
        )
    count = sum(last - first + 1 for first, last in lost)
    ranges = ", ".join(f"{first}..{last}" for first, last in lost)
    return CheckOutcome(
        False,
        f"{count} of the range's {size} offsets ({ranges}) were deleted by Kafka retention "
        "before any batch read them: those transactions were never scored or alerted on. They "
        "are recorded in lost_ranges; ask the producing system to resend them, and keep "
        "outages and failed batches shorter than the topic's retention.ms",
        {"lost_offsets": count, "lost_ranges": ranges},
    )


# --- score drift -------------------------------------------------------------------------------


def reference_histogram(recorded: Mapping[str, Any] | None) -> tuple[np.ndarray, np.ndarray]:
    """(edges, counts) of a manifest's `score_histogram`; ValueError says what is wrong."""
    if not recorded:
        raise ValueError("the model's manifest entry records no score_histogram")
    try:
        edges = np.asarray(recorded["edges"], dtype=np.float64)
        counts = np.asarray(recorded["counts"], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"score_histogram is malformed: {exc!r}") from exc
    if edges.ndim != 1 or counts.ndim != 1 or len(edges) != len(counts) + 1 or len(counts) < 2:
        raise ValueError("score_histogram needs n + 1 edges for n >= 2 counts")
    if not np.all(np.diff(edges) > 0) or not np.all(np.isfinite(edges)):
        raise ValueError("score_histogram edges must be finite and increasing")
    if np.any(counts < 0) or counts.sum() <= 0:
        raise ValueError("score_histogram counts must be non-negative with a positive total")
    return edges, counts


def histogram_counts(scores: Sequence[float] | np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts of `scores` in the bins of `edges` (scores outside go to the first or last bin)."""
    values = np.clip(np.asarray(scores, dtype=np.float64), edges[0], edges[-1])
    counts, _ = np.histogram(values, bins=edges)
    return counts


def population_stability_index(
    expected_counts: Sequence[float] | np.ndarray,
    actual_counts: Sequence[float] | np.ndarray,
    floor: float = PSI_SHARE_FLOOR,
) -> float:
    """PSI = sum over bins of (a - e) * ln(a / e), with a and e each bin's share.

    0 means the same distribution; by the usual rule of thumb under 0.1 is no real change,
    0.1-0.25 a moderate shift and above 0.25 a large one. Shares under `floor` count as `floor`.
    """
    expected = np.asarray(expected_counts, dtype=np.float64)
    actual = np.asarray(actual_counts, dtype=np.float64)
    if expected.shape != actual.shape or expected.sum() <= 0 or actual.sum() <= 0:
        raise ValueError("PSI needs two histograms of the same bins, each with a positive total")
    e = np.maximum(expected / expected.sum(), floor)
    a = np.maximum(actual / actual.sum(), floor)
    return float(np.sum((a - e) * np.log(a / e)))


def score_bins(
    scores: Sequence[float] | np.ndarray, edges: np.ndarray, reference_counts: np.ndarray
) -> list[HistogramBin]:
    """The batch's scores beside the reference, bin by bin (what the UI shows)."""
    counts = histogram_counts(scores, edges)
    total = counts.sum()
    reference_total = reference_counts.sum()
    return [
        HistogramBin(
            low=float(edges[i]),
            high=float(edges[i + 1]),
            reference_share=float(reference_counts[i] / reference_total),
            batch_count=int(counts[i]),
            batch_share=float(counts[i] / total) if total else 0.0,
        )
        for i in range(len(counts))
    ]


def check_score_drift(
    scores: Sequence[float] | np.ndarray,
    recorded_histogram: Mapping[str, Any] | None,
    model_version: str,
    max_psi: float,
    min_scores: int,
) -> CheckOutcome:
    """Passes when the PSI of the batch's scores against the model's reference is <= `max_psi`.

    A batch with fewer than `min_scores` scores passes without a judgement (its PSI is shown):
    with few scores the PSI of an unchanged distribution is large by chance alone.
    A model without a usable reference histogram fails: drift is then not watched at all.
    """
    n = len(scores)
    metadata: dict[str, Any] = {
        "model_version": model_version,
        "scores": n,
        "max_psi": max_psi,
        "min_scores": min_scores,
    }
    try:
        edges, reference_counts = reference_histogram(recorded_histogram)
    except ValueError as exc:
        return CheckOutcome(
            False,
            f"drift of model {model_version} cannot be checked: {exc}. Publish the model again "
            "with `fraud-dagster train` (it records the held-out score histogram).",
            metadata,
        )
    if n == 0:
        return CheckOutcome(
            True, "no transaction scored in this batch: nothing to compare", metadata
        )
    psi = population_stability_index(reference_counts, histogram_counts(scores, edges))
    metadata["psi"] = round(psi, 6)
    metadata["bins"] = score_bins(scores, edges, reference_counts)
    if n < min_scores:
        return CheckOutcome(
            True,
            f"PSI {psi:.3f} over only {n} scores (fewer than {min_scores}): too few to judge "
            "drift, shown for information",
            metadata,
        )
    passed = psi <= max_psi
    description = (
        f"PSI {psi:.3f} of {n} scores against model {model_version}'s held-out scores "
        f"(limit {max_psi:g})"
    )
    if not passed:
        description += (
            ": the traffic no longer looks like what the model was evaluated on; its threshold "
            "and alert rate may be off. Compare the bins below, and consider retraining."
        )
    return CheckOutcome(passed, description, metadata)


def recorded_score_histogram(models_dir: Path, version: str) -> Mapping[str, Any] | None:
    """The held-out score histogram the manifest records for `version`.

    None when the manifest or the entry cannot be read: `check_model_file` says why.
    """
    try:
        return read_manifest(models_dir).get(version).score_histogram
    except ModelIntegrityError:
        return None


# --- model file --------------------------------------------------------------------------------


def check_model_file(models_dir: Path, version: str) -> CheckOutcome:
    """Passes when `version` is in the manifest and its file hashes to the recorded SHA-256.

    Called after the batch was scored: a file replaced since the run loaded it fails here, and
    the next batch run refuses to load it.
    """
    metadata: dict[str, Any] = {"model_version": version, "models_dir": str(models_dir)}
    try:
        entry = read_manifest(models_dir).get(version)
        metadata.update(file=entry.file, sha256=entry.sha256)
        verify_model_file(models_dir, entry)
    except ModelIntegrityError as exc:
        return CheckOutcome(False, f"model {version} is not verified: {exc}", metadata)
    return CheckOutcome(
        True,
        f"model {version}: {entry.file} matches the SHA-256 recorded in the manifest "
        f"({entry.sha256[:12]}...)",
        metadata,
    )


def share_bar(share: float, width: int = 40) -> str:
    """A text bar for a share in [0, 1]; any share above 0 shows at least one block."""
    if share <= 0:
        return ""
    return "█" * max(1, math.ceil(share * width))
