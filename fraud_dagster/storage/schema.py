"""The application database: every table, as SQLAlchemy Core, in one place.

The same definitions serve SQLite (the embedded default) and PostgreSQL. Times are stored as
naive UTC `DateTime` values. Each message read from Kafka ends up in exactly one of
`scored_transactions` or `rejected_transactions`; both are unique on their Kafka coordinates, so a
rerun of a batch cannot write a row twice. Offsets deleted by retention before they were read
are recorded in `lost_ranges`.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

TRANSACTION_ID = String(128)

scored_transactions = Table(
    "scored_transactions",
    metadata,
    Column("transaction_id", TRANSACTION_ID, primary_key=True),
    Column("account_id", String(128), nullable=False),
    Column("merchant", String(256), nullable=False),
    Column("transaction_amount", Float, nullable=False),
    Column("transaction_date", DateTime, nullable=False),
    Column("extra_fields", Text, nullable=True, comment="JSON object of fields beyond the schema"),
    Column("source_topic", String(249), nullable=False),
    Column("source_partition", Integer, nullable=False),
    Column("source_offset", BigInteger, nullable=False),
    Column("kafka_timestamp", DateTime, nullable=True, comment="broker/producer timestamp"),
    Column("fraud_probability", Float, nullable=False),
    Column("is_suspicious", Boolean, nullable=False),
    Column("model_version", String(64), nullable=False),
    Column("scored_at", DateTime, nullable=False),
    Column("run_id", String(64), nullable=True),
    UniqueConstraint("source_topic", "source_partition", "source_offset", name="uq_scored_source"),
    # With the amount, the accounts' window sums of the features' history are read from the
    # index alone (storage.history), not row by row from the table.
    Index("ix_scored_account_date_amount", "account_id", "transaction_date", "transaction_amount"),
    Index("ix_scored_merchant_date", "merchant", "transaction_date"),
)

# Per account, level (bucket size in seconds: a day, an hour, a minute) and bucket (epoch
# seconds // level): how many transactions `scored_transactions` holds there and their amounts'
# sum; hours and minutes only for an account's busy days. Kept by the batch write
# (storage.rollups); the features' band sums of busy accounts read them.
account_rollups = Table(
    "account_rollups",
    metadata,
    Column("account_id", String(128), primary_key=True),
    Column("level", Integer, primary_key=True, autoincrement=False),
    Column("bucket", BigInteger, primary_key=True, autoincrement=False),
    Column("tx_count", BigInteger, nullable=False),
    Column("amount_sum", Float, nullable=False),
    # SQLite: the table is its primary key's B-tree (one write per upsert, covering reads).
    sqlite_with_rowid=False,
)

# One-off data upgrades done on this database (e.g. the rollups' first fill), by name.
schema_upgrades = Table(
    "schema_upgrades",
    metadata,
    Column("name", String(128), primary_key=True),
    Column("done_at", DateTime, nullable=False),
)

# Indexes an earlier version created that a newer one replaces: `ensure_schema` drops them.
SUPERSEDED_INDEXES = {"scored_transactions": ("ix_scored_account_date",)}


def _one_row_per_suspicious_transaction() -> Column:
    """The key of a table that adds to `suspicious_transactions`: its transaction id."""
    return Column(
        "transaction_id",
        TRANSACTION_ID,
        ForeignKey("suspicious_transactions.transaction_id"),
        primary_key=True,
    )


suspicious_transactions = Table(
    "suspicious_transactions",
    metadata,
    Column(
        "transaction_id",
        TRANSACTION_ID,
        ForeignKey("scored_transactions.transaction_id"),
        primary_key=True,
    ),
    Column("account_id", String(128), nullable=False),
    Column("merchant", String(256), nullable=False),
    Column("transaction_amount", Float, nullable=False),
    Column("transaction_date", DateTime, nullable=False),
    Column("fraud_probability", Float, nullable=False),
    Column("threshold", Float, nullable=False),
    Column("model_version", String(64), nullable=False),
    Column("detected_at", DateTime, nullable=False),
    Column("run_id", String(64), nullable=True),
    Index("ix_suspicious_detected_at", "detected_at"),
)

# What the model saw for a suspicious transaction: its input features (JSON, so that a model
# with other features needs no new columns) and whether the partition's earlier offsets were all
# stored when they were computed. Written with the suspicious row; the alert email shows them.
# A table of its own, not columns of suspicious_transactions: when it came, `ensure_schema`
# created missing tables on an existing database but added no columns.
suspicious_features = Table(
    "suspicious_features",
    metadata,
    _one_row_per_suspicious_transaction(),
    Column("features", Text, nullable=False, comment="JSON object: feature name -> value"),
    Column(
        "history_complete",
        Boolean,
        nullable=True,
        comment="earlier offsets all stored when the features were computed (null: unknown)",
    ),
)

# The alert outbox: written in the same transaction as the suspicious row, sent afterwards.
fraud_alerts = Table(
    "fraud_alerts",
    metadata,
    _one_row_per_suspicious_transaction(),
    Column("status", String(16), nullable=False, comment="pending | sending | sent | failed"),
    Column("attempts", Integer, nullable=False, default=0),
    Column("last_error", Text, nullable=True),
    Column("created_at", DateTime, nullable=False),
    Column("next_attempt_at", DateTime, nullable=True),
    Column("last_failed_at", DateTime, nullable=True, comment="when the last attempt failed"),
    Column("claimed_by", String(64), nullable=True, comment="token of the sender holding it"),
    Column("claimed_at", DateTime, nullable=True),
    Column("sent_at", DateTime, nullable=True),
    Column("message_id", String(255), nullable=True),
    Index("ix_alerts_status_next", "status", "next_attempt_at"),
)

rejected_transactions = Table(
    "rejected_transactions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("source_topic", String(249), nullable=False),
    Column("source_partition", Integer, nullable=False),
    Column("source_offset", BigInteger, nullable=False),
    Column("raw_value", LargeBinary, nullable=True),
    Column("reason", Text, nullable=False),
    Column("transaction_id", TRANSACTION_ID, nullable=True),
    Column("rejected_at", DateTime, nullable=False),
    Column("run_id", String(64), nullable=True),
    UniqueConstraint(
        "source_topic", "source_partition", "source_offset", name="uq_rejected_source"
    ),
)

# Offset ranges whose every message is stored (scored or rejected) or was lost (`lost_ranges`),
# written with the batch. The consumer group is committed only to the end of a gap-free run of
# them, so a batch that failed keeps showing as lag until it is rerun.
stored_ranges = Table(
    "stored_ranges",
    metadata,
    Column("source_topic", String(249), primary_key=True),
    Column("source_partition", Integer, primary_key=True),
    Column("first_offset", BigInteger, primary_key=True),
    Column("last_offset", BigInteger, nullable=False),
    Column("run_id", String(64), nullable=True),
    Column("stored_at", DateTime, nullable=False),
)

# Offsets Kafka's retention deleted before any batch read them (the pipeline was stopped, or a
# failed batch was rerun, after the topic's retention time): never read, so neither scored nor
# rejected. Written with the batch whose range held them, so the partition goes on past them and
# the loss stays on record.
lost_ranges = Table(
    "lost_ranges",
    metadata,
    Column("source_topic", String(249), primary_key=True),
    Column("source_partition", Integer, primary_key=True),
    Column("first_offset", BigInteger, primary_key=True),
    Column("last_offset", BigInteger, nullable=False),
    Column("reason", Text, nullable=False),
    Column("run_id", String(64), nullable=True),
    Column("recorded_at", DateTime, nullable=False),
)

# Confirmed outcomes recorded by analysts (or loaded by a replay): the source of merchant risk.
fraud_labels = Table(
    "fraud_labels",
    metadata,
    Column("transaction_id", TRANSACTION_ID, primary_key=True),
    Column("is_fraud", Boolean, nullable=False),
    Column("labeled_by", String(128), nullable=False),
    Column("labeled_at", DateTime, nullable=False),
    Column("source", String(32), nullable=False, comment="analyst | replay"),
)

# Which model version scores: the newest row wins; the history is the audit trail.
model_promotions = Table(
    "model_promotions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("model_version", String(64), nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("promoted_at", DateTime, nullable=False),
    Column("reason", Text, nullable=False),
    Column("run_id", String(64), nullable=True),
)
