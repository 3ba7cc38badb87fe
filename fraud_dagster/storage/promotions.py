"""Which model version serves: the record of promotions, newest first."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from fraud_dagster.storage.database import utcnow
from fraud_dagster.storage.schema import model_promotions


def active_model_version(engine: Engine) -> str | None:
    """The most recently promoted model version, or None if none was promoted yet."""
    query = (
        sa.select(model_promotions.c.model_version)
        .order_by(model_promotions.c.promoted_at.desc(), model_promotions.c.id.desc())
        .limit(1)
    )
    with engine.connect() as conn:
        return conn.execute(query).scalar_one_or_none()


def promoted_sha256(engine: Engine, version: str) -> str | None:
    """The SHA-256 recorded when `version` was last promoted, or None if it never was."""
    query = (
        sa.select(model_promotions.c.sha256)
        .where(model_promotions.c.model_version == version)
        .order_by(model_promotions.c.promoted_at.desc(), model_promotions.c.id.desc())
        .limit(1)
    )
    with engine.connect() as conn:
        return conn.execute(query).scalar_one_or_none()


def record_promotion(
    engine: Engine, version: str, sha256: str, reason: str, run_id: str | None = None
) -> None:
    with engine.begin() as conn:
        conn.execute(
            sa.insert(model_promotions).values(
                model_version=version,
                sha256=sha256,
                promoted_at=utcnow(),
                reason=reason,
                run_id=run_id,
            )
        )
