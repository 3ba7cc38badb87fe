"""Confirmed outcomes of transactions: analysts' verdicts and the handbook replay's labels.

Merchant risk (`features.py`) counts the confirmed frauds among a merchant's past transactions.
Analysts record one verdict at a time (`fraud-dagster label`), with who and when. A replay of the
handbook data set loads the data set's own labels (TX_FRAUD) the way they would have arrived in a
bank: a label becomes known `DELAY_DAYS` after its transaction, so a load "as of" a moment holds
only the transactions up to that moment minus the delay, and their `labeled_at` is the simulated
time the label became known (transaction time + delay).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pandas as pd
from sqlalchemy.engine import Engine

from fraud_dagster.errors import LabelError
from fraud_dagster.features import DELAY_DAYS
from fraud_dagster.messages import naive_utc_dates
from fraud_dagster.storage.history import stored_sources
from fraud_dagster.storage.labels import latest_transaction_date, load_labels, record_labels
from fraud_dagster.storage.schema import fraud_labels

logger = logging.getLogger(__name__)

REPLAY_LABELER = "handbook-replay"
HANDBOOK_LABEL_COLUMNS = ["TRANSACTION_ID", "TX_DATETIME", "TX_FRAUD"]
LABELED_BY_LENGTH: int = fraud_labels.c.labeled_by.type.length  # type: ignore[attr-defined]


def record_analyst_label(
    engine: Engine, transaction_id: str, is_fraud: bool, labeled_by: str
) -> None:
    """Record (or correct) an analyst's verdict on a transaction the system has scored."""
    by = labeled_by.strip()
    if not by or len(by) > LABELED_BY_LENGTH or not by.isprintable():
        # PostgreSQL would refuse a longer one with its DataError, SQLite would store it whole.
        raise LabelError(
            f"who confirmed it (--by) must be 1 to {LABELED_BY_LENGTH} printable characters, "
            f"got {labeled_by[:40]!r}"
        )
    with engine.connect() as conn:
        if stored_sources(conn, [transaction_id]).empty:
            raise LabelError(
                f"no scored transaction has the id {transaction_id!r}; check the id in "
                "scored_transactions (or the alert email) and label it again"
            )
    record_labels(
        engine,
        [
            {
                "transaction_id": transaction_id,
                "is_fraud": is_fraud,
                "labeled_by": by,
                "source": "analyst",
            }
        ],
    )


@dataclass(frozen=True)
class ReplayLabelReport:
    """What one replay load did."""

    as_of: datetime
    known_until: datetime
    loaded: int
    frauds: int
    already_labelled: int


def read_handbook_labels(path: Path) -> pd.DataFrame:
    """transaction_id (text, as in the stream), transaction_date (naive UTC, as scoring reads
    it) and is_fraud of a handbook CSV, one row per transaction. A row without an id or a 0/1
    label, an unreadable date, or an id labelled both ways is a LabelError naming it (nothing
    is loaded); an id repeated with the same label counts once."""
    try:
        frame = pd.read_csv(path, usecols=HANDBOOK_LABEL_COLUMNS, dtype={"TRANSACTION_ID": str})
    except (OSError, ValueError) as exc:
        raise LabelError(
            f"cannot read labels from {path}: {exc}; expected a handbook-format CSV with the "
            f"columns {', '.join(HANDBOOK_LABEL_COLUMNS)}"
        ) from exc
    ids = frame["TRANSACTION_ID"].str.strip()
    fraud = pd.to_numeric(frame["TX_FRAUD"], errors="coerce")
    for problem, bad in (
        ("no TRANSACTION_ID", ids.isna() | (ids == "")),
        ("a TX_FRAUD other than 0 or 1", ~fraud.isin([0, 1])),
    ):
        if bad.any():
            raise LabelError(f"{path}: {problem} at {_rows(bad)}; fix them and load again")
    try:
        dates = naive_utc_dates(frame["TX_DATETIME"])
    except (ValueError, TypeError) as exc:
        raise LabelError(f"{path} has an unreadable TX_DATETIME: {exc}") from exc
    labels = pd.DataFrame(
        {"transaction_id": ids, "transaction_date": dates, "is_fraud": fraud.astype(bool)}
    ).drop_duplicates()
    conflicting = labels["transaction_id"].duplicated(keep=False)
    if conflicting.any():
        named = sorted(set(labels.loc[conflicting, "transaction_id"]))
        raise LabelError(
            f"{path} gives {len(named)} transaction id(s) two labels or dates, e.g. "
            f"{', '.join(named[:5])}; keep one row per transaction and load again"
        )
    return labels.reset_index(drop=True)


def _rows(bad: pd.Series) -> str:
    """The file's line numbers of the `bad` rows (header is line 1), the first few of them."""
    lines = [str(pos + 2) for pos in bad[bad].index[:5]]
    more = f" and {int(bad.sum()) - len(lines)} more" if bad.sum() > len(lines) else ""
    return f"line(s) {', '.join(lines)}{more}"


def load_replay_labels(
    engine: Engine,
    path: Path,
    as_of: datetime | None = None,
    delay_days: int = DELAY_DAYS,
) -> ReplayLabelReport:
    """Record the labels of `path` known at `as_of`: transactions up to `as_of - delay_days`.

    `as_of` defaults to the time of the latest stored transaction (the replay's "now"). Labels
    already recorded (by an analyst or an earlier load) are left as they are, so loading again
    later only adds what became known since.
    """
    if as_of is None:
        as_of = latest_transaction_date(engine)
        if as_of is None:
            raise LabelError(
                "no transaction is stored yet, so the replay has no 'now'; stream some first "
                "or pass --as-of"
            )
    known_until = pd.Timestamp(as_of) - pd.Timedelta(days=delay_days)
    labels = read_handbook_labels(path)
    labels = labels.loc[labels["transaction_date"] <= known_until]
    with engine.connect() as conn:
        existing = load_labels(conn, labels["transaction_id"].tolist())
    fresh = labels.loc[~labels["transaction_id"].isin(existing)]
    known_at = fresh["transaction_date"] + pd.Timedelta(days=delay_days)
    rows = [
        {
            "transaction_id": tid,
            "is_fraud": bool(fraud),
            "labeled_by": REPLAY_LABELER,
            "labeled_at": when.to_pydatetime(),
            "source": "replay",
        }
        for tid, fraud, when in zip(
            fresh["transaction_id"], fresh["is_fraud"], known_at, strict=True
        )
    ]
    if rows:
        record_labels(engine, rows)
    report = ReplayLabelReport(
        as_of=pd.Timestamp(as_of).to_pydatetime(),
        known_until=known_until.to_pydatetime(),
        loaded=len(rows),
        frauds=int(fresh["is_fraud"].sum()),
        already_labelled=len(existing),
    )
    logger.info(
        "loaded %d replay labels (%d frauds) known as of %s", report.loaded, report.frauds, as_of
    )
    return report
