"""Sending transactions to the topic: synthetic ones, or a replay of a handbook-format CSV."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from kafka.errors import KafkaError
from tqdm import tqdm

from fraud_dagster import kafka_io
from fraud_dagster.errors import ConfigurationError, KafkaUnavailableError
from fraud_dagster.messages import encode_transaction, naive_utc_dates
from fraud_dagster.simulator import SimulationConfig, simulate_transactions, to_messages

logger = logging.getLogger(__name__)

# Handbook CSV column -> message field; other columns (labels, scenario) are not sent.
HANDBOOK_FIELDS = {
    "TRANSACTION_ID": "transaction_id",
    "CUSTOMER_ID": "account_id",
    "TERMINAL_ID": "merchant",
    "TX_AMOUNT": "transaction_amount",
    "TX_DATETIME": "transaction_date",
}


@dataclass(frozen=True)
class ProduceReport:
    sent: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else float("inf")


def synthetic_transactions(count: int, seed: int = 0, end: datetime | None = None) -> pd.DataFrame:
    """`count` simulated transactions (with labels) whose last one happens at `end` (now)."""
    end = end or datetime.now(UTC).replace(tzinfo=None, microsecond=0)
    days = 30
    while True:
        config = SimulationConfig(n_customers=500, n_terminals=1000, n_days=days, seed=seed)
        frame = simulate_transactions(config)
        if len(frame) >= count or days >= 3650:
            break
        days *= 2
    frame = frame.tail(count).reset_index(drop=True)
    shift = pd.Timestamp(end) - frame["transaction_date"].max()
    frame["transaction_date"] = frame["transaction_date"] + shift
    frame["transaction_id"] = [f"S{seed}-{i:08d}" for i in range(len(frame))]
    return frame


def spread_over_cards(transactions: pd.DataFrame, cards: int, seed: int = 0) -> pd.DataFrame:
    """The same transactions, each simulated customer's spread over its own share of `cards`.

    At 1,000 tx/s the simulator's 500 customers pay twice a second each, so every stored row is
    in every account's windows: a stress case, not a bank. Spreading each customer over
    `cards` / customers card numbers keeps its amounts, merchants and times and divides what one
    card's windows hold. `cards` up to the number of customers changes nothing.
    """
    customers = transactions["account_id"].nunique()
    per_customer = cards // max(customers, 1)
    if per_customer <= 1:
        return transactions
    width = len(str(per_customer - 1))
    card = np.random.default_rng(seed).integers(0, per_customer, len(transactions))
    spread = transactions.copy()
    spread["account_id"] = [
        f"{account}-{number:0{width}d}"
        for account, number in zip(transactions["account_id"], card, strict=True)
    ]
    return spread


def handbook_messages(
    path: Path, limit: int | None = None, chunk_rows: int = 200_000
) -> Iterator[dict]:
    """Messages of a handbook-format CSV (plain or .gz), in file order."""
    remaining = limit
    for rows in _handbook_chunks(path, list(HANDBOOK_FIELDS), chunk_rows):
        if remaining is not None:
            rows = rows.head(remaining)  # noqa: PLW2901
            remaining -= len(rows)
        messages = rows.rename(columns=HANDBOOK_FIELDS)
        # In UTC, as training reads the same file (a local time with its offset dropped would
        # shift the time-of-day features between training and scoring).
        try:
            dates = naive_utc_dates(messages["transaction_date"])
        except (ValueError, TypeError) as exc:
            raise ConfigurationError(f"{path} has an unreadable TX_DATETIME: {exc}") from exc
        messages["transaction_date"] = dates.dt.strftime("%Y-%m-%dT%H:%M:%S")
        yield from messages.to_dict("records")
        if remaining is not None and remaining <= 0:
            return


def count_csv_rows(path: Path) -> int:
    return sum(len(chunk) for chunk in _handbook_chunks(path, ["TRANSACTION_ID"], 500_000))


def _handbook_chunks(path: Path, columns: list[str], chunk_rows: int) -> Iterator[pd.DataFrame]:
    """The CSV's `columns` in chunks; a missing file or column is a ConfigurationError that
    says what the file should hold, not a pandas traceback."""
    try:
        yield from pd.read_csv(path, usecols=columns, chunksize=chunk_rows)
    except (OSError, ValueError) as exc:
        raise ConfigurationError(
            f"cannot read transactions from {path}: {exc}; expected a handbook-format CSV "
            f"(plain or .gz) with the columns {', '.join(HANDBOOK_FIELDS)}"
        ) from exc


def produce(
    options: Mapping[str, Any],
    topic: str,
    messages: Iterable[Mapping[str, Any]],
    total: int | None = None,
    rate_per_second: float | None = None,
    show_progress: bool = True,
) -> ProduceReport:
    """Send `messages` keyed by account_id and wait for every acknowledgement.

    Any message the broker did not acknowledge fails the whole call: nothing is lost silently.
    """
    failures: list[BaseException] = []
    started = time.monotonic()
    sent = 0
    client = kafka_io.producer(options)
    try:
        with tqdm(total=total, unit="tx", disable=not show_progress, mininterval=0.5) as bar:
            for message in messages:
                if rate_per_second:
                    ahead = sent / rate_per_second - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(ahead)
                key = str(message.get("account_id", "")).encode("utf-8")
                future = client.send(topic, key=key, value=encode_transaction(dict(message)))
                future.add_errback(failures.append)
                sent += 1
                if sent % 1000 == 0:
                    bar.update(1000)
            bar.update(sent % 1000)
            client.flush()
    except KafkaError as exc:
        raise KafkaUnavailableError(
            f"producing to {topic} failed after {sent} messages: {exc!r}"
        ) from exc
    finally:
        client.close()
    if failures:
        raise KafkaUnavailableError(
            f"{len(failures)} of {sent} messages were not acknowledged; "
            f"first error: {failures[0]!r}"
        )
    report = ProduceReport(sent=sent, seconds=time.monotonic() - started)
    logger.info(
        "sent %d messages to %s in %.1fs (%.0f/s)", sent, topic, report.seconds, report.rate
    )
    return report


def synthetic_messages(count: int, seed: int = 0) -> list[dict]:
    return to_messages(synthetic_transactions(count, seed))
