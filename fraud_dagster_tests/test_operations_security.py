"""Security end to end: secrets stay out of logs, run config, tags, metadata and the UI; message
fields cannot change email headers or recipients; account ids are masked in logs; SQL-looking
values round-trip as plain data."""

from __future__ import annotations

import logging
import secrets
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from fraud_dagster.definitions import build_definitions
from fraud_dagster.local_services.dagster_processes import start_webserver, stop_dagster_process
from fraud_dagster.local_services.process import free_port, wait_until
from fraud_dagster.local_services.smtp import LocalSmtpServer, MaildirHandler
from fraud_dagster.settings import Settings, load_settings
from fraud_dagster.storage import schema
from fraud_dagster.storage.database import create_engine
from fraud_dagster.storage.labels import record_labels
from fraud_dagster_tests.helpers import (
    MailBox,
    evaluate_sensor,
    graphql_text,
    produce,
    serving,
    table_rows,
)
from fraud_dagster_tests.operations_support import local_postgres, run_request
from fraud_dagster_tests.test_end_to_end import known_transactions

pytestmark = pytest.mark.services


RESOURCES_QUERY = """
query ($selector: RepositorySelector!) {
  allTopLevelResourceDetailsOrError(repositorySelector: $selector) {
    __typename
    ... on ResourceDetailsList { results { name configuredValues { key value type } } }
  }
}
"""

RUNS_QUERY = """
{
  runsOrError {
    ... on Runs { results { runId runConfigYaml tags { key value }
      eventConnection { events { __typename ... on MessageEvent { message }
        ... on MaterializationEvent { metadataEntries { label description
          ... on TextMetadataEntry { text } ... on JsonMetadataEntry { jsonString } } } } } } }
  }
}
"""


@pytest.mark.postgres
@pytest.mark.backends()  # its own PostgreSQL server, whose password is one of the secrets
def test_secrets_never_reach_logs_run_config_tags_metadata_files_or_the_ui(
    settings: Settings,
    instance: dg.DagsterInstance,
    smtp_server: LocalSmtpServer,
    dagster_home: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)  # every record, whatever level an earlier test left
    smtp_password = f"smtp-{secrets.token_urlsafe(16)}"
    sasl_password = f"sasl-{secrets.token_urlsafe(16)}"
    smtp_server.stop()
    server = LocalSmtpServer(
        mail_dir=smtp_server.mail_dir,
        port=smtp_server.port,
        starttls=True,
        username="fraud-alerts",
        password=smtp_password,
        cert_dir=tmp_path / "tls",
    )
    with local_postgres() as postgres:
        secret_values = [smtp_password, sasl_password, postgres.password()]
        database_url = postgres.url()
        for name, value in {
            "FRAUD_DATABASE_URL": database_url,
            "FRAUD_SMTP_SECURITY": "starttls",
            "FRAUD_SMTP_VERIFY_CERTIFICATE": "false",
            "FRAUD_SMTP_USERNAME": "fraud-alerts",
            "FRAUD_SMTP_PASSWORD": smtp_password,
            "FRAUD_KAFKA_SASL_PASSWORD": sasl_password,
        }.items():
            monkeypatch.setenv(name, value)
        settings = load_settings()
        defs = build_definitions(settings)
        server.start()
        try:
            produce(settings, known_transactions()[0])
            tick = evaluate_sensor(defs, settings, instance, cursor=None)
            (request,) = tick.run_requests
            result = run_request(request, instance)
            assert result.success
            emails = MailBox(smtp_server.mail_dir).wait_for(3)
            assert emails, "alerts must go out through the authenticated session"
            ui = query_the_ui(dagster_home, tmp_path)
        finally:
            server.stop()

        evidence = {
            "python logs": caplog.text,
            "stdout/stderr": "".join(capfd.readouterr()),
            "sensor result": dg.serialize_value(tick),
            "runs (config, tags)": dg.serialize_value(list(instance.get_runs())),
            "event logs": "".join(
                dg.serialize_value(record)
                for run in instance.get_runs()
                for record in instance.all_logs(run.run_id)
            ),
            "UI (GraphQL)": ui,
            "webserver log": (tmp_path / "webserver.log").read_text(errors="replace"),
            "emails": "".join(str(message) for message in emails),
            **{
                f"file {path.relative_to(tmp_path)}": path.read_bytes().decode("latin-1")
                for path in [*dagster_home.rglob("*"), *smtp_server.mail_dir.rglob("*")]
                if path.is_file()
            },
        }
        # The evidence is real: each place holds what it should, so a clean scan means something.
        assert any(
            record.levelno == logging.INFO
            and record.getMessage().startswith("alert sent for transaction")
            for record in caplog.records
        ), "the alert sender's INFO lines must be among the python logs searched"
        for where, text in evidence.items():
            assert where.startswith("file ") or text.strip(), f"nothing captured from {where}"
        for where in ("stdout/stderr", "runs (config, tags)", "event logs", "UI (GraphQL)"):
            assert result.run_id in evidence[where], f"the run is not in the {where} searched"
        assert "RUN_SUCCESS" in evidence["stdout/stderr"]
        assert evidence["emails"].count("X-Fraud-Transaction-Id") == len(emails)
        assert evidence[f"file dagster_home/history/runs/{result.run_id}.db"]
        assert evidence["webserver log"].strip()
        for where, text in evidence.items():
            for value in secret_values:
                assert value not in text, f"a secret leaked into {where}"
        assert '"value":"FRAUD_SMTP_PASSWORD","type":"ENV_VAR"' in ui.replace(" ", "")
        assert '"value":"FRAUD_DATABASE_URL","type":"ENV_VAR"' in ui.replace(" ", "")
        assert '"value":"FRAUD_KAFKA_SASL_PASSWORD","type":"ENV_VAR"' in ui.replace(" ", "")
        assert len(evidence) > 10, "the instance's files were scanned"


def query_the_ui(dagster_home: Path, tmp_path: Path) -> str:
    """Start the real dagster-webserver on the test's instance and read what the UI reads."""
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    process = start_webserver(dagster_home, {}, tmp_path / "webserver.log", port)
    try:

        def answers() -> bool:
            try:
                return "fraud_dagster" in graphql_text(
                    base_url,
                    "{ workspaceOrError { ... on Workspace { locationEntries { name "
                    "locationOrLoadError { __typename } } } } }",
                ) and "RepositoryLocation" in graphql_text(
                    base_url,
                    "{ workspaceOrError { ... on Workspace { locationEntries { "
                    "locationOrLoadError { __typename } } } } }",
                )
            except OSError:
                return False

        wait_until(answers, 180, "dagster-webserver serving the code location", 1)
        selector = {"repositoryLocationName": "fraud_dagster", "repositoryName": "__repository__"}
        resources = graphql_text(base_url, RESOURCES_QUERY, {"selector": selector})
        assert "ResourceDetailsList" in resources, resources[:2000]
        return resources + graphql_text(base_url, RUNS_QUERY)
    finally:
        stop_dagster_process(process)


class EnvelopeRecorder(MaildirHandler):
    """Stores mail like the local server, and remembers each envelope's recipients."""

    def __init__(self, mail_dir: Path) -> None:
        super().__init__(mail_dir)
        self.recipients: list[list[str]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.recipients.append(list(envelope.rcpt_tos))
        return await super().handle_DATA(server, session, envelope)


SQL_LOOKING = [
    (
        "x'); DROP TABLE scored_transactions; --",
        "1 OR 1=1",
        "Robert'); DELETE FROM fraud_alerts;--",
    ),
    ('tx" OR ""="', "acc'--", "M-Z\u2028Bcc: victim@evil.example"),
    ("tx-%s-%(x)s-:param", "acc;SELECT 1", "Shop\u0085X-Evil: 1"),
]


def test_message_fields_cannot_change_headers_or_recipients_and_sql_looking_values_round_trip(
    settings: Settings,
    instance: dg.DagsterInstance,
    smtp_server: LocalSmtpServer,
    database_url: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    smtp_server.stop()
    recorder = EnvelopeRecorder(tmp_path / "recorded-mail")
    with serving(recorder, smtp_server.port):
        messages, frauds, _ = known_transactions()
        renamed = dict(zip(sorted(frauds), SQL_LOOKING, strict=True))
        for message in messages:
            if message["transaction_id"] in renamed:
                tid, account, merchant = renamed[message["transaction_id"]]
                message.update(transaction_id=tid, account_id=account, merchant=merchant)
        produce(settings, messages)
        defs = build_definitions(settings)
        caplog.set_level("INFO")
        (request,) = evaluate_sensor(defs, settings, instance, cursor=None).run_requests
        result = run_request(request, instance)
        assert result.success
        emails = MailBox(recorder.mail_dir).wait_for(len(frauds))

    stored = {
        row["transaction_id"]: row for row in table_rows(database_url, schema.scored_transactions)
    }
    for tid, account, merchant in SQL_LOOKING:
        assert (stored[tid]["account_id"], stored[tid]["merchant"]) == (account, merchant)
    assert len(stored) == len(messages)  # the table is intact and complete
    alerted = {row["transaction_id"] for row in table_rows(database_url, schema.fraud_alerts)}
    assert {tid for tid, _, _ in SQL_LOOKING} <= alerted
    record_labels(
        create_engine(database_url),
        [
            {
                "transaction_id": SQL_LOOKING[0][0],
                "is_fraud": True,
                "labeled_by": "o'brien",
                "source": "analyst",
            }
        ],
    )
    (label,) = table_rows(database_url, schema.fraud_labels)
    assert (label["transaction_id"], label["labeled_by"]) == (SQL_LOOKING[0][0], "o'brien")

    expected_recipients = sorted(settings.alert_recipients)
    assert recorder.recipients and all(
        sorted(rcpt) == expected_recipients for rcpt in recorder.recipients
    )
    for email in emails:
        assert email["Bcc"] is None and email["Cc"] is None and email["X-Evil"] is None
        assert email["To"] == ", ".join(settings.alert_recipients)
        assert len(email.get_all("Subject")) == 1
        assert "\n" not in email["Subject"] and "\u2028" not in email["Subject"]
    by_id = {email["X-Fraud-Transaction-Id"]: email for email in emails}
    for tid, _, _ in SQL_LOOKING:
        assert tid in by_id[tid].get_content()  # the body shows the id exactly

    logs = caplog.text + "".join(record.user_message for record in instance.all_logs(result.run_id))
    for _, account, _ in SQL_LOOKING:
        assert account not in logs, "account ids appear only masked in logs"
    for message in messages:
        assert f"(account {message['account_id']})" not in logs
    assert "alert sent for transaction" in logs
    assert "(account ***" in logs
