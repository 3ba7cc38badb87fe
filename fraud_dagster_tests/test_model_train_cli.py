"""`fraud-dagster train`: simulator or CSV in, a verified model and its manifest entry out."""

from __future__ import annotations

from pathlib import Path

import pytest

from fraud_dagster import cli
from fraud_dagster.model import load_verified, read_manifest
from fraud_dagster.simulator import SimulationConfig, simulate_transactions
from fraud_dagster_tests.helpers import ordinary_and_large_amount


def run_cli(*argv: str) -> int:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--log-level", "INFO", *argv])
    return exit_info.value.code


def test_train_publishes_a_loadable_model_and_shows_progress(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FRAUD_VAR_DIR", str(tmp_path / "var"))
    models = tmp_path / "models"
    code = run_cli(
        "train", "--days", "50", "--seed", "4", "--kind", "logistic", "--models-dir", str(models)
    )
    assert code == 0
    out, err = capsys.readouterr()
    assert "published model" in out
    assert "[2/4] fitting logistic" in err
    manifest = read_manifest(models)
    (entry,) = manifest.entries
    assert manifest.default_version == entry.version  # the first model of an empty directory
    assert entry.training_data["source"] == "simulator(days=50, seed=4)"
    ordinary, large = load_verified(models, entry).predict_proba(
        ordinary_and_large_amount(entry.features)
    )
    assert ordinary < large

    labelled = simulate_transactions(SimulationConfig(n_days=50, seed=4))
    labelled.to_csv(tmp_path / "labelled.csv.gz", index=False)
    data = str(tmp_path / "labelled.csv.gz")
    assert run_cli("train", "--data", data, "--kind", "logistic", "--models-dir", str(models)) == 0
    manifest = read_manifest(models)
    assert len(manifest.entries) == 2
    assert manifest.newest().training_data["source"] == data
    assert manifest.default_version == entry.version  # a later model waits for a promotion
    assert manifest.newest().metrics == pytest.approx(entry.metrics, abs=1e-6)  # same data

    assert run_cli("train", "--kind", "deep_magic", "--models-dir", str(models)) == 1
    assert "unknown model kind 'deep_magic'" in capsys.readouterr().err
