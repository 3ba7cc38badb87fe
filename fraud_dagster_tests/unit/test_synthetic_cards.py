"""The latency benchmark's option to spread the simulator's customers over many cards."""

from __future__ import annotations

import pandas as pd
import pytest

from fraud_dagster.producer import spread_over_cards, synthetic_transactions


@pytest.fixture(scope="module")
def transactions() -> pd.DataFrame:
    return synthetic_transactions(5_000, seed=3)


def test_each_card_belongs_to_one_customer_and_keeps_everything_else(transactions) -> None:
    spread = spread_over_cards(transactions, cards=50_000, seed=1)
    customers = transactions["account_id"].nunique()
    owner = spread["account_id"].str.rsplit("-", n=1).str[0]
    assert (owner == transactions["account_id"]).all()
    assert spread["account_id"].nunique() > 5 * customers  # ~10 transactions each here
    assert spread["account_id"].nunique() <= (50_000 // customers) * customers
    unchanged = [column for column in transactions.columns if column != "account_id"]
    pd.testing.assert_frame_equal(spread[unchanged], transactions[unchanged])


def test_the_same_seed_gives_the_same_cards(transactions) -> None:
    first = spread_over_cards(transactions, cards=20_000, seed=5)["account_id"]
    again = spread_over_cards(transactions, cards=20_000, seed=5)["account_id"]
    other = spread_over_cards(transactions, cards=20_000, seed=6)["account_id"]
    assert first.equals(again)
    assert not first.equals(other)


def test_no_more_cards_than_customers_changes_nothing(transactions) -> None:
    customers = transactions["account_id"].nunique()
    assert spread_over_cards(transactions, cards=customers, seed=1).equals(transactions)
    assert spread_over_cards(transactions, cards=0, seed=1).equals(transactions)
