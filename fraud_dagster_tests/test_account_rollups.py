"""The account rollups on SQLite and PostgreSQL: kept by the batch write exactly once (reruns and
concurrent runs included), and filled once from the rows an earlier version stored."""

from __future__ import annotations

import threading

import pandas as pd
import sqlalchemy as sa

from fraud_dagster.messages import RawBatch, ValidationLimits
from fraud_dagster.storage.database import create_engine, ensure_schema, utcnow
from fraud_dagster.storage.rollups import DAY, rollup_rows_of
from fraud_dagster.storage.schema import account_rollups, schema_upgrades, scored_transactions
from fraud_dagster_tests.unit.stored_batches import ONE_DAY, one_day_batch, run

A_DAY = int(pd.Timestamp(ONE_DAY).timestamp()) // DAY  # the day bucket of every one_day_batch


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


def day_counts(rows: list[tuple]) -> dict[str, int]:
    return {row[0]: row[3] for row in rows if row[1] == DAY}


def test_quiet_days_write_nothing_and_reruns_add_nothing(database_url: str) -> None:
    engine = create_engine(database_url)
    ensure_schema(engine)
    # 150 a day for A0 and A1: quiet, no rollup row. The second batch makes both days busy
    # (started from their stored rows), the third adds to them; A2's day stays quiet.
    run(one_day_batch(0, 0, 300, accounts=2), engine, ValidationLimits())
    assert rollups(engine) == []
    run(one_day_batch(0, 300, 200, accounts=2), engine, ValidationLimits())
    assert day_counts(rollups(engine)) == {"A0": 250, "A1": 250}
    third = one_day_batch(0, 500, 100, accounts=3)
    run(third, engine, ValidationLimits())
    stored = rollups(engine)
    assert day_counts(stored) == {"A0": 250 + 33, "A1": 250 + 33}  # A2: 34
    assert {row[0] for row in stored if row[1] != DAY} == {"A0", "A1"}
    assert sum(row[3] for row in stored if row[0] == "A1" and row[1] == 60) == 283
    assert stored == rollups_of_stored_rows(engine)

    rerun = run(third, engine, ValidationLimits())
    duplicates = run(one_day_batch(1, 0, 10, ids_of=0), engine, ValidationLimits())
    rejected = run(one_day_batch(2, 0, 10), engine, ValidationLimits(max_amount=0.5))
    assert (rerun.inserted, rerun.already_stored) == (0, 100)
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
                run(one_day_batch(partition, first, 50, accounts=2), engine, ValidationLimits())
        except BaseException as exc:  # reported below, with the other thread's result
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(p,)) for p in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors
    stored = rollups_of_stored_rows(engine)
    assert day_counts(stored) == {"A0": 400, "A1": 400}
    assert sum(row[3] for row in stored) == 800 * 3  # both days busy: every level
    assert rollups(engine) == stored
    engine.dispose()


def test_a_day_made_busy_while_another_write_of_it_is_uncommitted(database_url: str) -> None:
    """The write that starts a day's rollups sums its stored rows, so it must wait for a write
    of that day that has inserted rows but not committed them (PostgreSQL: the table lock
    `may_start_rollups` takes; SQLite: one writer at a time). Without the wait the day's
    rollups would miss the other write's 30 rows for good."""
    engine = create_engine(database_url)
    ensure_schema(engine)
    run(one_day_batch(0, 0, 150, accounts=1), engine, ValidationLimits())  # A0's day: 150, quiet
    inserted, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    @sa.event.listens_for(engine, "after_cursor_execute")
    def hold(conn, cursor, statement, parameters, context, executemany) -> None:
        if threading.current_thread().name == "slow" and statement.startswith(
            "INSERT INTO scored_transactions"
        ):
            inserted.set()
            release.wait(60)

    def write(batch: RawBatch) -> None:
        try:
            run(batch, engine, ValidationLimits())
        except BaseException as exc:  # reported below
            errors.append(exc)

    # 150 + 30 stays quiet: "slow" starts nothing and holds its rows uncommitted ...
    slow = threading.Thread(target=write, args=(one_day_batch(1, 0, 30, accounts=1),), name="slow")
    slow.start()
    assert inserted.wait(30)
    # ... while "fast" makes the day busy (150 + 60 committed or its own).
    fast = threading.Thread(target=write, args=(one_day_batch(2, 0, 60, accounts=1),), name="fast")
    fast.start()
    fast.join(2.0)
    fast_waited = fast.is_alive()
    release.set()
    slow.join(60)
    fast.join(60)
    assert not errors
    assert fast_waited
    assert day_counts(rollups(engine)) == {"A0": 240}
    assert rollups(engine) == rollups_of_stored_rows(engine)
    engine.dispose()


def test_a_database_gets_its_rollups_filled_once(database_url: str) -> None:
    engine = create_engine(database_url)
    ensure_schema(engine)
    run(one_day_batch(0, 0, 250, accounts=1), engine, ValidationLimits())
    run(one_day_batch(0, 250, 30, accounts=3), engine, ValidationLimits())
    expected = rollups(engine)
    assert {row[0] for row in expected} == {"A0"}  # busy; A1 and A2 are not
    # As a version before the rollups left it: the stored rows, no rollups, no mark.
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
    # As stop 22's rules left it (a day row for every account-day, under its own mark): filled
    # again once, by today's rules.
    with engine.begin() as conn:
        conn.execute(sa.delete(schema_upgrades))
        conn.execute(
            sa.insert(schema_upgrades),
            [{"name": "account_rollups backfilled", "done_at": utcnow()}],
        )
        conn.execute(
            sa.insert(account_rollups),
            [{"account_id": "A1", "level": DAY, "bucket": A_DAY, "tx_count": 10, "amount_sum": 1}],
        )
    ensure_schema(engine)
    assert rollups(engine) == expected
    engine.dispose()
