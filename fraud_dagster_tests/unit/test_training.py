"""Training and evaluation: the handbook's protocol pieces, the shared training path, publishing."""

from __future__ import annotations

import hashlib
import json
import threading
from datetime import UTC, datetime, tzinfo
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sklearn
import sklearn.base

from fraud_dagster import training
from fraud_dagster.errors import ConfigurationError, ModelIntegrityError
from fraud_dagster.features import FEATURE_COLUMNS, compute_features
from fraud_dagster.messages import RawBatch, parse_batch
from fraud_dagster.model import load_verified, read_manifest, sha256_of_file
from fraud_dagster.simulator import SimulationConfig, simulate_transactions
from fraud_dagster.training import (
    MODEL_KINDS,
    MODEL_NAME,
    Periods,
    _heartbeat,
    build_estimator,
    card_precision_at_k,
    evaluation_rows,
    load_labelled_csv,
    prepare_training_frame,
    publish_model,
    simulated_training_data,
    train_model,
)


def tx(rows: list[tuple[str, str, int]]) -> pd.DataFrame:
    """(date, account, is_fraud) rows as a transaction frame."""
    return pd.DataFrame(
        {
            "transaction_id": [f"t{i}" for i in range(len(rows))],
            "transaction_date": pd.to_datetime([r[0] for r in rows]),
            "account_id": [r[1] for r in rows],
            "merchant": "m",
            "transaction_amount": 10.0,
            "is_fraud": [r[2] for r in rows],
        }
    )


def reference_card_precision(frame: pd.DataFrame, scores: np.ndarray, k: int) -> float:
    """The handbook's definition written out with plain Python, for comparison."""
    days = sorted(set(frame["transaction_date"].dt.normalize()))
    detected: set[str] = set()
    precisions = []
    for day in days:
        best: dict[str, float] = {}
        fraud: dict[str, int] = {}
        for date, account, label, score in zip(
            frame["transaction_date"], frame["account_id"], frame["is_fraud"], scores, strict=True
        ):
            if date.normalize() != day or account in detected:
                continue
            best[account] = max(best.get(account, -1.0), score)
            fraud[account] = max(fraud.get(account, 0), int(label))
        top = sorted(best, key=lambda a: -best[a])[:k]
        found = [a for a in top if fraud[a]]
        precisions.append(len(found) / k)
        detected.update(found)
    return float(np.mean(precisions))


def test_card_precision_counts_a_card_once_and_divides_by_k() -> None:
    frame = tx(
        [
            ("2024-01-01 10:00", "A", 1),
            ("2024-01-01 11:00", "A", 0),  # same card: max score, max label
            ("2024-01-01 12:00", "B", 0),
            ("2024-01-01 13:00", "C", 1),
            ("2024-01-02 10:00", "A", 1),  # detected on day 1: left out on day 2
            ("2024-01-02 11:00", "C", 1),
            ("2024-01-02 12:00", "D", 0),
        ]
    )
    scores = np.array([0.2, 0.9, 0.8, 0.1, 0.99, 0.7, 0.6])
    # Day 1: cards A (0.9, fraud), B (0.8): 1 of 2. Day 2 without A: C (fraud), D: 1 of 2.
    assert card_precision_at_k(frame, scores, k=2) == pytest.approx(0.5)
    # Fewer cards than k still divide by k: day 1 has A, B, C -> 2 frauds / 5.
    assert card_precision_at_k(frame.iloc[:4], scores[:4], k=5) == pytest.approx(0.4)


def test_card_precision_matches_the_written_out_definition() -> None:
    rng = np.random.default_rng(3)
    n = 600
    frame = tx(
        [
            (
                f"2024-01-0{1 + i % 4} {rng.integers(0, 24):02d}:00",
                f"c{rng.integers(0, 80)}",
                int(rng.random() < 0.15),
            )
            for i in range(n)
        ]
    )
    scores = rng.random(n)
    for k in (5, 20, 100):
        assert card_precision_at_k(frame, scores, k) == pytest.approx(
            reference_card_precision(frame, scores, k)
        )


def test_periods_follow_the_handbook_calendar() -> None:
    periods = Periods.starting("2018-07-25")
    assert (periods.train_start, periods.train_end) == (
        pd.Timestamp("2018-07-25"),
        pd.Timestamp("2018-07-31"),
    )
    assert (periods.test_start, periods.test_end) == (
        pd.Timestamp("2018-08-08"),
        pd.Timestamp("2018-08-14"),
    )
    dates = pd.Series(pd.to_datetime(["2018-05-01 00:00", "2018-08-14 23:00"]))
    assert Periods.last_days(dates, train_days=7, test_days=7) == periods


def test_test_selection_drops_cards_known_to_be_compromised() -> None:
    periods = Periods.starting("2024-01-01")  # train 01-01..07, test 01-15..21
    frame = tx(
        [
            ("2023-12-20 10:00", "OLD", 1),  # fraud before the training period: not counted
            ("2024-01-03 10:00", "TRAIN", 1),  # fraud in training: known all test long
            ("2024-01-09 10:00", "DELAY", 1),  # known from 01-09 + 8 days = 01-17
            ("2024-01-15 10:00", "OLD", 0),
            ("2024-01-15 11:00", "TRAIN", 0),
            ("2024-01-16 10:00", "DELAY", 1),
            ("2024-01-17 10:00", "DELAY", 0),
            ("2024-01-21 10:00", "NEW", 1),
            ("2024-01-22 10:00", "NEW", 1),  # after the test period
        ]
    )
    kept = frame.loc[evaluation_rows(frame, periods), ["account_id", "transaction_date"]]
    assert list(kept["account_id"]) == ["OLD", "DELAY", "NEW"]
    assert list(kept["transaction_date"].dt.day) == [15, 16, 21]


@pytest.fixture(scope="module")
def simulated() -> pd.DataFrame:
    config = SimulationConfig(n_customers=600, n_terminals=1200, n_days=70, seed=5)
    return prepare_training_frame(simulate_transactions(config))


def test_train_model_fits_on_train_and_measures_on_later_test(simulated: pd.DataFrame) -> None:
    lines: list[str] = []
    result = train_model(simulated, kind="gradient_boosting", progress=lines.append)
    periods = result.periods
    assert periods.test_end == simulated["transaction_date"].max().normalize()
    assert periods.test_start - periods.train_end == pd.Timedelta(days=8)
    in_train = periods.mask(simulated["transaction_date"], "train")
    assert result.train_rows == int(in_train.sum())
    assert result.train_frauds == int(simulated.loc[in_train, "is_fraud"].sum())
    assert 0 < result.test_rows < int(periods.mask(simulated["transaction_date"], "test").sum())
    assert len(result.test_scores) == result.test_rows
    assert result.metrics["auc_roc"] > 0.8
    assert 0 < result.metrics["average_precision"] <= 1
    assert 0 < result.metrics["card_precision_at_100"] <= 1
    assert 0 < result.threshold < 1
    assert sum(result.score_histogram["counts"]) == result.test_rows
    steps = [line[:5] for line in lines if line.startswith("[")]
    assert steps == ["[1/4]", "[2/4]", "[3/4]", "[4/4]"]


def test_long_fits_report_that_they_are_still_going() -> None:
    """Driven, not timed: an interval passes when the test grants it, on a clock the test sets."""
    lines: list[str] = []
    reported = threading.Semaphore(0)
    intervals = threading.Semaphore(0)
    asked: list[float] = []
    now = [1000.0]

    def report(line: str) -> None:
        lines.append(line)
        reported.release()

    def wait(stop: threading.Event, seconds: float) -> bool:
        """One interval: over when the test grants it (False), or when the fit ends (True)."""
        asked.append(seconds)
        while not stop.is_set():
            if intervals.acquire(timeout=0.01):
                return False
        return True

    with _heartbeat(report, "fitting x", every_seconds=30.0, clock=lambda: now[0], wait=wait):
        for elapsed in (30.0, 60.0):
            now[0] = 1000.0 + elapsed
            intervals.release()
            assert reported.acquire(timeout=10), f"no report after {elapsed:.0f}s"
    assert lines == ["      still fitting x: 30s", "      still fitting x: 60s"]
    assert asked == [30.0, 30.0, 30.0]  # the third interval ended with the fit, unreported
    assert not any(t.name == "training-heartbeat" for t in threading.enumerate())


def test_training_needs_frauds_in_both_periods(simulated: pd.DataFrame) -> None:
    genuine = simulated.assign(is_fraud=0)
    with pytest.raises(ModelIntegrityError, match="both need frauds"):
        train_model(genuine, kind="logistic")


def test_every_kind_builds_and_unknown_kinds_are_refused() -> None:
    final_steps = {kind: type(build_estimator(kind).steps[-1][1]).__name__ for kind in MODEL_KINDS}
    assert final_steps == {
        "forest_boosting": "VotingClassifier",
        "gradient_boosting": "HistGradientBoostingClassifier",
        "random_forest": "RandomForestClassifier",
        "logistic": "LogisticRegression",
    }
    with pytest.raises(ConfigurationError, match="forest_boosting"):
        build_estimator("deep_magic")


def test_publish_writes_file_and_manifest_entry(tmp_path: Path, simulated: pd.DataFrame) -> None:
    result = train_model(simulated, kind="logistic")
    first = publish_model(tmp_path, result, source="unit test")
    second = publish_model(tmp_path, result, source="unit test")  # same second: distinct version
    assert first.version != second.version
    manifest = read_manifest(tmp_path)
    assert [e.version for e in manifest.entries] == [first.version, second.version]
    assert manifest.default_version == first.version  # the first model serves until a promotion
    assert manifest.newest().version == second.version
    raw = json.loads((tmp_path / "manifest.json").read_text())["models"][0]
    for key in ("version", "file", "sha256", "created_at", "features", "metrics", "threshold"):
        assert raw[key], key
    assert raw["kind"] == "logistic"
    assert raw["features"] == FEATURE_COLUMNS
    assert raw["training_data"]["train_start"] == result.periods.train_start.date().isoformat()
    assert raw["training_data"]["test_rows"] == result.test_rows
    assert raw["trained_with"]["scikit-learn"] == sklearn.__version__
    assert sha256_of_file(tmp_path / first.file) == first.sha256
    loaded = load_verified(tmp_path, first)
    assert loaded.threshold == pytest.approx(result.threshold, abs=1e-6)


def test_publishing_writes_through_no_link_placed_in_the_models_directory(
    tmp_path: Path, simulated: pd.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A link where the next model file or the manifest's temporary file goes (dangling, so
    `exists()` missed it) had the publish write wherever the link pointed, outside models/."""
    now = datetime(2026, 12, 3, 11, 0, tzinfo=UTC)

    class SameSecond(datetime):
        @classmethod
        def now(cls, tz: tzinfo | None = None) -> datetime:
            return now

    monkeypatch.setattr(training, "datetime", SameSecond)  # both publishes in one second
    models_dir, elsewhere = tmp_path / "models", tmp_path / "elsewhere"
    models_dir.mkdir()
    elsewhere.mkdir()
    result = train_model(simulated, kind="logistic")
    first = publish_model(models_dir, result, source="unit test")
    (models_dir / "manifest.json.tmp").symlink_to(elsewhere / "manifest-copy.json")
    planted = [
        (models_dir / f"{MODEL_NAME}-{first.version}-{n}.joblib", elsewhere / f"model-{n}")
        for n in range(2, 6)
    ]
    for link, target in planted:
        link.symlink_to(target)

    second = publish_model(models_dir, result, source="unit test")

    assert list(elsewhere.iterdir()) == []
    assert not (models_dir / second.file).is_symlink()
    assert hashlib.sha256((models_dir / second.file).read_bytes()).hexdigest() == second.sha256
    assert [e.version for e in read_manifest(models_dir).entries] == [first.version, second.version]


def test_training_data_with_a_repeated_transaction_id_is_refused(simulated: pd.DataFrame) -> None:
    repeated = pd.concat([simulated, simulated.iloc[[3]]], ignore_index=True)
    with pytest.raises(ConfigurationError, match=r"repeats 1 transaction id\(s\), e.g. "):
        prepare_training_frame(repeated)


def test_publishing_beside_an_unreadable_manifest_changes_nothing(
    tmp_path: Path, simulated: pd.DataFrame
) -> None:
    """A hand edit's typo in the manifest must not make a publish start a new manifest: that
    dropped every entry and made the new, unchecked model the default that batch runs serve."""
    result = train_model(simulated, kind="logistic")
    serving = publish_model(tmp_path, result, source="unit test", make_default=True)
    manifest_path = tmp_path / "manifest.json"
    broken = manifest_path.read_text().replace(
        f'"threshold": {serving.threshold}', '"threshold": "0,34"'
    )
    assert broken != manifest_path.read_text()
    manifest_path.write_text(broken)
    files = sorted(tmp_path.iterdir())
    with pytest.raises(ModelIntegrityError, match="repair it before publishing"):
        publish_model(tmp_path, result, source="unit test")
    assert manifest_path.read_text() == broken
    assert sorted(tmp_path.iterdir()) == files  # no model file written either


def test_a_model_pickled_by_another_scikit_learn_version_is_refused(
    tmp_path: Path, simulated: pd.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    """scikit-learn only warns when it unpickles another version's estimator (and may misread
    it); the run must refuse such a model with a message that says what to do."""
    result = train_model(simulated, kind="logistic")
    monkeypatch.setattr(sklearn.base, "__version__", "1.0.2")  # the version its pickle records
    older = publish_model(tmp_path, result, source="unit test")
    monkeypatch.undo()
    with pytest.raises(ModelIntegrityError) as refused:
        load_verified(tmp_path, older)
    message = str(refused.value)
    assert f"pickled by scikit-learn 1.0.2, but scikit-learn {sklearn.__version__} is" in message
    assert "constraints.txt" in message and "fraud-dagster train" in message
    current = publish_model(tmp_path, result, source="unit test")  # same estimator, this version
    assert load_verified(tmp_path, current).version == current.version


def test_labelled_csv_in_handbook_or_project_columns(tmp_path: Path) -> None:
    frame = simulate_transactions(SimulationConfig(n_customers=20, n_terminals=40, n_days=3))
    handbook = pd.DataFrame(
        {
            "TRANSACTION_ID": range(len(frame)),
            "TX_DATETIME": frame["transaction_date"].dt.strftime("%Y-%m-%d %H:%M:%S"),
            "CUSTOMER_ID": frame["account_id"].str[1:].astype(int),
            "TERMINAL_ID": frame["merchant"].str[1:].astype(int),
            "TX_AMOUNT": frame["transaction_amount"],
            "TX_TIME_SECONDS": 0,
            "TX_TIME_DAYS": 0,
            "TX_FRAUD": frame["is_fraud"],
            "TX_FRAUD_SCENARIO": frame["fraud_scenario"],
        }
    )
    handbook.to_csv(tmp_path / "handbook.csv.gz", index=False)
    frame.to_csv(tmp_path / "own.csv", index=False)
    from_handbook = load_labelled_csv(tmp_path / "handbook.csv.gz")
    own = load_labelled_csv(tmp_path / "own.csv")
    assert len(from_handbook) == len(own) == len(frame)
    assert from_handbook["transaction_id"].tolist() == [str(i) for i in range(len(frame))]
    assert from_handbook["is_fraud"].tolist() == own["is_fraud"].tolist()
    assert own["transaction_date"].dtype.kind == "M"
    with pytest.raises(ConfigurationError, match="lacks the columns"):
        frame.drop(columns=["is_fraud"]).to_csv(tmp_path / "bad.csv", index=False)
        load_labelled_csv(tmp_path / "bad.csv")


def test_csv_dates_with_utc_offsets_become_the_utc_dates_scoring_reads(tmp_path: Path) -> None:
    """Before: dates with an offset (as in the README's example message) made the column
    tz-aware and training crashed in the features, or refused mixed offsets outright."""
    dates = ["2026-11-29T08:15:00+05:00", "2026-11-29T11:15:00Z", "2026-11-29 12:00:00"]
    pd.DataFrame(
        {
            "transaction_id": ["a", "b", "c"],
            "account_id": ["A", "A", "A"],
            "merchant": ["M", "M", "M"],
            "transaction_amount": [1.0, 2.0, 3.0],
            "transaction_date": dates,
            "is_fraud": [0, 1, 0],
        }
    ).to_csv(tmp_path / "offsets.csv", index=False)
    frame = load_labelled_csv(tmp_path / "offsets.csv")
    online = parse_batch(batch_of_messages(frame.drop(columns="is_fraud"), dates))
    assert online.rejections == []
    assert frame["transaction_date"].tolist() == online.transactions["transaction_date"].tolist()
    assert frame["transaction_date"].tolist() == [
        pd.Timestamp("2026-11-29 03:15:00"),
        pd.Timestamp("2026-11-29 11:15:00"),
        pd.Timestamp("2026-11-29 12:00:00"),
    ]
    assert compute_features(frame)["during_night"].tolist() == [1, 0, 0]  # 03:15 UTC, not 08:15


def batch_of_messages(frame: pd.DataFrame, dates: list[str]) -> RawBatch:
    """`frame`'s rows as the JSON messages a producer would send, with the dates as written."""
    rows = frame.assign(transaction_date=dates).to_dict("records")
    raw = RawBatch("topic", 0, 0, len(rows) - 1)
    for offset, row in enumerate(rows):
        raw.offsets.append(offset)
        raw.timestamps_ms.append(1_700_000_000_000)
        raw.values.append(json.dumps(row).encode())
    return raw


def test_unreadable_csv_dates_are_a_clear_error(tmp_path: Path) -> None:
    frame = simulate_transactions(SimulationConfig(n_customers=20, n_terminals=40, n_days=1))
    frame.assign(transaction_date="sometime").to_csv(tmp_path / "bad_dates.csv", index=False)
    with pytest.raises(ConfigurationError, match="unreadable transaction_date"):
        load_labelled_csv(tmp_path / "bad_dates.csv")


def test_labels_and_amounts_that_are_not_numbers_are_named_instead_of_a_traceback(
    tmp_path: Path,
) -> None:
    """Before: "yes" as a label or "ten" as an amount stopped `fraud-dagster train` with
    pandas' ValueError; a file of another shape with its tokenizer's ParserError; an empty one
    with an AttributeError from the period calendar."""
    rows = {
        "transaction_id": ["t1", "t2", "t3"],
        "account_id": ["A", "A", "B"],
        "merchant": ["M", "M", "M"],
        "transaction_amount": ["10.5", "12", "7"],
        "transaction_date": ["2026-11-01 10:00:00", "2026-11-02 10:00:00", "2026-11-03 10:00:00"],
        "is_fraud": ["0", "", "1"],
    }
    pd.DataFrame(rows).to_csv(tmp_path / "good.csv", index=False)
    assert load_labelled_csv(tmp_path / "good.csv")["is_fraud"].tolist() == [0, 0, 1]

    pd.DataFrame({**rows, "is_fraud": ["0", "yes", "1"]}).to_csv(tmp_path / "l.csv", index=False)
    with pytest.raises(ConfigurationError, match=r"is_fraud must be 0 \(genuine\) or 1 .*t2: "):
        load_labelled_csv(tmp_path / "l.csv")
    amounts = ["ten", "-1", "inf"]
    pd.DataFrame({**rows, "transaction_amount": amounts}).to_csv(tmp_path / "a.csv", index=False)
    with pytest.raises(ConfigurationError, match=r"3 row\(s\) hold something else.*t1: 'ten'"):
        load_labelled_csv(tmp_path / "a.csv")

    (tmp_path / "ragged.csv").write_text("root:x:0:0\ndaemon:x:1:1\nsome,thing,else,here\n")
    with pytest.raises(ConfigurationError, match=r"training data .*ragged\.csv: Error tokenizing"):
        load_labelled_csv(tmp_path / "ragged.csv")
    pd.DataFrame(columns=list(rows)).to_csv(tmp_path / "empty.csv", index=False)
    with pytest.raises(ConfigurationError, match="holds no transactions"):
        load_labelled_csv(tmp_path / "empty.csv")


def test_the_simulator_needs_at_least_one_day() -> None:
    """Before: the train_model job with simulated_days 0 failed in the period calendar with
    "'NaTType' object has no attribute 'normalize'"."""
    for days in (0, -3):
        with pytest.raises(
            ConfigurationError, match=f"simulated_days must be 1 or more, got {days}"
        ):
            simulated_training_data(days)
