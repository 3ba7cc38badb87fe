"""The Dagster instance file (`$DAGSTER_HOME/dagster.yaml`) on SQLite or PostgreSQL storage.

`dagster.yaml` holds what every instance of the project needs (run coordinator with the
per-partition limit, run retries, sensor threads); `dagster.postgres.yaml` holds only the
storage section for PostgreSQL, with credentials read from `DAGSTER_PG_*` variables when Dagster
loads the instance. Appending one to the other keeps a single copy of the shared settings.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.engine import make_url

from fraud_dagster.errors import ConfigurationError
from fraud_dagster.settings import PROJECT_ROOT

INSTANCE_FILE = PROJECT_ROOT / "dagster.yaml"
POSTGRES_STORAGE_FILE = PROJECT_ROOT / "dagster.postgres.yaml"

# The variables dagster.postgres.yaml reads (the names Dagster's Helm chart uses for the password).
DAGSTER_PG_ENV_VARS = (
    "DAGSTER_PG_HOST",
    "DAGSTER_PG_PORT",
    "DAGSTER_PG_USERNAME",
    "DAGSTER_PG_PASSWORD",
    "DAGSTER_PG_DB",
)


def instance_yaml(postgres: bool = False) -> str:
    """The instance file's text: dagster.yaml, plus the PostgreSQL storage section if asked."""
    text = INSTANCE_FILE.read_text()
    if postgres:
        text = text.rstrip("\n") + "\n\n" + POSTGRES_STORAGE_FILE.read_text()
    return text


def write_dagster_home(home: Path, postgres: bool = False) -> Path:
    """Write `home/dagster.yaml` anew (so edits of the repo's files take effect) and return home."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text(instance_yaml(postgres))
    return home


def dagster_pg_env(url: str) -> dict[str, str]:
    """`DAGSTER_PG_*` values for a PostgreSQL SQLAlchemy URL (they hold its password: secrets)."""
    parsed = make_url(url)
    if not parsed.drivername.startswith("postgresql"):
        raise ConfigurationError(
            f"the Dagster instance needs a PostgreSQL URL, got {parsed.drivername!r}"
        )
    return {
        "DAGSTER_PG_HOST": parsed.host or "127.0.0.1",
        "DAGSTER_PG_PORT": str(parsed.port or 5432),
        "DAGSTER_PG_USERNAME": parsed.username or "",
        "DAGSTER_PG_PASSWORD": parsed.password or "",
        "DAGSTER_PG_DB": parsed.database or "",
    }
