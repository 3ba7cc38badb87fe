"""Settings from the environment: a value a variable cannot take stops the code location (or
the command) naming the variable, and is never read as something else."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from fraud_dagster.cli import _refuse_remote_services, main
from fraud_dagster.definitions import build_definitions
from fraud_dagster.errors import ConfigurationError
from fraud_dagster.resources import build_resources
from fraud_dagster.settings import load_settings
from fraud_dagster.storage.database import create_engine, url_for_display


@pytest.mark.parametrize(
    ("name", "value", "said"),
    [
        # a typo used to turn the certificate check off without a word
        ("FRAUD_SMTP_VERIFY_CERTIFICATE", "ture", "is not one of 1, true, yes, on, 0"),
        ("FRAUD_SMTP_PORT", "25x", "is not a whole number, e.g. 8025"),
        ("FRAUD_SMTP_PORT", "70000", "from 1 to 65535"),
        ("FRAUD_SENSOR_INTERVAL_SECONDS", "2.5", "is not a whole number"),
        ("FRAUD_MAX_BATCH_SIZE", "0", "a whole number of at least 1"),
        ("FRAUD_MAX_RUNS_PER_TICK", "-3", "a whole number of at least 1"),
        ("FRAUD_CHECK_MAX_REJECTED_SHARE", "5", "at least 0 and at most 1"),
        ("FRAUD_CHECK_MAX_SCORE_PSI", "nan", "a number above 0"),
        ("FRAUD_SMTP_TIMEOUT_SECONDS", "ten", "is not a number, e.g. 10"),
        ("FRAUD_ALERT_RETRY_MAX_SECONDS", "10", "at least 30"),
        ("FRAUD_SMTP_SECURITY", "tls", "is not one of none, starttls, ssl"),
        # kafka-python took any other spelling as plaintext without authentication
        ("FRAUD_KAFKA_SECURITY_PROTOCOL", "tls", "PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL"),
        ("FRAUD_KAFKA_SECURITY_PROTOCOL", "sasl_ssl", "FRAUD_KAFKA_SASL_MECHANISM must be set"),
        ("FRAUD_MODEL_THRESHOLD", "0,5", "is not a number"),
    ],
)
def test_a_value_its_variable_cannot_take_names_the_variable(
    name: str, value: str, said: str
) -> None:
    with pytest.raises(ConfigurationError, match=name) as refused:
        build_definitions(load_settings({name: value}))
    assert said in str(refused.value)


def test_spellings_are_normalised_and_flags_read_both_ways() -> None:
    settings = load_settings(
        {
            "FRAUD_KAFKA_SECURITY_PROTOCOL": "sasl_ssl",
            "FRAUD_KAFKA_SASL_MECHANISM": "scram-sha-512",
            "FRAUD_SMTP_SECURITY": "STARTTLS",
            "FRAUD_SMTP_VERIFY_CERTIFICATE": "Off",
            "FRAUD_CHECK_MAX_REJECTED_SHARE": "0",
            "FRAUD_KAFKA_DOWN_ALERT_SECONDS": "0",
            "FRAUD_UNSTORED_ALERT_SECONDS": "0",
            "FRAUD_ALERT_PENDING_GRACE_SECONDS": "0",
        }
    )
    assert (settings.kafka_security_protocol, settings.kafka_sasl_mechanism) == (
        "SASL_SSL",
        "SCRAM-SHA-512",
    )
    assert (settings.smtp_security, settings.smtp_verify_certificate) == ("starttls", False)
    assert settings.check_max_rejected_share == 0.0
    # 0 is meaningful for these: tell (or send) at the first look
    assert settings.kafka_down_alert_seconds == settings.unstored_alert_seconds == 0.0
    assert load_settings({}).smtp_verify_certificate is True


@pytest.mark.parametrize(
    ("env", "said"),
    [
        ({"FRAUD_SMTP_PASSWORD": "s3cret-value"}, "without FRAUD_SMTP_USERNAME"),
        (
            {"FRAUD_SMTP_USERNAME": "alerts", "FRAUD_SMTP_PASSWORD": "pässwort-value"},
            "FRAUD_SMTP_PASSWORD has characters other than ASCII",
        ),
        (
            {
                "FRAUD_SMTP_HOST": "smtp.bank.example",
                "FRAUD_SMTP_USERNAME": "alerts",
                "FRAUD_SMTP_PASSWORD": "s3cret-value",
            },
            "AUTH would send the password to smtp.bank.example in clear text",
        ),
        (
            {
                "FRAUD_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
                "FRAUD_KAFKA_SASL_MECHANISM": "PLAIN",
                "FRAUD_KAFKA_SASL_USERNAME": "fraud",
            },
            "needs FRAUD_KAFKA_SASL_USERNAME and FRAUD_KAFKA_SASL_PASSWORD",
        ),
        (
            {
                "FRAUD_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9092, kafka-2.bank.example:9092",
                "FRAUD_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
                "FRAUD_KAFKA_SASL_MECHANISM": "PLAIN",
                "FRAUD_KAFKA_SASL_USERNAME": "fraud",
                "FRAUD_KAFKA_SASL_PASSWORD": "s3cret-value",
            },
            "would send the password to kafka-2.bank.example in clear text",
        ),
    ],
)
def test_credentials_that_cannot_work_are_refused_without_showing_them(
    env: dict[str, str], said: str
) -> None:
    with pytest.raises(ConfigurationError) as refused:
        build_resources(load_settings(env))
    assert said in str(refused.value)
    assert "s3cret" not in str(refused.value) and "pässwort" not in str(refused.value)


@pytest.mark.parametrize(
    ("host", "security"),
    [("127.0.0.1", "none"), ("localhost", "none"), ("::1", "none"), ("smtp.bank", "starttls")],
)
def test_smtp_credentials_go_in_clear_text_only_to_this_machine(host: str, security: str) -> None:
    env = {
        "FRAUD_SMTP_HOST": host,
        "FRAUD_SMTP_SECURITY": security,
        "FRAUD_SMTP_USERNAME": "alerts",
        "FRAUD_SMTP_PASSWORD": "s3cret-value",
    }
    assert build_resources(load_settings(env))["smtp"].username == "alerts"


@pytest.mark.parametrize(
    ("servers", "protocol", "mechanism"),
    [
        ("127.0.0.1:9092,localhost:9093,[::1]:9094", "SASL_PLAINTEXT", "PLAIN"),
        ("kafka.bank.example:9092", "SASL_SSL", "PLAIN"),
        ("kafka.bank.example:9092", "SASL_PLAINTEXT", "SCRAM-SHA-512"),  # no password sent
    ],
)
def test_kafka_passwords_go_in_clear_text_only_to_this_machine(
    servers: str, protocol: str, mechanism: str
) -> None:
    env = {
        "FRAUD_KAFKA_BOOTSTRAP_SERVERS": servers,
        "FRAUD_KAFKA_SECURITY_PROTOCOL": protocol,
        "FRAUD_KAFKA_SASL_MECHANISM": mechanism,
        "FRAUD_KAFKA_SASL_USERNAME": "fraud",
        "FRAUD_KAFKA_SASL_PASSWORD": "s3cret-value",
    }
    assert build_resources(load_settings(env))["kafka"].sasl_username == "fraud"


def test_the_command_says_which_variable_is_wrong_instead_of_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("FRAUD_SMTP_PORT", "25x")
    with pytest.raises(SystemExit) as exited:
        main(["smtp", "status"])
    assert exited.value.code == 2
    assert "FRAUD_SMTP_PORT='25x' is not a whole number" in capsys.readouterr().err
    monkeypatch.delenv("FRAUD_SMTP_PORT")
    with pytest.raises(SystemExit) as exited:
        main(["--log-level", "verbose", "smtp", "status"])
    assert exited.value.code == 2
    assert "'verbose' is not one of DEBUG, INFO, WARNING, ERROR" in capsys.readouterr().err


def test_the_demo_refuses_an_environment_that_points_at_other_services() -> None:
    """With the exports of "Pointing at existing infrastructure" still set, the demo would
    start local services but send its simulated transactions (and alerts) to the bank's."""
    local = "127.0.0.1:9092"
    _refuse_remote_services(load_settings({}), local, postgres=False)  # the defaults are local
    _refuse_remote_services(
        load_settings({"FRAUD_DATABASE_URL": "sqlite:////tmp/own.db"}), local, postgres=False
    )
    remote = load_settings(
        {
            "FRAUD_KAFKA_BOOTSTRAP_SERVERS": "kafka-1.bank:9093",
            "FRAUD_SMTP_HOST": "smtp.bank",
            "FRAUD_DATABASE_URL": "postgresql+psycopg2://fraud:s3cret@db.bank:5432/fraud",
        }
    )
    with pytest.raises(ConfigurationError) as refused:
        _refuse_remote_services(remote, local, postgres=False)
    said = str(refused.value)
    for variable in ("FRAUD_KAFKA_BOOTSTRAP_SERVERS", "FRAUD_SMTP_HOST", "db.bank"):
        assert variable in said
    assert "s3cret" not in said


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("postgres://fraud:s3cret@db:5432/fraud", "sqlalchemy.dialects:postgres"),
        ("postgresql+psycopg2://fraud:s3cret@db:port/fraud", "its port is not a number"),
        ("postgresql+psycopg2://fraud:s3cret@db:s3cret/fraud", "its port is not a number"),
        ("not a url s3cret", "Could not parse SQLAlchemy URL"),
        # A raw `@` or `/` in the credentials: the rest of them would be read as host or database.
        ("postgresql+psycopg2://fraud:p@s3cret@db:5432/fraud", "`@` as %40"),
        ("postgresql+psycopg2://fraud:p@s3cret/x@db/fraud", "`@` as %40"),
        ("postgresql+psycopg2://fr/aud:s3cret@db/fraud", "`/` as %2F"),
    ],
)
def test_a_database_url_that_cannot_work_is_named_without_its_password(url: str, said: str) -> None:
    with pytest.raises(ConfigurationError) as refused:
        create_engine(url)
    assert "FRAUD_DATABASE_URL" in str(refused.value) and said in str(refused.value)
    assert "s3cret" not in str(refused.value)
    assert refused.value.__cause__ is None
    assert refused.value.__context__ is None or refused.value.__suppress_context__


def test_a_password_in_the_url_query_is_masked_like_the_password_field() -> None:
    """libpq takes `?password=` as well; SQLAlchemy masks only the password field."""
    url = create_engine("postgresql+psycopg2://fraud@db:5432/fraud?password=s3cret&sslmode=require")

    shown = url_for_display(url.url)

    assert "s3cret" not in shown
    assert shown == "postgresql+psycopg2://fraud@db:5432/fraud?password=***&sslmode=require"
    both = create_engine("postgresql+psycopg2://fraud:s3cret@db/fraud?sslpassword=k3y").url
    assert url_for_display(both) == "postgresql+psycopg2://fraud:***@db/fraud?sslpassword=***"


def test_the_demo_names_no_piece_of_a_misread_database_url() -> None:
    misread = load_settings({"FRAUD_DATABASE_URL": "postgresql+psycopg2://fraud:p@s3cret@db/f"})
    with pytest.raises(ConfigurationError) as refused:
        _refuse_remote_services(misread, "127.0.0.1:9092", postgres=False)
    assert "an unreadable URL" in str(refused.value)
    assert "s3cret" not in str(refused.value)


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["produce", "--count", "-5"], "--count: must be 1 or more, got -5"),
        (["produce", "--count", "0"], "--count: must be 1 or more, got 0"),
        (["produce", "--count", "10", "--rate", "0"], "--rate: must be a number above 0"),
        (["produce", "--count", "10", "--rate", "nan"], "--rate: must be a number above 0"),
        (["produce", "--from-csv", "x.csv", "--limit", "-1"], "--limit: must be 1 or more"),
        (["topic", "create", "--partitions", "0"], "--partitions: must be 1 or more, got 0"),
        (["train", "--days", "0"], "--days: must be 1 or more, got 0"),
        (["load-labels", "--from-csv", "x", "--delay-days", "-3"], "--delay-days: must be 0 or"),
        (["kafka", "start", "--port", "70000"], "--port: a TCP port is at most 65535"),
        (["demo", "--count", "many"], "--count: not an integer: 'many'"),
    ],
)
def test_counts_rates_and_ports_out_of_range_are_refused_before_anything_runs(
    argv: list[str], said: str, capsys: pytest.CaptureFixture
) -> None:
    """Before: `produce --count -5` or `--rate 0` went on to connect to Kafka (and with the
    broker down ended in kafka-python's traceback), `train --days 0` in an AttributeError."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert said in capsys.readouterr().err


def test_producing_without_a_broker_says_where_it_looked_instead_of_a_traceback(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Before: `fraud-dagster produce` with the broker down ended in kafka-python's
    KafkaTimeoutError traceback (`topic create` already said "cannot reach Kafka")."""
    with socket.socket() as unused:  # a port nothing listens on
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    monkeypatch.setenv("FRAUD_VAR_DIR", str(tmp_path))
    monkeypatch.setenv("FRAUD_KAFKA_BOOTSTRAP_SERVERS", f"127.0.0.1:{port}")
    monkeypatch.setenv("FRAUD_KAFKA_CONNECT_TIMEOUT_SECONDS", "2")
    with pytest.raises(SystemExit) as exited:
        main(["produce", "--count", "3", "--quiet"])
    assert exited.value.code == 1
    assert f"cannot reach Kafka at ['127.0.0.1:{port}']" in capsys.readouterr().err


def test_a_path_the_command_cannot_write_is_one_line_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("FRAUD_VAR_DIR", str(tmp_path / "var"))
    (tmp_path / "a-file").write_text("")
    with pytest.raises(SystemExit) as exited:
        main(["instance", "--home", str(tmp_path / "a-file" / "home")])
    assert exited.value.code == 1
    err = capsys.readouterr().err
    assert "fraud-dagster instance: [Errno 20] Not a directory" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("topic", ["bad topic", "tx/1", "x" * 250, ".", "..", "tränsactions"])
def test_a_topic_name_kafka_refuses_is_named_where_it_is_set(
    topic: str, capsys: pytest.CaptureFixture
) -> None:
    """Before: `produce --topic "bad topic"` ended in kafka-python's ValueError traceback, `topic
    create` in the broker's InvalidTopicError, and the code location loaded and its sensor
    looked for a topic no broker can have."""
    with pytest.raises(ConfigurationError, match=r"FRAUD_KAFKA_TOPIC: .* is not a Kafka topic"):
        build_resources(load_settings({"FRAUD_KAFKA_TOPIC": topic}))
    for command in (["topic", "create"], ["produce", "--count", "1"]):
        with pytest.raises(SystemExit) as exited:
            main([*command, "--topic", topic])
        assert exited.value.code == 2
        assert "--topic: " in capsys.readouterr().err


def test_every_name_kafka_takes_is_taken() -> None:
    for topic in ("transactions", "card.tx_v2-eu", "x" * 249, "..."):
        assert build_resources(load_settings({"FRAUD_KAFKA_TOPIC": topic}))["kafka"].topic == topic


@pytest.mark.parametrize("address", ["localhost:3000", "http://ui.example/ runs", "ftp://ui"])
def test_the_ui_address_emails_link_to_is_a_web_address(address: str) -> None:
    """Before: "localhost:3000" was taken, and every operator email carried a run "link" no mail
    client makes clickable."""
    with pytest.raises(ConfigurationError, match="is not an http:// or https:// address"):
        load_settings({"FRAUD_DAGSTER_UI_URL": address})


def test_the_ui_address_carries_no_password_and_does_not_show_one() -> None:
    with pytest.raises(ConfigurationError, match="must not hold a user or password") as refused:
        load_settings({"FRAUD_DAGSTER_UI_URL": "https://ops:s3cret-value@ui.example/"})
    assert "s3cret-value" not in str(refused.value)
    taken = load_settings({"FRAUD_DAGSTER_UI_URL": " https://ui.example:3000/dagster/ "})
    assert taken.dagster_ui_url == "https://ui.example:3000/dagster"


def test_a_reload_schedule_that_is_no_cron_expression_names_its_variable() -> None:
    """Before: Dagster's DagsterInvalidDefinitionError named the schedule, not the variable."""
    with pytest.raises(ConfigurationError, match="FRAUD_RELOAD_MODEL_CRON='every 5 minutes'"):
        build_definitions(load_settings({"FRAUD_RELOAD_MODEL_CRON": "every 5 minutes"}))
    assert build_definitions(load_settings({"FRAUD_RELOAD_MODEL_CRON": "0 3 * * *"}))
