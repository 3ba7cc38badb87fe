"""Fixtures: the real services the tests talk to, started here and stopped afterwards.

One Kafka broker per test session (KRaft, free ports, temporary data dir), a fresh topic per
test, an aiosmtpd server per test writing to its own mail dir, and an application database per
test: every test that uses `database_url` runs twice, on SQLite and on a fresh database of the
session's PostgreSQL server (ids `[sqlite]`, `[postgresql]`), unless it says otherwise with
`@pytest.mark.backends(...)` (`backends()`: not parametrized, the test brings its own database).
`@pytest.mark.dagster_storage("postgresql")` puts the test's Dagster instance storage on that
server too (dagster.postgres.yaml, credentials in DAGSTER_PG_*).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import pytest

from fraud_dagster.errors import LocalServiceError
from fraud_dagster.instance_config import dagster_pg_env, write_dagster_home
from fraud_dagster.kafka_io import ensure_topic
from fraud_dagster.local_services.kafka import LocalKafka
from fraud_dagster.local_services.postgres import (
    LocalPostgres,
    postgres_bin_dir,
    temporary_postgres,
)
from fraud_dagster.local_services.process import free_port
from fraud_dagster.local_services.smtp import LocalSmtpServer
from fraud_dagster.settings import PROJECT_ROOT, Settings, load_settings
from fraud_dagster_tests.helpers import MailBox
from fraud_dagster_tests.operations_support import require

DATABASE_BACKENDS = ("sqlite", "postgresql")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run every test that reaches `database_url` on each backend (or those of its marker)."""
    if "database_url" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("backends")
    backends = marker.args if marker else DATABASE_BACKENDS
    if not backends:
        return
    metafunc.parametrize(
        "database_url",
        [
            pytest.param(name, id=name, marks=[pytest.mark.postgres] if name != "sqlite" else [])
            for name in backends
        ],
        indirect=True,
    )


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[LocalPostgres | None]:
    """One PostgreSQL server for the session (started on first use), or None without binaries."""
    try:
        postgres_bin_dir()
    except LocalServiceError:
        yield None
        return
    with temporary_postgres(prefix="fraud-pg-session-") as server:
        yield server


@contextmanager
def fresh_postgres_database(request: pytest.FixtureRequest, prefix: str) -> Iterator[str]:
    """A new database on the session's server, dropped after the test; without binaries it
    skips, or fails under CI (`require`)."""
    server: LocalPostgres | None = request.getfixturevalue("postgres_server")
    require(
        server is not None, "PostgreSQL server binaries not found (scripts/setup.sh installs them)"
    )
    assert server is not None
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    yield server.create_database(name)
    server.drop_database(name)


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka]:
    broker = LocalKafka(
        data_dir=tmp_path_factory.mktemp("kafka"),
        port=free_port(),
        controller_port=free_port(),
        heap="768m",
    )
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def topic(kafka_broker: LocalKafka, request: pytest.FixtureRequest) -> str:
    """A new topic for this test; `@pytest.mark.partitions(n)` sets its partition count."""
    marker = request.node.get_closest_marker("partitions")
    partitions = marker.args[0] if marker else 1
    name = f"tx-{request.node.name[:40].replace('[', '-').replace(']', '')}-{uuid.uuid4().hex[:6]}"
    ensure_topic({"bootstrap_servers": [kafka_broker.bootstrap_servers]}, name, partitions)
    return name


@pytest.fixture
def mail_dir(tmp_path: Path) -> Path:
    return tmp_path / "mail"


@pytest.fixture
def smtp_server(mail_dir: Path) -> Iterator[LocalSmtpServer]:
    server = LocalSmtpServer(mail_dir=mail_dir, port=free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture
def mailbox(smtp_server: LocalSmtpServer) -> MailBox:
    return MailBox(smtp_server.mail_dir)


@pytest.fixture
def database_url(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """The application database of this test: SQLite file, or a fresh PostgreSQL database."""
    if getattr(request, "param", "sqlite") == "sqlite":
        yield f"sqlite:///{tmp_path / 'fraud.db'}"
    else:
        with fresh_postgres_database(request, "app") as url:
            yield url


@pytest.fixture
def env(
    tmp_path: Path,
    kafka_broker: LocalKafka,
    topic: str,
    smtp_server: LocalSmtpServer,
    database_url: str,
) -> dict[str, str]:
    """Environment variables that point the project at this test's services."""
    return {
        "FRAUD_VAR_DIR": str(tmp_path / "var"),
        "FRAUD_MODELS_DIR": str(PROJECT_ROOT / "models"),
        "FRAUD_KAFKA_BOOTSTRAP_SERVERS": kafka_broker.bootstrap_servers,
        "FRAUD_KAFKA_TOPIC": topic,
        "FRAUD_KAFKA_CONSUMER_GROUP": f"group-{topic}",
        "FRAUD_DATABASE_URL": database_url,
        "FRAUD_SMTP_HOST": "127.0.0.1",
        "FRAUD_SMTP_PORT": str(smtp_server.port),
        "FRAUD_SENSOR_INTERVAL_SECONDS": "1",
    }


@pytest.fixture
def settings(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return load_settings(env)


@pytest.fixture
def dagster_home(
    tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Path]:
    """A temporary DAGSTER_HOME with the repository's dagster.yaml; with
    `@pytest.mark.dagster_storage("postgresql")` its storage is a fresh PostgreSQL database
    (DAGSTER_PG_* set in this process's environment, so daemons started by the test get them)."""
    marker = request.node.get_closest_marker("dagster_storage")
    if marker is None or marker.args == ("sqlite",):
        yield write_dagster_home(tmp_path / "dagster_home")
        return
    with fresh_postgres_database(request, "dagster") as url:
        for name, value in dagster_pg_env(url).items():
            monkeypatch.setenv(name, value)
        yield write_dagster_home(tmp_path / "dagster_home", postgres=True)


@pytest.fixture
def instance(dagster_home: Path) -> Iterator[dg.DagsterInstance]:
    with dg.DagsterInstance.from_config(str(dagster_home)) as inst:
        yield inst
