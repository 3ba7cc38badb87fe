"""Claim tokens: each send of a run gets its own, and the run is read back from it."""

from __future__ import annotations

from fraud_dagster.alert_claims import claim_token, claiming_run_id

RUN_ID = "0f9c2a52-4d1e-4a7b-9a51-3c1f7e2b8d10"


def test_each_send_of_a_run_has_its_own_token_naming_the_run() -> None:
    first, second = claim_token(RUN_ID), claim_token(RUN_ID)
    assert first != second
    assert claiming_run_id(first) == claiming_run_id(second) == RUN_ID


def test_tokens_of_senders_that_are_not_runs_name_no_run() -> None:
    assert claiming_run_id("bench") is None
    assert claiming_run_id(":a1b2c3d4") is None
