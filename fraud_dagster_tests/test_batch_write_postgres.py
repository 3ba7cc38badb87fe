"""The batch write on PostgreSQL sends its rows in pages, not a statement per row (psycopg2's
executemany does one round trip per row unless the engine asks for `execute_batch`)."""

from __future__ import annotations

from typing import Any

import psycopg2.extensions
import pytest
import sqlalchemy as sa

from fraud_dagster.messages import ValidationLimits
from fraud_dagster.storage.database import create_engine, ensure_schema
from fraud_dagster.storage.schema import account_rollups
from fraud_dagster_tests.unit.stored_batches import one_day_batch, outcomes, run


class CountingCursor(psycopg2.extensions.cursor):
    """Counts what reaches the server: one round trip per `execute`, one per row of an
    `executemany` (psycopg2 loops over the rows in C)."""

    round_trips = 0

    def execute(self, query: Any, vars: Any = None) -> Any:
        CountingCursor.round_trips += 1
        return super().execute(query, vars)

    def executemany(self, query: Any, vars_list: Any) -> Any:
        rows = list(vars_list)
        CountingCursor.round_trips += len(rows)
        return super().executemany(query, rows)


@pytest.mark.backends("postgresql")
def test_a_batch_write_takes_a_round_trip_per_page_not_per_row(database_url: str) -> None:
    engine = create_engine(database_url)
    ensure_schema(engine)

    @sa.event.listens_for(engine, "connect")
    def _count(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.cursor_factory = CountingCursor

    engine.dispose()  # connections opened from here on count
    rows = 2_000
    batch = one_day_batch(0, 0, rows, accounts=5)  # 400 a day each: their rollups start
    before = CountingCursor.round_trips
    result = run(batch, engine, ValidationLimits())
    round_trips = CountingCursor.round_trips - before

    # Every row stored, suspicious and alerted (the test model flags everything), and the
    # accounts' rollups started: several executemany writes of 2,000 rows each.
    assert result.inserted == rows and result.suspicious_inserted == rows
    scored, rejected, alerted = outcomes(engine)
    assert len(scored) == len(alerted) == rows and rejected == []
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(account_rollups)).scalar() > 0
    # Row by row it would be over 8,000; in pages of 100 it is ~110 with the reads.
    assert round_trips < rows / 10, round_trips
