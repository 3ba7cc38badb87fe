"""The account rollups on SQLite and PostgreSQL: kept by the batch write exactly once (reruns and
concurrent runs included), and filled once from the rows an earlier version stored."""

from __future__ import annotations

import json
import threading

import pandas as pd
import sqlalchemy as sa

from fraud_dagster.messages import RawBatch, ValidationLimits
from fraud_dagster.storage.database import create_engine, ensure_schema
from fraud_dagster.storage.rollups import DAY, rollup_rows_of
from fraud_dagster.storage.schema import account_rollups, schema_upgrades, scored_transactions
from fraud_dagster_tests.unit.stored_batches import run


def raw_batch(
    partition: int, first: int, count: int, *, accounts: int = 5, ids_of: int | None = None
) -> RawBatch:
    """Offsets first.. of topic "t", spread over `accounts` accounts, all on one day (one day
    rollup row per account); transaction ids "p<partition>-<offset>", or those of partition
    `ids_of` (duplicates)."""
    id_prefix = f"p{partition if ids_of is None else ids_of}-"
    values = [
        json.dumps(
            {
                "transaction_id": f"{id_prefix}{offset}",
                "account_id": f"A{offset % accounts}",
                "merchant": "M1",
                "transaction_amount": 1.0 + offset % 7,
                "transaction_date": f"2026-11-01T10:{offset // 60 % 60:02d}:{offset % 60:02d}Z",
            }
        ).encode()
        for offset in range(first, first + count)
    ]
    offsets = list(range(first, first + count))
    return RawBatch(
        "t", partition, first, offsets[-1], offsets, [1_700_000_000_000] * count, values
    )


def rollups(engine: sa.Engine) -> list[tuple]:
    r = account_rollups
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(r.c.account_id, r.c.level, r.c.bucket, r.c.tx_count, r.c.amount_sum).order_by(
                r.c.account_id, r.c.level, r.c.bucket
            )
        ).all()
    return [tuple(row) for row in rows]


def rollups_of_stored_rows(engine: sa.Engine) -> list[tuple]:
    s = scored_transactions
    with engine.connect() as conn:
        stored = pd.DataFrame(
            conn.execute(
                sa.select(s.c.account_id, s.c.transaction_amount, s.c.transaction_date)
            ).all(),
            columns=["account_id", "transaction_amount", "transaction_date"],
        )
    return [
        (r["account_id"], r["level"], r["bucket"], r["tx_count"], r["amount_sum"])
        for r in rollup_rows_of(stored)
    ]


def test_reruns_rejections_and_duplicates_add_nothing(database_url: str) -> None:
    engine = create_engine(database_url)
    ensure_schema(engine)
    # A1 gets busy in the first batch (hours and minutes from its stored rows), in the second it
    # is busy already (this batch's increments); A0's day stays quiet (a day row only).
    first, second = raw_batch(0, 0, 300, accounts=2), raw_batch(0, 300, 200, accounts=2)
    run(first, engine, ValidationLimits())
    run(second, engine, ValidationLimits())
    stored = rollups(engine)
    assert [row[3] for row in stored if row[1] == DAY] == [250, 250]
    assert {row[0] for row in stored if row[1] != DAY} == {"A0", "A1"}
    assert sum(row[3] for row in stored if row[0] == "A1" and row[1] == 60) == 250

    rerun = run(first, engine, ValidationLimits())
    duplicates = run(raw_batch(1, 0, 10, ids_of=0), engine, ValidationLimits())
    rejected = run(raw_batch(2, 0, 10), engine, ValidationLimits(max_amount=0.5))
    assert (rerun.inserted, rerun.already_stored) == (0, 300)
    assert (duplicates.inserted, duplicates.rejected_inserted) == (0, 10)
    assert (rejected.inserted, rejected.rejected_inserted) == (0, 10)

    assert rollups(engine) == stored == rollups_of_stored_rows(engine)
    engine.dispose()


def test_concurrent_batches_of_the_same_accounts_add_up(database_url: str) -> None:
    """Two partitions' runs write the same rollup rows at the same time (PostgreSQL: row locks
    taken in key order, no deadlock; SQLite: one writer at a time)."""
    engine = create_engine(database_url)
    ensure_schema(engine)
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def write(partition: int) -> None:
        try:
            start.wait()
            for first in range(0, 400, 50):  # 2 accounts: their day gets busy meanwhile
                run(raw_batch(partition, first, 50, accounts=2), engine, ValidationLimits())
        except BaseException as exc:  # reported below, with the other thread's result
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(p,)) for p in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors
    stored = rollups_of_stored_rows(engine)
    assert [row[3] for row in stored if row[1] == DAY] == [400, 400]
    assert sum(row[3] for row in stored) == 800 * 3  # both days busy: every level
    assert rollups(engine) == stored
    engine.dispose()


def test_a_database_without_rollups_gets_them_filled_once(database_url: str) -> None:
    engine = create_engine(database_url)
    ensure_schema(engine)
    run(raw_batch(0, 0, 250, accounts=1), engine, ValidationLimits())
    run(raw_batch(0, 250, 30, accounts=3), engine, ValidationLimits())
    expected = rollups(engine)
    assert {row[0] for row in expected if row[1] != DAY} == {"A0"}  # busy; A1 and A2 are not
    # As an earlier version left it: the stored rows, no rollups, no mark.
    with engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE account_rollups"))
        conn.execute(sa.text("DROP TABLE schema_upgrades"))

    ensure_schema(engine)
    assert rollups(engine) == expected
    # Done once: a later start does not sum the rows again (a changed rollup row stays).
    with engine.begin() as conn:
        conn.execute(sa.update(account_rollups).values(tx_count=account_rollups.c.tx_count + 1))
    ensure_schema(engine)
    assert [row[3] for row in rollups(engine)] == [row[3] + 1 for row in expected]
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(schema_upgrades)).scalar() == 1
    engine.dispose()
