"""Replaying a handbook-format CSV: the messages the producer sends for its rows."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from fraud_dagster.errors import ConfigurationError
from fraud_dagster.producer import count_csv_rows, handbook_messages
from fraud_dagster.training import load_labelled_csv


def test_dates_with_offsets_are_sent_in_utc_as_training_reads_them(tmp_path: Path) -> None:
    """Sent as local wall time with the offset dropped, a 03:15 UTC night transaction was
    scored as 08:15 (day): training and scoring computed different time features."""
    csv = tmp_path / "offsets.csv"
    pd.DataFrame(
        {
            "TRANSACTION_ID": [0, 1],
            "TX_DATETIME": ["2018-04-01T08:15:00+05:00", "2018-04-01 02:00:00"],
            "CUSTOMER_ID": [1, 2],
            "TERMINAL_ID": [3, 4],
            "TX_AMOUNT": [10.5, 20.0],
            "TX_FRAUD": [0, 1],
        }
    ).to_csv(csv, index=False)
    sent = [message["transaction_date"] for message in handbook_messages(csv)]
    assert sent == ["2018-04-01T03:15:00", "2018-04-01T02:00:00"]
    trained = load_labelled_csv(csv)["transaction_date"].dt.strftime("%Y-%m-%dT%H:%M:%S")
    assert sorted(trained) == sorted(sent)
    assert count_csv_rows(csv) == 2


def test_a_missing_file_or_column_says_what_the_csv_should_hold(tmp_path: Path) -> None:
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    for path in (tmp_path / "missing.csv", tmp_path / "other.csv"):
        with pytest.raises(ConfigurationError, match="expected a handbook-format CSV"):
            list(handbook_messages(path))
        with pytest.raises(ConfigurationError, match="TRANSACTION_ID, CUSTOMER_ID"):
            count_csv_rows(path)
