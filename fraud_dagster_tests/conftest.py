"""Fixtures: the real services the tests talk to, started here and stopped afterwards.

One Kafka broker per test session (KRaft, free ports, temporary data dir), a fresh topic per
test, an aiosmtpd server per test writing to its own mail dir, and a SQLite database per test.
PostgreSQL comes from `postgres_url` (see test_postgres) when the server is installed.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from fraud_dagster.kafka_io import ensure_topic
from fraud_dagster.local_services.kafka import LocalKafka
from fraud_dagster.local_services.process import free_port
from fraud_dagster.local_services.smtp import LocalSmtpServer
from fraud_dagster.settings import PROJECT_ROOT, Settings, load_settings
from fraud_dagster_tests.helpers import MailBox


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
def database_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'fraud.db'}"


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
def dagster_home(tmp_path: Path) -> Path:
    """A temporary DAGSTER_HOME with the repository's dagster.yaml."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copyfile(PROJECT_ROOT / "dagster.yaml", home / "dagster.yaml")
    return home


@pytest.fixture
def instance(dagster_home: Path) -> Iterator[dg.DagsterInstance]:
    with dg.DagsterInstance.from_config(str(dagster_home)) as inst:
        yield inst
