"""`ensure_schema` on a database an earlier version created: on SQLite and PostgreSQL, it gets the
indexes the schema has now and loses the ones they supersede, and its rows stay as they were."""

from __future__ import annotations

import sqlalchemy as sa

from fraud_dagster.storage.database import create_engine, ensure_schema, utcnow
from fraud_dagster.storage.schema import scored_transactions

OLD_INDEXES = {"ix_scored_account_date", "ix_scored_merchant_date"}
NEW_INDEXES = {"ix_scored_account_date_amount", "ix_scored_merchant_date"}


def _indexes(engine: sa.Engine) -> set[str]:
    """Named indexes, without those PostgreSQL reports for unique constraints."""
    return {
        index["name"]
        for index in sa.inspect(engine).get_indexes("scored_transactions")
        if not index.get("duplicates_constraint")
    }


def _row(i: int) -> dict:
    return {
        "transaction_id": f"t{i}",
        "account_id": f"a{i % 3}",
        "merchant": "m",
        "transaction_amount": 10.0 + i,
        "transaction_date": utcnow(),
        "source_topic": "t",
        "source_partition": 0,
        "source_offset": i,
        "fraud_probability": 0.0,
        "is_suspicious": False,
        "model_version": "v",
        "scored_at": utcnow(),
    }


def test_an_older_database_gets_the_current_indexes(database_url: str) -> None:
    engine = create_engine(database_url)
    ensure_schema(engine)
    # The schema as the version before the covering index created it, with rows in it.
    with engine.begin() as conn:
        conn.execute(sa.text("DROP INDEX ix_scored_account_date_amount"))
        conn.execute(
            sa.text(
                "CREATE INDEX ix_scored_account_date ON scored_transactions "
                "(account_id, transaction_date)"
            )
        )
        conn.execute(sa.insert(scored_transactions), [_row(i) for i in range(20)])
    assert _indexes(engine) == OLD_INDEXES

    ensure_schema(engine)
    assert _indexes(engine) == NEW_INDEXES
    ensure_schema(engine)
    assert _indexes(engine) == NEW_INDEXES
    with engine.connect() as conn:
        amounts = conn.execute(
            sa.select(sa.func.count(), sa.func.sum(scored_transactions.c.transaction_amount))
        ).one()
    assert tuple(amounts) == (20, sum(10.0 + i for i in range(20)))
    engine.dispose()
