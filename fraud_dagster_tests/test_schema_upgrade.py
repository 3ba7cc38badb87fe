"""`ensure_schema` on a database an earlier version created: on SQLite and PostgreSQL, it gets the
columns and indexes the schema has now and loses the indexes they supersede, and its rows stay as
they were."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from fraud_dagster.errors import StorageError
from fraud_dagster.storage.database import create_engine, ensure_schema, utcnow
from fraud_dagster.storage.schema import fraud_alerts, scored_transactions, suspicious_transactions

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


def _alert_columns(engine: sa.Engine) -> set[str]:
    return {column["name"] for column in sa.inspect(engine).get_columns("fraud_alerts")}


def _store_alerts(engine: sa.Engine, count: int) -> None:
    """Scored, suspicious and alert rows as the earlier version wrote them."""
    scored = [_row(i) for i in range(count)]
    with engine.begin() as conn:
        conn.execute(sa.insert(scored_transactions), scored)
        conn.execute(
            sa.insert(suspicious_transactions),
            [
                {
                    **{k: row[k] for k in ("transaction_id", "account_id", "merchant")},
                    "transaction_amount": row["transaction_amount"],
                    "transaction_date": row["transaction_date"],
                    "fraud_probability": 0.9,
                    "threshold": 0.5,
                    "model_version": "v",
                    "detected_at": utcnow(),
                }
                for row in scored
            ],
        )
        conn.execute(
            sa.insert(fraud_alerts).values(
                status="failed", attempts=1, last_error="421 try later", created_at=utcnow()
            ),
            [{"transaction_id": row["transaction_id"]} for row in scored],
        )


def test_an_older_database_gets_the_new_nullable_column_and_keeps_its_rows(
    database_url: str,
) -> None:
    engine = create_engine(database_url)
    ensure_schema(engine)
    # The outbox as the version before `last_failed_at` created it, with alerts in it.
    with engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE fraud_alerts DROP COLUMN last_failed_at"))
    _store_alerts(engine, 5)
    assert "last_failed_at" not in _alert_columns(engine)

    ensure_schema(engine)
    ensure_schema(engine)  # once added, left alone
    assert "last_failed_at" in _alert_columns(engine)
    with engine.connect() as conn:
        a = fraud_alerts.c
        rows = conn.execute(sa.select(a.status, a.last_error, a.last_failed_at)).all()
    assert [tuple(row) for row in rows] == [("failed", "421 try later", None)] * 5
    engine.dispose()


def test_a_missing_column_that_stored_rows_cannot_have_is_a_clear_error(database_url: str) -> None:
    engine = create_engine(database_url)
    ensure_schema(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("DROP INDEX ix_alerts_status_next"))
        conn.execute(sa.text("ALTER TABLE fraud_alerts DROP COLUMN status"))

    with pytest.raises(StorageError, match=r"lacks column status.*migrate the database by hand"):
        ensure_schema(engine)
    engine.dispose()
