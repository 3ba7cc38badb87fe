"""The project's own transaction simulator: customers, merchants (terminals) and fraud.

Modelled on the generator described in the Fraud Detection Handbook (chapter 3): customers at
random places spend around their own mean amount, at terminals within a radius of home, mostly
around midday. Three fraud scenarios are injected:

1. any transaction above `LARGE_AMOUNT` is fraud;
2. every day a few terminals are compromised: all their transactions of the next 28 days are fraud;
3. every day a few customers are compromised: a third of their transactions of the next 14 days
   are fraud, with 5 times the usual amount.

The product trains its default model on this data, so it needs nothing from outside the repo.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import numpy as np
import pandas as pd

LARGE_AMOUNT = 220.0
SIMULATION_COLUMNS = [
    "transaction_id",
    "transaction_date",
    "account_id",
    "merchant",
    "transaction_amount",
    "is_fraud",
    "fraud_scenario",
]


@dataclass(frozen=True)
class SimulationConfig:
    n_customers: int = 2000
    n_terminals: int = 4000
    n_days: int = 90
    start: datetime = datetime(2026, 1, 1)
    radius: float = 5.0
    compromised_terminals_per_day: int = 2
    terminal_compromise_days: int = 28
    compromised_customers_per_day: int = 3
    customer_compromise_days: int = 14
    seed: int = 0
    id_prefix: str = "T"


def _customers(cfg: SimulationConfig, rng: np.random.Generator) -> pd.DataFrame:
    mean_amount = rng.uniform(5, 100, cfg.n_customers)
    return pd.DataFrame(
        {
            "x": rng.uniform(0, 100, cfg.n_customers),
            "y": rng.uniform(0, 100, cfg.n_customers),
            "mean_amount": mean_amount,
            "std_amount": mean_amount / 2,
            "tx_per_day": rng.uniform(0, 4, cfg.n_customers),
        }
    )


def _reachable_terminals(
    customers: pd.DataFrame, terminals: np.ndarray, radius: float
) -> list[np.ndarray]:
    reachable = []
    for x, y in customers[["x", "y"]].to_numpy():
        distance = np.hypot(terminals[:, 0] - x, terminals[:, 1] - y)
        reachable.append(np.flatnonzero(distance < radius))
    return reachable


def simulate_transactions(cfg: SimulationConfig | None = None) -> pd.DataFrame:
    """A labelled transaction history in time order, ids in that order."""
    cfg = cfg or SimulationConfig()
    rng = np.random.default_rng(cfg.seed)
    customers = _customers(cfg, rng)
    terminals = rng.uniform(0, 100, size=(cfg.n_terminals, 2))
    reachable = _reachable_terminals(customers, terminals, cfg.radius)
    has_terminal = np.array([len(r) > 0 for r in reachable])

    counts = rng.poisson(
        customers["tx_per_day"].to_numpy()[:, None], size=(cfg.n_customers, cfg.n_days)
    )
    counts[~has_terminal] = 0
    customer_idx, day_idx = np.nonzero(counts)
    repeats = counts[customer_idx, day_idx]
    customer = np.repeat(customer_idx, repeats)
    day = np.repeat(day_idx, repeats)
    n = len(customer)

    seconds = rng.normal(86_400 / 2, 20_000, n)
    keep = (seconds > 0) & (seconds < 86_400)
    customer, day, seconds = customer[keep], day[keep], seconds[keep].astype(np.int64)
    n = len(customer)
    mean = customers["mean_amount"].to_numpy()[customer]
    std = customers["std_amount"].to_numpy()[customer]
    amount = rng.normal(mean, std)
    amount = np.where(amount < 0, rng.uniform(0, mean * 2), amount).round(2)
    pick = rng.random(n)
    terminal = np.array(
        [reachable[c][int(p * len(reachable[c]))] for c, p in zip(customer, pick, strict=True)],
        dtype=np.int64,
    )

    frame = pd.DataFrame(
        {
            "customer": customer,
            "terminal": terminal,
            "day": day,
            "time": day * 86_400 + seconds,
            "amount": amount,
        }
    ).sort_values(["time", "customer"], kind="stable", ignore_index=True)
    frame["scenario"] = 0

    # Scenario 1: large amounts.
    frame.loc[frame["amount"] > LARGE_AMOUNT, "scenario"] = 1
    # Scenario 2: compromised terminals.
    for d in range(cfg.n_days):
        compromised = rng.choice(cfg.n_terminals, cfg.compromised_terminals_per_day, replace=False)
        hit = (
            frame["terminal"].isin(compromised)
            & (frame["day"] >= d)
            & (frame["day"] < d + cfg.terminal_compromise_days)
            & (frame["scenario"] == 0)
        )
        frame.loc[hit, "scenario"] = 2
    # Scenario 3: compromised customers, a third of their transactions with 5x amounts.
    for d in range(cfg.n_days):
        compromised = rng.choice(cfg.n_customers, cfg.compromised_customers_per_day, replace=False)
        window = (
            frame["customer"].isin(compromised)
            & (frame["day"] >= d)
            & (frame["day"] < d + cfg.customer_compromise_days)
            & (frame["scenario"] == 0)
        )
        candidates = frame.index[window]
        if len(candidates):
            chosen = rng.choice(candidates, len(candidates) // 3, replace=False)
            frame.loc[chosen, "amount"] = (frame.loc[chosen, "amount"] * 5).round(2)
            frame.loc[chosen, "scenario"] = 3

    width = len(str(len(frame)))
    return pd.DataFrame(
        {
            "transaction_id": [f"{cfg.id_prefix}{i:0{width}d}" for i in range(len(frame))],
            "transaction_date": pd.Timestamp(cfg.start) + pd.to_timedelta(frame["time"], unit="s"),
            "account_id": [f"A{c:05d}" for c in frame["customer"]],
            "merchant": [f"M{t:05d}" for t in frame["terminal"]],
            "transaction_amount": frame["amount"].to_numpy(),
            "is_fraud": (frame["scenario"] > 0).astype(np.int8).to_numpy(),
            "fraud_scenario": frame["scenario"].astype(np.int8).to_numpy(),
        },
        columns=SIMULATION_COLUMNS,
    )


def to_messages(transactions: pd.DataFrame) -> list[dict]:
    """Transaction messages (the wire schema) for rows of `simulate_transactions`."""
    dates = pd.to_datetime(transactions["transaction_date"]).dt.strftime("%Y-%m-%dT%H:%M:%SZ")
    return [
        {
            "transaction_id": tid,
            "account_id": account,
            "merchant": merchant,
            "transaction_amount": round(float(amount), 2),
            "transaction_date": date,
        }
        for tid, account, merchant, amount, date in zip(
            transactions["transaction_id"],
            transactions["account_id"],
            transactions["merchant"],
            transactions["transaction_amount"],
            dates,
            strict=True,
        )
    ]
