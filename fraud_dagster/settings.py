"""The one place that reads the running system's configuration from the environment.

(The `fraud-dagster` command and the local services read a few variables of their own, listed
in README.md.)

Every setting has a documented environment variable and a default that works on a laptop with
the local services (`fraud-dagster kafka start`, `fraud-dagster smtp start`). Secrets are not
read here: they reach Dagster resources through `dagster.EnvVar` (see `resources.py`), so their
values never appear in run config or in the UI.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fraud_dagster.errors import ConfigurationError

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# Names of the secret variables; read only through dagster.EnvVar or at connection time.
SECRET_ENV_VARS = (
    "FRAUD_DATABASE_URL",
    "FRAUD_KAFKA_SASL_PASSWORD",
    "FRAUD_SMTP_PASSWORD",
)


def _split_csv(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
KAFKA_SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
KAFKA_SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
SMTP_SECURITY_MODES = ("none", "starttls", "ssl")


_WEB_ADDRESS = re.compile(r"https?://[^\s/?#]+(?:/\S*)?", re.IGNORECASE)
_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")


def topic_name_problem(name: str) -> str | None:
    """Why Kafka would refuse `name` as a topic name, or None (its rules: ASCII letters, digits,
    ".", "_" and "-", at most 249 of them, not "." or ".."). Checked where the name is set, as
    kafka-python's ValueError or the broker's InvalidTopicError come only at the first use."""
    if not _TOPIC_NAME.fullmatch(name) or name in (".", ".."):
        return (
            f"{name[:60]!r} is not a Kafka topic name: 1 to 249 ASCII letters, digits, '.', "
            "'_' or '-' (not '.' or '..')"
        )
    return None


class _Environment:
    """Typed reads of the environment: a value that is not what its variable takes stops the
    code location (or the command) with the variable's name, not a bare ValueError, and never
    passes as something else (a mistyped "true" used to turn certificate checks off)."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def text(self, name: str, default: str | None = None) -> str | None:
        value = self.env.get(name)
        return value if value not in (None, "") else default

    def integer(self, name: str, default: int, minimum: int = 1, maximum: int | None = None) -> int:
        text = self.text(name)
        if text is None:
            return default
        try:
            value = int(text.strip())
        except ValueError:
            raise self._invalid(name, text, f"a whole number, e.g. {default}") from None
        if value < minimum or (maximum is not None and value > maximum):
            wanted = (
                f"from {minimum} to {maximum}" if maximum is not None else f"of at least {minimum}"
            )
            raise self._invalid(name, text, f"a whole number {wanted}")
        return value

    def number(
        self,
        name: str,
        default: float,
        minimum: float = 0.0,
        maximum: float | None = None,
        *,
        minimum_allowed: bool = False,
    ) -> float:
        """A finite number above `minimum` (or at least it, with `minimum_allowed`), and at
        most `maximum`."""
        text = self.text(name)
        if text is None:
            return default
        try:
            value = float(text.strip())
        except ValueError:
            raise self._invalid(name, text, f"a number, e.g. {default:g}") from None
        low_ok = value >= minimum if minimum_allowed else value > minimum
        if not math.isfinite(value) or not low_ok or (maximum is not None and value > maximum):
            low = f"at least {minimum:g}" if minimum_allowed else f"above {minimum:g}"
            high = f" and at most {maximum:g}" if maximum is not None else ""
            raise self._invalid(name, text, f"a number {low}{high}")
        return value

    def optional_number(self, name: str) -> float | None:
        text = self.text(name)
        if text is None:
            return None
        try:
            return float(text.strip())
        except ValueError:
            raise self._invalid(name, text, "a number") from None

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        text = self.text(name) or default
        for option in choices:
            if text.strip().lower() == option.lower():
                return option
        raise self._invalid(name, text, f"one of {', '.join(choices)}")

    def optional_choice(self, name: str, choices: tuple[str, ...]) -> str | None:
        return self.choice(name, "", choices) if self.text(name) is not None else None

    def web_address(self, name: str, default: str) -> str:
        """An http(s) address without its trailing slash: emails link to pages under it, and a
        mail client makes a link only of one with its scheme and without spaces."""
        text = self.text(name) or default
        if "@" in text.split("://", 1)[-1].split("/", 1)[0]:  # never echo a password
            raise ConfigurationError(
                f"{name} must not hold a user or password: it is in every operator email"
            )
        if not _WEB_ADDRESS.fullmatch(text.strip()):
            raise self._invalid(name, text, "an http:// or https:// address, e.g. " + default)
        return text.strip().rstrip("/")

    def flag(self, name: str, default: bool) -> bool:
        text = self.text(name)
        if text is None:
            return default
        if text.strip().lower() in _TRUE:
            return True
        if text.strip().lower() in _FALSE:
            return False
        raise self._invalid(name, text, f"one of {', '.join(_TRUE + _FALSE)}")

    @staticmethod
    def _invalid(name: str, text: str, wanted: str) -> ConfigurationError:
        return ConfigurationError(f"{name}={text[:60]!r} is not {wanted}")


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
    """Resolve `Settings` from `environ` (default: `os.environ`); a ConfigurationError names
    the first variable whose value it cannot take."""
    env = dict(os.environ if environ is None else environ)
    read = _Environment(env)
    get = read.text
    protocol = read.choice("FRAUD_KAFKA_SECURITY_PROTOCOL", "PLAINTEXT", KAFKA_SECURITY_PROTOCOLS)
    mechanism = read.optional_choice("FRAUD_KAFKA_SASL_MECHANISM", KAFKA_SASL_MECHANISMS)
    if protocol.startswith("SASL_") != (mechanism is not None):
        raise ConfigurationError(
            "FRAUD_KAFKA_SASL_MECHANISM must be set exactly when FRAUD_KAFKA_SECURITY_PROTOCOL "
            f"is SASL_PLAINTEXT or SASL_SSL (it is {protocol}, mechanism {mechanism or 'unset'})"
        )
    retry_base = read.number("FRAUD_ALERT_RETRY_BASE_SECONDS", 30.0)
    return Settings(
        var_dir=Path(get("FRAUD_VAR_DIR", str(PROJECT_ROOT / "var"))).resolve(),
        models_dir=Path(get("FRAUD_MODELS_DIR", str(PROJECT_ROOT / "models"))).resolve(),
        kafka_bootstrap_servers=get("FRAUD_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092"),
        kafka_topic=get("FRAUD_KAFKA_TOPIC", "transactions"),
        kafka_consumer_group=get("FRAUD_KAFKA_CONSUMER_GROUP", "fraud-dagster"),
        kafka_security_protocol=protocol,
        kafka_sasl_mechanism=mechanism,
        kafka_sasl_username=get("FRAUD_KAFKA_SASL_USERNAME"),
        kafka_ssl_cafile=get("FRAUD_KAFKA_SSL_CAFILE"),
        kafka_connect_timeout_seconds=read.number("FRAUD_KAFKA_CONNECT_TIMEOUT_SECONDS", 10.0),
        sensor_interval_seconds=read.integer("FRAUD_SENSOR_INTERVAL_SECONDS", 5),
        max_batch_size=read.integer("FRAUD_MAX_BATCH_SIZE", 20_000),
        max_runs_per_tick=read.integer("FRAUD_MAX_RUNS_PER_TICK", 50),
        model_version=get("FRAUD_MODEL_VERSION"),
        model_threshold=read.optional_number("FRAUD_MODEL_THRESHOLD"),  # range: ModelResource
        smtp_host=get("FRAUD_SMTP_HOST", "127.0.0.1"),
        smtp_port=read.integer("FRAUD_SMTP_PORT", 8025, maximum=65535),
        smtp_security=read.choice("FRAUD_SMTP_SECURITY", "none", SMTP_SECURITY_MODES),
        smtp_username=get("FRAUD_SMTP_USERNAME"),
        smtp_sender=get("FRAUD_SMTP_SENDER", "fraud-alerts@localhost"),
        alert_recipients=_split_csv(get("FRAUD_ALERT_RECIPIENTS", "risk-analysts@localhost")),
        operator_recipients=_split_csv(
            get("FRAUD_OPERATOR_RECIPIENTS", "fraud-operators@localhost")
        ),
        smtp_timeout_seconds=read.number("FRAUD_SMTP_TIMEOUT_SECONDS", 10.0),
        smtp_verify_certificate=read.flag("FRAUD_SMTP_VERIFY_CERTIFICATE", True),
        smtp_max_sessions=read.integer("FRAUD_SMTP_MAX_SESSIONS", 4),
        alert_retry_interval_seconds=read.integer("FRAUD_ALERT_RETRY_INTERVAL_SECONDS", 30),
        alert_retry_base_seconds=retry_base,
        alert_retry_max_seconds=read.number(
            "FRAUD_ALERT_RETRY_MAX_SECONDS",
            max(3600.0, retry_base),
            minimum=retry_base,
            minimum_allowed=True,
        ),
        alert_pending_grace_seconds=read.number(
            "FRAUD_ALERT_PENDING_GRACE_SECONDS", 120.0, minimum_allowed=True
        ),
        alert_retry_max_per_run=read.integer("FRAUD_ALERT_RETRY_MAX_PER_RUN", 500),
        reload_model_cron=get("FRAUD_RELOAD_MODEL_CRON", "*/15 * * * *"),
        check_max_rejected_share=read.number(
            "FRAUD_CHECK_MAX_REJECTED_SHARE", 0.05, maximum=1.0, minimum_allowed=True
        ),
        check_max_score_psi=read.number("FRAUD_CHECK_MAX_SCORE_PSI", 0.25),
        check_drift_min_scores=read.integer("FRAUD_CHECK_DRIFT_MIN_SCORES", 200),
        run_health_interval_seconds=read.integer("FRAUD_RUN_HEALTH_INTERVAL_SECONDS", 15),
        lost_retry_after_seconds=read.number("FRAUD_LOST_RETRY_AFTER_SECONDS", 60.0),
        # 0: tell at the first look (the tests, an impatient deployment)
        kafka_down_alert_seconds=read.number(
            "FRAUD_KAFKA_DOWN_ALERT_SECONDS", 300.0, minimum_allowed=True
        ),
        unstored_alert_seconds=read.number(
            "FRAUD_UNSTORED_ALERT_SECONDS", 3600.0, minimum_allowed=True
        ),
        dagster_ui_url=read.web_address("FRAUD_DAGSTER_UI_URL", "http://127.0.0.1:3000"),
        env=env,
    )
