"""The application database: engines, schema creation and the few helpers every query uses.

All SQL goes through SQLAlchemy Core with bound parameters; the only dialect-specific pieces are
`insert_ignoring_conflicts` and `insert_adding_on_conflict`, which pick SQLite's or PostgreSQL's
`ON CONFLICT` clause. The tables are in `storage.schema`; the reads and writes, one function per
question or write, in `storage.history` (what features and duplicate checks read),
`storage.rollups` (the accounts' per-bucket sums), `storage.batches` (the write of a scored
batch), `storage.outbox` (alert delivery), `storage.labels` and `storage.promotions`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError

from fraud_dagster.errors import ConfigurationError, StorageError
from fraud_dagster.storage.schema import SUPERSEDED_INDEXES, metadata

logger = logging.getLogger(__name__)

# Bound parameters per IN list; stays under SQLite's 32,766-variable limit with room to spare.
IN_CHUNK = 5000
_EPOCH = datetime(1970, 1, 1)


def utcnow() -> datetime:
    """Naive UTC now: the convention of every DateTime column."""
    return datetime.now(UTC).replace(tzinfo=None)


def datetime_at(second: int) -> datetime:
    """The naive UTC datetime of an epoch second (the DateTime columns' convention)."""
    return _EPOCH + timedelta(seconds=second)


def within_seconds(
    column: sa.ColumnElement[Any], interval: tuple[int, int]
) -> sa.ColumnElement[bool]:
    """`column` (a DateTime) falls in the closed interval of whole epoch seconds [first, last]:
    a plain range, which the (key, date) indexes can seek by."""
    first, last = interval
    return sa.and_(column >= datetime_at(first), column < datetime_at(last + 1))


# Query keys libpq (psycopg2) reads a secret from: `?password=` works as well as the URL's own
# password field, which is the only one SQLAlchemy masks.
_SECRET_QUERY_KEYS = frozenset({"password", "sslpassword"})
_MASK = "***"


def url_for_display(url: sa.URL) -> str:
    """`url` as logs, errors and the CLI may show it: the password masked, wherever it is."""
    hidden = {key: _MASK for key in url.query if key.lower() in _SECRET_QUERY_KEYS}
    shown = url.update_query_dict(hidden).render_as_string(hide_password=True)
    return shown.replace(quote(_MASK, safe=""), "***")  # the query's values come out quoted


def create_engine(url: str) -> Engine:
    """An engine for `url`, with the settings each backend needs for concurrent batch runs; a
    URL that cannot work is a ConfigurationError that does not repeat it (it holds a password)."""
    parse_database_url(url)
    try:
        return _engine(url)
    except (ArgumentError, NoSuchModuleError, ImportError) as exc:
        raise _unusable(str(exc)) from None


def parse_database_url(url: str) -> sa.URL:
    """`url` parsed, or a ConfigurationError that shows none of it. A user name or password
    with a raw `@`, `/` or `?` is split in the wrong place and the rest of it read as the host,
    port or database name, which messages show unmasked: such a URL is refused, not used."""
    try:
        parsed = sa.engine.make_url(url)
    except ValueError:  # the port's text, which may be a piece of the password
        raise _unusable("its port is not a number") from None
    except ArgumentError as exc:
        raise _unusable(str(exc)) from None
    if parsed.get_backend_name() != "sqlite" and (
        url.count("@") > 1 or "@" in f"{parsed.host or ''}{parsed.database or ''}"
    ):
        raise _unusable(
            "its user name or password holds a character that must be percent-encoded "
            "(`@` as %40, `/` as %2F, `?` as %3F, `:` in the user name as %3A)"
        )
    return parsed


def _unusable(reason: str) -> ConfigurationError:
    return ConfigurationError(
        f"the database URL (FRAUD_DATABASE_URL) cannot be used: {reason}; write it as "
        "postgresql+psycopg2://USER:PASSWORD@HOST:5432/DATABASE or sqlite:///PATH"
    )


def _engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        database = sa.engine.make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        # hide_parameters: driver errors must not echo transaction data (account ids) into
        # logs, run failures or operator emails.
        engine = sa.create_engine(url, connect_args={"timeout": 60}, hide_parameters=True)

        @sa.event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return sa.create_engine(url, pool_pre_ping=True, hide_parameters=True, **_driver_options(url))


def _driver_options(url: str) -> dict[str, Any]:
    """psycopg2 runs an executemany one statement and one round trip per row. SQLAlchemy folds
    plain INSERTs into multi-row ones itself, but not `ON CONFLICT` ones (every batch write:
    5,000 rows took ~1 s) nor UPDATEs; psycopg2's `execute_batch` sends those in pages of 100
    statements a round trip (`values_plus_batch`). Other drivers keep their defaults."""
    if sa.engine.make_url(url).get_driver_name() == "psycopg2":
        return {"executemany_mode": "values_plus_batch"}
    return {}


def ensure_schema(engine: Engine) -> None:
    """Create missing tables, columns and indexes, drop superseded indexes, fill what a new table
    derives from stored rows (the account rollups, once); no existing column is changed."""
    # Imported here: storage.rollups builds on this module's helpers.
    from fraud_dagster.storage.rollups import backfill_account_rollups

    try:
        metadata.create_all(engine)
        _add_new_columns(engine)
        _update_indexes(engine)
        backfill_account_rollups(engine)
    except SQLAlchemyError as exc:
        raise StorageError(
            f"cannot create the schema on {url_for_display(engine.url)} (is the database running "
            f"and reachable?); batches fail until it is, rerun them afterwards: {exc}"
        ) from exc


def _add_new_columns(engine: Engine) -> None:
    """Add the columns the schema gained since a database was created (`create_all` only builds
    whole tables). One catalog query on PostgreSQL; a new column must be nullable, so that rows
    already stored stay valid, and a column added meanwhile by another process counts as added."""
    existing = sa.inspect(engine).get_multi_columns(filter_names=list(metadata.tables))
    ddl = engine.dialect.ddl_compiler(engine.dialect, None)
    for table in metadata.sorted_tables:
        present = {column["name"] for column in existing.get((None, table.name), [])}
        for column in table.columns:
            if column.name in present:
                continue
            if not column.nullable:
                raise StorageError(
                    f"table {table.name} lacks column {column.name}, which cannot be added to "
                    "stored rows (NOT NULL): migrate the database by hand"
                )
            logger.info("adding column %s to %s (once)", column.name, table.name)
            add = f"ALTER TABLE {ddl.preparer.format_table(table)} ADD COLUMN " + (
                ddl.get_column_specification(column)
            )
            try:
                with engine.begin() as conn:
                    conn.execute(sa.text(add))
                    if column.comment and engine.dialect.supports_comments:
                        conn.execute(sa.schema.SetColumnComment(column))
            except SQLAlchemyError:
                if column.name not in _column_names(engine, table.name):
                    raise


def _column_names(engine: Engine, table_name: str) -> set[str]:
    """The table's columns as the catalog has them now (after another process may have added)."""
    return {column["name"] for column in sa.inspect(engine).get_columns(table_name)}


def _update_indexes(engine: Engine) -> None:
    """Bring an existing database's indexes to the schema's (`create_all` only indexes the tables
    it creates). Reads the catalog only, unless an index is missing or superseded; an index
    created meanwhile by another process counts as created."""
    inspector = sa.inspect(engine)
    for table in metadata.sorted_tables:
        superseded = SUPERSEDED_INDEXES.get(table.name, ())
        if not table.indexes and not superseded:
            continue
        existing = {index["name"] for index in inspector.get_indexes(table.name)}
        for index in table.indexes:
            if index.name not in existing:
                logger.info("creating index %s on %s (once)", index.name, table.name)
                with engine.begin() as conn:
                    conn.execute(sa.schema.CreateIndex(index, if_not_exists=True))
        for name in superseded:
            if name in existing:
                logger.info("dropping index %s, superseded", name)
                with engine.begin() as conn:
                    conn.execute(sa.schema.DropIndex(sa.Index(name), if_exists=True))


def _dialect_insert(table: sa.Table, dialect_name: str) -> postgresql.Insert | sqlite.Insert:
    if dialect_name == "postgresql":
        return postgresql.insert(table)
    if dialect_name == "sqlite":
        return sqlite.insert(table)
    raise StorageError(f"unsupported database dialect {dialect_name!r}: use SQLite or PostgreSQL")


def insert_ignoring_conflicts(table: sa.Table, dialect_name: str) -> sa.Insert:
    """`INSERT ... ON CONFLICT DO NOTHING` for SQLite and PostgreSQL alike."""
    return _dialect_insert(table, dialect_name).on_conflict_do_nothing()


def insert_adding_on_conflict(table: sa.Table, dialect_name: str, added: list[str]) -> sa.Insert:
    """`INSERT ... ON CONFLICT (primary key) DO UPDATE` adding the new row's `added` columns to
    the stored row's, for SQLite and PostgreSQL alike (one atomic statement: concurrent writers
    cannot lose each other's increments)."""
    statement = _dialect_insert(table, dialect_name)
    return statement.on_conflict_do_update(
        index_elements=[column.name for column in table.primary_key.columns],
        set_={name: table.c[name] + statement.excluded[name] for name in added},
    )


def insert_widening_on_conflict(table: sa.Table, dialect_name: str, column: str) -> sa.Insert:
    """`INSERT ... ON CONFLICT (primary key) DO UPDATE` keeping the larger of the stored and
    the new row's `column`, for SQLite and PostgreSQL alike; nothing else of the stored row
    changes."""
    statement = _dialect_insert(table, dialect_name)
    stored, new = table.c[column], statement.excluded[column]
    return statement.on_conflict_do_update(
        index_elements=[c.name for c in table.primary_key.columns],
        set_={column: sa.case((new > stored, new), else_=stored)},
    )


def in_chunks(values: Sequence[Any], size: int = IN_CHUNK) -> Iterator[Sequence[Any]]:
    """`values` in slices short enough for one IN list."""
    for start in range(0, len(values), size):
        yield values[start : start + size]


def frame_from_rows(rows: Sequence[Sequence[Any]], columns: list[str]) -> pd.DataFrame:
    """A DataFrame from result rows, built column-wise (much faster than from row objects)."""
    if not rows:
        return pd.DataFrame({name: pd.Series(dtype=object) for name in columns})
    columns_of_rows = zip(*rows, strict=True)
    return pd.DataFrame(
        {name: list(values) for name, values in zip(columns, columns_of_rows, strict=True)}
    )
