"""The one place that reads the running system's configuration from the environment.

(The `fraud-dagster` command and the local services read a few variables of their own, listed
in README.md.)

Every setting has a documented environment variable and a default that works on a laptop with
the local services (`fraud-dagster kafka start`, `fraud-dagster smtp start`). Secrets are not
read here: they reach Dagster resources through `dagster.EnvVar` (see `resources.py`), so their
values never appear in run config or in the UI.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# Names of the secret variables; read only through dagster.EnvVar or at connection time.
SECRET_ENV_VARS = (
    "FRAUD_DATABASE_URL",
    "FRAUD_KAFKA_SASL_PASSWORD",
    "FRAUD_SMTP_PASSWORD",
)


def _split_csv(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _flag(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Settings:
    """Non-secret configuration, resolved once from the environment."""

    var_dir: Path
    models_dir: Path
    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    kafka_topic: str = "transactions"
    kafka_consumer_group: str = "fraud-dagster"
    kafka_security_protocol: str = "PLAINTEXT"
    kafka_sasl_mechanism: str | None = None
    kafka_sasl_username: str | None = None
    kafka_ssl_cafile: str | None = None
    kafka_connect_timeout_seconds: float = 10.0
    sensor_interval_seconds: int = 5
    max_batch_size: int = 20_000
    max_runs_per_tick: int = 50
    model_version: str | None = None
    model_threshold: float | None = None
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 8025
    smtp_security: str = "none"
    smtp_username: str | None = None
    smtp_sender: str = "fraud-alerts@localhost"
    alert_recipients: tuple[str, ...] = ("risk-analysts@localhost",)
    operator_recipients: tuple[str, ...] = ("fraud-operators@localhost",)
    smtp_timeout_seconds: float = 10.0
    smtp_verify_certificate: bool = True
    smtp_max_sessions: int = 4
    alert_retry_interval_seconds: int = 30
    alert_retry_base_seconds: float = 30.0
    alert_retry_max_seconds: float = 3600.0
    alert_pending_grace_seconds: float = 120.0
    alert_retry_max_per_run: int = 500
    reload_model_cron: str = "*/15 * * * *"
    check_max_rejected_share: float = 0.05
    check_max_score_psi: float = 0.25
    check_drift_min_scores: int = 200
    run_health_interval_seconds: int = 15
    lost_retry_after_seconds: float = 60.0
    kafka_down_alert_seconds: float = 300.0
    unstored_alert_seconds: float = 3600.0
    dagster_ui_url: str = "http://127.0.0.1:3000"
    env: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    @property
    def default_database_url(self) -> str:
        return f"sqlite:///{self.var_dir / 'fraud.db'}"

    @property
    def mail_dir(self) -> Path:
        return self.var_dir / "mail"

    @property
    def log_dir(self) -> Path:
        return self.var_dir / "log"

    def secret_is_set(self, name: str) -> bool:
        return bool(self.env.get(name))


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Resolve `Settings` from `environ` (default: `os.environ`)."""
    env = dict(os.environ if environ is None else environ)

    def get(name: str, default: str | None = None) -> str | None:
        value = env.get(name)
        return value if value not in (None, "") else default

    var_dir = Path(get("FRAUD_VAR_DIR", str(PROJECT_ROOT / "var"))).resolve()
    threshold = get("FRAUD_MODEL_THRESHOLD")
    return Settings(
        var_dir=var_dir,
        models_dir=Path(get("FRAUD_MODELS_DIR", str(PROJECT_ROOT / "models"))).resolve(),
        kafka_bootstrap_servers=get("FRAUD_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092"),
        kafka_topic=get("FRAUD_KAFKA_TOPIC", "transactions"),
        kafka_consumer_group=get("FRAUD_KAFKA_CONSUMER_GROUP", "fraud-dagster"),
        kafka_security_protocol=get("FRAUD_KAFKA_SECURITY_PROTOCOL", "PLAINTEXT"),
        kafka_sasl_mechanism=get("FRAUD_KAFKA_SASL_MECHANISM"),
        kafka_sasl_username=get("FRAUD_KAFKA_SASL_USERNAME"),
        kafka_ssl_cafile=get("FRAUD_KAFKA_SSL_CAFILE"),
        kafka_connect_timeout_seconds=float(get("FRAUD_KAFKA_CONNECT_TIMEOUT_SECONDS", "10")),
        sensor_interval_seconds=int(get("FRAUD_SENSOR_INTERVAL_SECONDS", "5")),
        max_batch_size=int(get("FRAUD_MAX_BATCH_SIZE", "20000")),
        max_runs_per_tick=int(get("FRAUD_MAX_RUNS_PER_TICK", "50")),
        model_version=get("FRAUD_MODEL_VERSION"),
        model_threshold=float(threshold) if threshold is not None else None,
        smtp_host=get("FRAUD_SMTP_HOST", "127.0.0.1"),
        smtp_port=int(get("FRAUD_SMTP_PORT", "8025")),
        smtp_security=get("FRAUD_SMTP_SECURITY", "none").lower(),
        smtp_username=get("FRAUD_SMTP_USERNAME"),
        smtp_sender=get("FRAUD_SMTP_SENDER", "fraud-alerts@localhost"),
        alert_recipients=_split_csv(get("FRAUD_ALERT_RECIPIENTS", "risk-analysts@localhost")),
        operator_recipients=_split_csv(
            get("FRAUD_OPERATOR_RECIPIENTS", "fraud-operators@localhost")
        ),
        smtp_timeout_seconds=float(get("FRAUD_SMTP_TIMEOUT_SECONDS", "10")),
        smtp_verify_certificate=_flag(get("FRAUD_SMTP_VERIFY_CERTIFICATE", "true")),
        smtp_max_sessions=int(get("FRAUD_SMTP_MAX_SESSIONS", "4")),
        alert_retry_interval_seconds=int(get("FRAUD_ALERT_RETRY_INTERVAL_SECONDS", "30")),
        alert_retry_base_seconds=float(get("FRAUD_ALERT_RETRY_BASE_SECONDS", "30")),
        alert_retry_max_seconds=float(get("FRAUD_ALERT_RETRY_MAX_SECONDS", "3600")),
        alert_pending_grace_seconds=float(get("FRAUD_ALERT_PENDING_GRACE_SECONDS", "120")),
        alert_retry_max_per_run=int(get("FRAUD_ALERT_RETRY_MAX_PER_RUN", "500")),
        reload_model_cron=get("FRAUD_RELOAD_MODEL_CRON", "*/15 * * * *"),
        check_max_rejected_share=float(get("FRAUD_CHECK_MAX_REJECTED_SHARE", "0.05")),
        check_max_score_psi=float(get("FRAUD_CHECK_MAX_SCORE_PSI", "0.25")),
        check_drift_min_scores=int(get("FRAUD_CHECK_DRIFT_MIN_SCORES", "200")),
        run_health_interval_seconds=int(get("FRAUD_RUN_HEALTH_INTERVAL_SECONDS", "15")),
        lost_retry_after_seconds=float(get("FRAUD_LOST_RETRY_AFTER_SECONDS", "60")),
        kafka_down_alert_seconds=float(get("FRAUD_KAFKA_DOWN_ALERT_SECONDS", "300")),
        unstored_alert_seconds=float(get("FRAUD_UNSTORED_ALERT_SECONDS", "3600")),
        dagster_ui_url=get("FRAUD_DAGSTER_UI_URL", "http://127.0.0.1:3000").rstrip("/"),
        env=env,
    )
