"""Which model version serves: the record of promotions, newest first.

Newest means inserted last (highest id), not latest `promoted_at`: a promotion recorded while
a host's clock ran ahead would otherwise outrank every later one until the clock caught up.
`promoted_at` is for people reading the record.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from fraud_dagster.storage.database import utcnow
from fraud_dagster.storage.schema import model_promotions

NEWEST_PROMOTION = (
    sa.select(model_promotions.c.model_version).order_by(model_promotions.c.id.desc()).limit(1)
)


def active_model_version(engine: Engine) -> str | None:
    """The most recently promoted model version, or None if none was promoted yet."""
    with engine.connect() as conn:
        return conn.execute(NEWEST_PROMOTION).scalar_one_or_none()


def promoted_sha256(engine: Engine, version: str) -> str | None:
    """The SHA-256 recorded when `version` was last promoted, or None if it never was."""
    query = (
        sa.select(model_promotions.c.sha256)
        .where(model_promotions.c.model_version == version)
        .order_by(model_promotions.c.id.desc())
        .limit(1)
    )
    with engine.connect() as conn:
        return conn.execute(query).scalar_one_or_none()


def record_promotion(
    engine: Engine,
    version: str,
    sha256: str,
    reason: str,
    run_id: str | None = None,
    *,
    replacing: str | None,
) -> bool:
    """Record `version` as promoted if `replacing` (the promoted version its validation compared
    with, None for none) is still the newest promotion; False, recording nothing, if another
    run promoted a model meanwhile (it validated against what serves now, this one did not).

    Reload runs are queued one at a time (dagster.yaml); this check covers runs that bypass
    the queue, such as a job executed in process."""
    with engine.begin() as conn:
        if conn.execute(NEWEST_PROMOTION).scalar_one_or_none() != replacing:
            return False
        conn.execute(
            sa.insert(model_promotions).values(
                model_version=version,
                sha256=sha256,
                promoted_at=utcnow(),
                reason=reason,
                run_id=run_id,
            )
        )
    return True
