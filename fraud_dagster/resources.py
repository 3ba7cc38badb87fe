"""Dagster resources, one per external system: Kafka, the model, the database, SMTP; and the
limits of the batch runs' asset checks.

They are thin: configuration (defaults from `settings.py`, secrets through `dagster.EnvVar`) and
a client built once per run. The work itself lives in plain modules (`kafka_io`, `model`,
`storage`, `alerts`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field, PrivateAttr, field_validator
from sqlalchemy.engine import Engine

from fraud_dagster import kafka_io
from fraud_dagster.alerts import AlertDelivery, SmtpSettings, checked_addresses
from fraud_dagster.errors import ConfigurationError
from fraud_dagster.messages import RawBatch
from fraud_dagster.model import LoadedModel, load_verified, read_manifest, threshold_problem
from fraud_dagster.model_registry import require_promoted_hash
from fraud_dagster.settings import Settings, topic_name_problem
from fraud_dagster.storage.database import create_engine, ensure_schema
from fraud_dagster.storage.promotions import active_model_version

# Engines are expensive to build and safe to share: one per database URL per process.
_ENGINES: dict[str, Engine] = {}


class KafkaResource(dg.ConfigurableResource):
    """The transaction topic on a Kafka cluster, and the consumer group that tracks the pipeline."""

    bootstrap_servers: str = Field(description="Comma-separated host:port list of brokers.")
    topic: str = Field(description="Topic carrying transaction messages (JSON objects).")
    consumer_group: str = Field(
        description="Group whose committed offsets show the pipeline's lag."
    )
    security_protocol: str = Field(
        default="PLAINTEXT", description="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL."
    )
    sasl_mechanism: str | None = Field(
        default=None, description="PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512."
    )
    sasl_username: str | None = Field(default=None, description="SASL user name.")
    sasl_password: str | None = Field(
        default=None, description="SASL password (set through EnvVar)."
    )
    ssl_cafile: str | None = Field(default=None, description="CA bundle to verify the brokers.")
    request_timeout_seconds: float = Field(
        default=30.0, description="Timeout of one broker request."
    )
    connect_timeout_seconds: float = Field(
        default=10.0,
        description="How long to try to reach a broker before calling Kafka unavailable.",
    )
    fetch_timeout_seconds: float = Field(
        default=120.0, description="Time allowed to read one batch."
    )

    @field_validator("topic")
    @classmethod
    def _topic_is_a_kafka_name(cls, topic: str) -> str:
        if problem := topic_name_problem(topic):
            raise ConfigurationError(f"FRAUD_KAFKA_TOPIC: {problem}")
        return topic

    def client_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers.split(","),
            "security_protocol": self.security_protocol,
            "request_timeout_ms": int(self.request_timeout_seconds * 1000),
            "bootstrap_timeout_ms": int(self.connect_timeout_seconds * 1000),
            "client_id": "fraud-dagster",
        }
        if self.sasl_mechanism:
            options["sasl_mechanism"] = self.sasl_mechanism
            options["sasl_plain_username"] = self.sasl_username
            options["sasl_plain_password"] = self.sasl_password
        if self.ssl_cafile:
            options["ssl_cafile"] = self.ssl_cafile
        return options

    def topic_offsets(self) -> kafka_io.TopicOffsets:
        return kafka_io.topic_offsets(self.client_options(), self.topic)

    def offset_bounds(self) -> tuple[dict[int, int], dict[int, int]]:
        return kafka_io.offset_bounds(self.client_options(), self.topic)

    def committed_offsets(self) -> dict[int, int]:
        return kafka_io.committed_offsets(self.client_options(), self.topic, self.consumer_group)

    def read_range(
        self, topic: str, partition: int, first: int, last: int, topic_id: str | None = None
    ) -> RawBatch:
        return kafka_io.read_range(
            self.client_options(),
            topic,
            partition,
            first,
            last,
            self.fetch_timeout_seconds,
            group_id=self.consumer_group,
            topic_id=topic_id,
        )

    def commit_stored(
        self,
        topic: str,
        partition: int,
        stored_until: Callable[[int], int],
        deleted_unread: Callable[[int, int], object] | None = None,
    ) -> int | None:
        """Commit the group as far as stored data reaches without a gap (kafka_io.commit_stored)."""
        return kafka_io.commit_stored(
            self.client_options(),
            topic,
            partition,
            self.consumer_group,
            stored_until,
            deleted_unread,
        )


class DatabaseResource(dg.ConfigurableResource):
    """The application database (SQLite by default, PostgreSQL in production) via SQLAlchemy."""

    url: str = Field(description="SQLAlchemy URL; may hold a password, so set it through EnvVar.")

    def get_engine(self) -> Engine:
        engine = _ENGINES.get(self.url)
        if engine is None:
            engine = create_engine(self.url)
            ensure_schema(engine)
            _ENGINES[self.url] = engine
        return engine


class ModelResource(dg.ConfigurableResource):
    """Published scikit-learn models in a directory with a SHA-256 manifest."""

    models_dir: str = Field(description="Directory holding manifest.json and the .joblib files.")
    version: str | None = Field(
        default=None, description="Pin a version; otherwise the promoted (active) one is used."
    )
    threshold: float | None = Field(
        default=None, description="Override the manifest's decision threshold."
    )
    _loaded: LoadedModel | None = PrivateAttr(default=None)

    @field_validator("threshold")
    @classmethod
    def _threshold_can_decide(cls, threshold: float | None) -> float | None:
        problem = None if threshold is None else threshold_problem(threshold)
        if problem is not None:
            raise ConfigurationError(f"model threshold (FRAUD_MODEL_THRESHOLD): {problem}")
        return threshold

    def select_version(self, engine: Engine | None = None) -> str:
        """Pinned version, else the last promoted one, else the manifest's default or newest."""
        if self.version:
            return self.version
        promoted = active_model_version(engine) if engine is not None else None
        return read_manifest(Path(self.models_dir)).serving_version(promoted)

    def load(self, engine: Engine | None = None) -> LoadedModel:
        """The verified model for this run; loaded once per run, however often it is asked for.

        With `engine`, a version that was promoted must still carry the SHA-256 recorded at its
        promotion; the file must hash to the manifest's SHA-256 in every case.
        """
        if self._loaded is None:
            models_dir = Path(self.models_dir)
            entry = read_manifest(models_dir).get(self.select_version(engine))
            if engine is not None:
                require_promoted_hash(engine, entry)
            self._loaded = load_verified(models_dir, entry, self.threshold)
        return self._loaded


class SmtpResource(dg.ConfigurableResource):
    """The SMTP server that carries alert emails, and who receives them."""

    host: str = Field(description="SMTP server host.")
    port: int = Field(description="SMTP server port.")
    security: str = Field(default="none", description="none, starttls or ssl.")
    username: str | None = Field(default=None, description="Login user, if the server wants AUTH.")
    password: str | None = Field(default=None, description="Login password (set through EnvVar).")
    sender: str = Field(description="From address of alert emails.")
    recipients: list[str] = Field(description="Risk analysts who receive transaction alerts.")
    operator_recipients: list[str] = Field(description="Operators who receive run-failure emails.")
    timeout_seconds: float = Field(default=10.0, description="Socket timeout of the SMTP session.")
    verify_certificate: bool = Field(
        default=True, description="Verify the server's TLS certificate."
    )
    retry_base_seconds: float = Field(
        default=30.0, description="First backoff after a failed delivery; doubles per attempt."
    )
    retry_max_seconds: float = Field(default=3600.0, description="Longest backoff between tries.")
    max_sessions: int = Field(
        default=4,
        description="SMTP sessions one delivery opens at once for a large batch's alerts "
        "(one more per 25 alerts; FRAUD_SMTP_MAX_SESSIONS).",
    )

    @field_validator("sender")
    @classmethod
    def _sender_can_be_emailed(cls, sender: str) -> str:
        return checked_addresses([sender], "SMTP sender (FRAUD_SMTP_SENDER)")[0]

    @field_validator("recipients")
    @classmethod
    def _recipients_can_be_emailed(cls, recipients: list[str]) -> list[str]:
        return list(checked_addresses(recipients, "alert recipients (FRAUD_ALERT_RECIPIENTS)"))

    @field_validator("operator_recipients")
    @classmethod
    def _operators_can_be_emailed(cls, recipients: list[str]) -> list[str]:
        what = "operator recipients (FRAUD_OPERATOR_RECIPIENTS)"
        return list(checked_addresses(recipients, what))

    def smtp_settings(self) -> SmtpSettings:
        return SmtpSettings(
            host=self.host,
            port=self.port,
            security=self.security,
            username=self.username,
            password=self.password,
            timeout_seconds=self.timeout_seconds,
            verify_certificate=self.verify_certificate,
        )

    def alert_delivery(self) -> AlertDelivery:
        """How the analysts' alert emails go out (see `alert_delivery.deliver_alerts`)."""
        return AlertDelivery(
            smtp=self.smtp_settings(),
            sender=self.sender,
            recipients=tuple(self.recipients),
            max_sessions=self.max_sessions,
            retry_base_seconds=self.retry_base_seconds,
            retry_max_seconds=self.retry_max_seconds,
        )


class BatchChecksResource(dg.ConfigurableResource):
    """Limits of the asset checks every batch run evaluates (see `batch_checks.py`).

    A failed check never fails the run or holds back data: it is a signal in the UI.
    """

    max_rejected_share: float = Field(
        default=0.05,
        description="Largest share of a batch's messages that may be rejected before "
        "rejected_share fails (FRAUD_CHECK_MAX_REJECTED_SHARE).",
    )
    max_score_psi: float = Field(
        default=0.25,
        description="Largest population stability index of the batch's scores against the "
        "model's held-out scores before score_drift fails (FRAUD_CHECK_MAX_SCORE_PSI).",
    )
    drift_min_scores: int = Field(
        default=200,
        description="Fewest scores score_drift judges; smaller batches pass with their PSI "
        "shown for information (FRAUD_CHECK_DRIFT_MIN_SCORES).",
    )


def _secret(settings: Settings, name: str) -> dg.EnvVar | None:
    """An EnvVar reference when the variable is set: the UI shows the name, never the value."""
    return dg.EnvVar(name) if settings.secret_is_set(name) else None


def _require_credentials(settings: Settings) -> None:
    """Credentials that cannot work, refused when the code location loads rather than by every
    run and sensor tick that connects (secrets are looked at, never shown)."""
    if settings.secret_is_set("FRAUD_SMTP_PASSWORD") and not settings.smtp_username:
        raise ConfigurationError("FRAUD_SMTP_PASSWORD is set without FRAUD_SMTP_USERNAME; set both")
    if (
        settings.smtp_username
        and settings.smtp_security == "none"
        and not _is_loopback(settings.smtp_host)
    ):
        raise ConfigurationError(
            f"FRAUD_SMTP_USERNAME is set with FRAUD_SMTP_SECURITY=none: AUTH would send the "
            f"password to {settings.smtp_host} in clear text; set FRAUD_SMTP_SECURITY to "
            "starttls or ssl"
        )
    for name in ("FRAUD_SMTP_USERNAME", "FRAUD_SMTP_PASSWORD"):
        if not settings.env.get(name, "").isascii():  # smtplib's AUTH sends them as ASCII
            raise ConfigurationError(
                f"{name} has characters other than ASCII, which AUTH cannot send"
            )
    if settings.kafka_sasl_mechanism and not (
        settings.kafka_sasl_username and settings.secret_is_set("FRAUD_KAFKA_SASL_PASSWORD")
    ):
        raise ConfigurationError(
            f"FRAUD_KAFKA_SASL_MECHANISM={settings.kafka_sasl_mechanism} needs "
            "FRAUD_KAFKA_SASL_USERNAME and FRAUD_KAFKA_SASL_PASSWORD"
        )
    remote_brokers = [
        host
        for host in _bootstrap_hosts(settings.kafka_bootstrap_servers)
        if not _is_loopback(host)
    ]
    if (
        settings.kafka_security_protocol == "SASL_PLAINTEXT"
        and settings.kafka_sasl_mechanism == "PLAIN"
        and remote_brokers
    ):
        raise ConfigurationError(
            "FRAUD_KAFKA_SASL_MECHANISM=PLAIN with FRAUD_KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT "
            f"would send the password to {', '.join(remote_brokers)} in clear text; use "
            "SASL_SSL, or a SCRAM mechanism"
        )


def _bootstrap_hosts(servers: str) -> list[str]:
    """The host of each `host:port` (or `[v6]:port`) in a comma-separated broker list."""
    hosts = []
    for server in servers.split(","):
        host = server.strip().rsplit(":", 1)[0] if ":" in server else server.strip()
        hosts.append(host.strip("[]"))
    return hosts


def _is_loopback(host: str) -> bool:
    """`host` names this machine (a local relay), where clear text never reaches a network."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_resources(settings: Settings) -> dict[str, dg.ConfigurableResource]:
    """All resources for `settings`: the same function serves dev, tests and production."""
    _require_credentials(settings)
    database_url = _secret(settings, "FRAUD_DATABASE_URL") or settings.default_database_url
    return {
        "kafka": KafkaResource(
            bootstrap_servers=settings.kafka_bootstrap_servers,
            topic=settings.kafka_topic,
            consumer_group=settings.kafka_consumer_group,
            security_protocol=settings.kafka_security_protocol,
            sasl_mechanism=settings.kafka_sasl_mechanism,
            sasl_username=settings.kafka_sasl_username,
            sasl_password=_secret(settings, "FRAUD_KAFKA_SASL_PASSWORD"),
            ssl_cafile=settings.kafka_ssl_cafile,
            connect_timeout_seconds=settings.kafka_connect_timeout_seconds,
        ),
        "database": DatabaseResource(url=database_url),
        "model": ModelResource(
            models_dir=str(settings.models_dir),
            version=settings.model_version,
            threshold=settings.model_threshold,
        ),
        "smtp": SmtpResource(
            host=settings.smtp_host,
            port=settings.smtp_port,
            security=settings.smtp_security,
            username=settings.smtp_username,
            password=_secret(settings, "FRAUD_SMTP_PASSWORD"),
            sender=settings.smtp_sender,
            recipients=list(settings.alert_recipients),
            operator_recipients=list(settings.operator_recipients),
            timeout_seconds=settings.smtp_timeout_seconds,
            verify_certificate=settings.smtp_verify_certificate,
            retry_base_seconds=settings.alert_retry_base_seconds,
            retry_max_seconds=settings.alert_retry_max_seconds,
            max_sessions=settings.smtp_max_sessions,
        ),
        "batch_checks": BatchChecksResource(
            max_rejected_share=settings.check_max_rejected_share,
            max_score_psi=settings.check_max_score_psi,
            drift_min_scores=settings.check_drift_min_scores,
        ),
    }


def resolved_resources(settings: Settings) -> dict[str, dg.ConfigurableResource]:
    """`build_resources` with EnvVar references resolved, for use outside a Dagster run (CLI,
    benchmarks, tests). Inside Dagster, resources are resolved by Dagster itself."""
    return {
        key: resource.process_config_and_initialize()
        for key, resource in build_resources(settings).items()
    }
