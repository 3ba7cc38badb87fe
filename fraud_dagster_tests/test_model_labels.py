"""Labels through the CLI on a real SQLite database: analysts' verdicts and the handbook replay."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest

from fraud_dagster import cli
from fraud_dagster.storage import schema
from fraud_dagster.storage.batches import persist_batch
from fraud_dagster.storage.database import create_engine, ensure_schema, utcnow
from fraud_dagster_tests.helpers import table_rows

START = datetime(2026, 3, 1)


@pytest.fixture
def database(database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    url = database_url
    monkeypatch.setenv("FRAUD_DATABASE_URL", url)
    monkeypatch.setenv("FRAUD_VAR_DIR", str(tmp_path / "var"))
    engine = create_engine(url)
    ensure_schema(engine)
    engine.dispose()
    return url


def store_scored(url: str, days: list[int], prefix: str = "T") -> list[str]:
    """Scored transactions T0, T1, ... at START + days (noon), as a batch run stores them."""
    ids = [f"{prefix}{i}" for i in range(len(days))]
    frame = pd.DataFrame(
        {
            "transaction_id": ids,
            "account_id": "A1",
            "merchant": "M1",
            "transaction_amount": 10.0,
            "transaction_date": [START + timedelta(days=d, hours=12) for d in days],
            "extra_fields": None,
            "source_topic": "t",
            "source_partition": 0,
            "source_offset": range(len(days)),
            "kafka_timestamp": None,
            "fraud_probability": 0.1,
            "is_suspicious": False,
            "model_version": "v",
        }
    )
    engine = create_engine(url)
    persist_batch(
        engine, frame, [], threshold=0.5, run_id=None, batch_range=("t", 0, 0, len(days) - 1)
    )
    engine.dispose()
    return ids


def run_cli(*argv: str) -> int:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--log-level", "WARNING", *argv])
    return exit_info.value.code


def labels(url: str) -> dict[str, dict]:
    return {row["transaction_id"]: row for row in table_rows(url, schema.fraud_labels)}


def test_analyst_label_records_who_and_when_and_can_be_corrected(
    database: str, capsys: pytest.CaptureFixture
) -> None:
    store_scored(database, [0])
    before = utcnow()
    assert run_cli("label", "T0", "--fraud", "--by", "alice") == 0
    assert "recorded T0 as fraud (by alice)" in capsys.readouterr().out
    row = labels(database)["T0"]
    assert (row["is_fraud"], row["labeled_by"], row["source"]) == (True, "alice", "analyst")
    assert before <= row["labeled_at"] <= utcnow()

    assert run_cli("label", "T0", "--genuine", "--by", "bob") == 0
    assert len(labels(database)) == 1
    assert (labels(database)["T0"]["is_fraud"], labels(database)["T0"]["labeled_by"]) == (
        False,
        "bob",
    )


def test_label_of_an_unknown_transaction_is_refused(
    database: str, capsys: pytest.CaptureFixture
) -> None:
    store_scored(database, [0])
    assert run_cli("label", "T-typo", "--fraud") == 1
    assert "no scored transaction has the id 'T-typo'" in capsys.readouterr().err
    assert labels(database) == {}


@pytest.mark.parametrize("by", ["x" * 129, "", "   ", "alice\x1b[2J"])
def test_who_confirmed_a_label_is_a_short_printable_name(
    database: str, by: str, capsys: pytest.CaptureFixture
) -> None:
    """Before: a name over the column's 128 characters was stored whole on SQLite and ended in
    PostgreSQL's DataError traceback; an empty or escape-laden one was stored as given."""
    store_scored(database, [0])
    assert run_cli("label", "T0", "--fraud", "--by", by) == 1
    assert "(--by) must be 1 to 128 printable characters" in capsys.readouterr().err
    assert labels(database) == {}
    assert run_cli("label", "T0", "--fraud", "--by", " " + "x" * 128 + " ") == 0
    assert labels(database)["T0"]["labeled_by"] == "x" * 128


def test_replay_loads_labels_known_after_the_delay(database: str, tmp_path: Path) -> None:
    days = [0, 1, 2, 5, 9, 10]
    ids = store_scored(database, days, prefix="")  # the stream carries the handbook's ids as text
    csv = tmp_path / "handbook.csv"
    pd.DataFrame(
        {
            "TRANSACTION_ID": range(len(days)),
            "TX_DATETIME": [
                (START + timedelta(days=d, hours=12)).strftime("%Y-%m-%d %H:%M:%S") for d in days
            ],
            "TX_FRAUD": [1, 0, 1, 0, 1, 0],
        }
    ).to_csv(csv, index=False)
    assert run_cli("label", "1", "--fraud", "--by", "alice") == 0  # an analyst was faster

    # As of day 9 noon: known are the transactions up to day 2 noon.
    as_of = (START + timedelta(days=9, hours=12)).isoformat()
    assert run_cli("load-labels", "--from-csv", str(csv), "--as-of", as_of) == 0
    rows = labels(database)
    assert set(rows) == {"0", "1", "2"}
    assert rows["1"]["labeled_by"] == "alice"  # not overwritten by the replay
    assert (rows["0"]["is_fraud"], rows["0"]["labeled_by"], rows["0"]["source"]) == (
        True,
        "handbook-replay",
        "replay",
    )
    assert rows["2"]["labeled_at"] == START + timedelta(days=9, hours=12)  # known 7 days later

    # Default "now": the latest stored transaction (day 10 noon) -> up to day 3 noon: nothing new.
    assert run_cli("load-labels", "--from-csv", str(csv)) == 0
    assert set(labels(database)) == {"0", "1", "2"}
    # A week later everything up to day 10 is known (an offset in --as-of is converted to UTC).
    later = (START + timedelta(days=17, hours=14)).isoformat() + "+02:00"
    assert run_cli("load-labels", "--from-csv", str(csv), "--as-of", later) == 0
    rows = labels(database)
    assert set(rows) == set(ids)
    assert [rows[i]["is_fraud"] for i in ids] == [True, True, True, False, True, False]


def test_replay_needs_a_readable_handbook_csv(
    database: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    assert (
        run_cli("load-labels", "--from-csv", str(tmp_path / "bad.csv"), "--as-of", "2026-01-01")
        == 1
    )
    assert "TRANSACTION_ID, TX_DATETIME, TX_FRAUD" in capsys.readouterr().err
    store_scored(database, [0])
    assert run_cli("load-labels", "--from-csv", str(tmp_path / "missing.csv")) == 1


def test_replay_reads_offsets_and_repeated_rows_and_names_bad_ones(
    database: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A re-export repeats rows, a source writes dates with offsets, a row lacks its label:
    the first two load (once, at the UTC time), the third is refused naming its line, and a
    refused file loads nothing (not a traceback halfway through)."""
    store_scored(database, [0, 1], prefix="")
    csv = tmp_path / "labels.csv"
    as_of = (START + timedelta(days=8, hours=12)).isoformat()  # known: up to day 1 noon UTC
    rows = pd.DataFrame(
        {
            "TRANSACTION_ID": ["0", "0", "1"],
            # 12:00 UTC on day 0 twice; 13:30+02:00 on day 1 is 11:30 UTC, so it is known
            "TX_DATETIME": [
                f"{START:%Y-%m-%d} 12:00:00",
                f"{START:%Y-%m-%d} 12:00:00",
                f"{START + timedelta(days=1):%Y-%m-%d}T13:30:00+02:00",
            ],
            "TX_FRAUD": ["1", "1", "0"],
        }
    )
    for broken, said in (
        (rows.assign(TX_FRAUD=["1", "1", ""]), "a TX_FRAUD other than 0 or 1 at line(s) 4"),
        (rows.assign(TRANSACTION_ID=["0", "", "1"]), "no TRANSACTION_ID at line(s) 3"),
        (rows.assign(TX_FRAUD=["1", "0", "0"]), "1 transaction id(s) two labels or dates, e.g. 0"),
        (rows.assign(TX_DATETIME=["2026-03-01", "2026-03-01", "1 March"]), "unreadable"),
    ):
        broken.to_csv(csv, index=False)
        assert run_cli("load-labels", "--from-csv", str(csv), "--as-of", as_of) == 1
        assert said in capsys.readouterr().err
        assert labels(database) == {}

    rows.to_csv(csv, index=False)
    assert run_cli("load-labels", "--from-csv", str(csv), "--as-of", as_of) == 0
    loaded = labels(database)
    assert {tid: row["is_fraud"] for tid, row in loaded.items()} == {"0": True, "1": False}
    assert loaded["1"]["labeled_at"] == START + timedelta(days=8, hours=11, minutes=30)
