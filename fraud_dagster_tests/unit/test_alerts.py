"""Alert rendering: fields, probability, and no way to inject headers; the addresses and
password the SMTP resource takes."""

from __future__ import annotations

import email
import email.policy
import re
import smtplib
from datetime import datetime

import pytest

from fraud_dagster.alert_delivery import smtp_session_count
from fraud_dagster.alerts import (
    AlertDelivery,
    MessageRefusedError,
    SmtpMailer,
    SmtpSettings,
    alert_message_id,
    feature_lines,
    header_safe,
    mask_account,
    render_alert,
)
from fraud_dagster.errors import AlertDeliveryError, ConfigurationError
from fraud_dagster.resources import SmtpResource

ALERT = {
    "transaction_id": "tx-1",
    "account_id": "ACC-123456",
    "merchant": "Coffee Shop",
    "transaction_amount": 1234.5,
    "transaction_date": datetime(2026, 3, 4, 5, 6, 7),
    "fraud_probability": 0.91234567,
    "threshold": 0.5,
    "model_version": "v1",
}


def parsed(message) -> email.message.EmailMessage:
    return email.message_from_bytes(message.as_bytes(), policy=email.policy.default)


def test_email_carries_the_fields_and_probability() -> None:
    message = parsed(render_alert(ALERT, "from@x", ["a@x", "b@x"]))
    body = message.get_content()
    for text in (
        "tx-1",
        "ACC-123456",
        "Coffee Shop",
        "1,234.50",
        "2026-03-04 05:06:07",
        "0.9123",
        "v1",
    ):
        assert text in body
    assert message["X-Fraud-Transaction-Id"] == "tx-1"
    assert float(message["X-Fraud-Probability"]) == pytest.approx(0.912346)
    assert message["To"] == "a@x, b@x"
    assert "91%" in message["Subject"]


FEATURES = {
    "transaction_amount": 812.5,
    "during_weekend": 1.0,
    "during_night": 0.0,
    "account_tx_count_1d": 3.0,
    "account_mean_amount_1d": 320.1,
    "account_tx_count_7d": 9.0,
    "account_mean_amount_7d": 140.25,
    "account_tx_count_30d": 31.0,
    "account_mean_amount_30d": 62.5,
    "merchant_tx_count_1d": 12.0,
    "merchant_risk_1d": 0.0,
    "merchant_tx_count_7d": 1280.0,
    "merchant_risk_7d": 0.05,
    "merchant_tx_count_30d": 4000.0,
    "merchant_risk_30d": 0.0125,
}


def test_email_shows_what_the_model_saw_as_a_table() -> None:
    body = parsed(
        render_alert({**ALERT, "features": FEATURES, "history_complete": True}, "f@x", ["a@x"])
    ).get_content()
    lines = body.splitlines()
    start = lines.index("What the model saw (its inputs):")
    assert lines[start + 1].split() == ["1", "day", "7", "days", "30", "days"]
    table = {line[:30].strip(): line[30:].split() for line in lines[start + 2 : start + 6]}
    assert table == {
        "Account transactions": ["3", "9", "31", "(this", "one", "included)"],
        "Account mean amount": ["320.10", "140.25", "62.50"],
        "Merchant transactions": ["12", "1,280", "4,000"],
        "Merchant confirmed fraud": ["0.0%", "5.0%", "1.2%"],
    }
    assert "This amount is 13.0 x the account's 30-day mean. On a weekend." in body
    assert "INCOMPLETE" not in body
    assert body.index("What the model saw") < body.index("fraud-dagster label")


def test_incomplete_history_is_said_and_unknown_features_are_left_out() -> None:
    partial = {"transaction_amount": 50.0, "during_night": 1.0, "account_tx_count_1d": 2.0}
    lines = feature_lines(partial, history_complete=False)
    assert lines[0] == "What the model saw (its inputs):"
    assert not any("Account" in line or "Merchant" in line for line in lines)  # incomplete rows
    assert "  At night." in lines
    assert any("History INCOMPLETE" in line for line in lines)
    # Alerts written before the features were stored (or by a model without them): no section.
    assert feature_lines(None, None) == [] and feature_lines({}, False) == []
    assert "What the model saw" not in parsed(render_alert(ALERT, "f@x", ["a@x"])).get_content()


@pytest.mark.parametrize("field", ["transaction_id", "merchant"])
@pytest.mark.parametrize(
    "payload", ["x\r\nBcc: victim@evil", "x\nSubject: pwned", "x\rX-Evil: 1", "x\u2028Bcc: y"]
)
def test_header_injection_is_neutralised(field: str, payload: str) -> None:
    raw = render_alert({**ALERT, field: payload}, "from@x", ["a@x"]).as_bytes()
    message = parsed(render_alert({**ALERT, field: payload}, "from@x", ["a@x"]))
    assert message["Bcc"] is None
    assert message["X-Evil"] is None
    assert len(message.get_all("Subject")) == 1
    header_lines = raw.split(b"\n\n", 1)[0].splitlines()
    names = [line.split(b":", 1)[0] for line in header_lines if not line[:1].isspace()]
    assert sorted(names) == sorted(
        [
            b"From",
            b"To",
            b"Subject",
            b"Message-ID",
            b"Date",
            b"X-Fraud-Transaction-Id",
            b"X-Fraud-Probability",
            b"Content-Type",
            b"Content-Transfer-Encoding",
            b"MIME-Version",
        ]
    )


def test_message_id_is_stable_per_transaction() -> None:
    assert alert_message_id("tx-1") == alert_message_id("tx-1")
    assert alert_message_id("tx-1") != alert_message_id("tx-2")
    assert "\n" not in alert_message_id("a\nb")


def test_helpers() -> None:
    assert header_safe("a\r\nb\tc") == "a b c"
    assert header_safe("x" * 200, 10).endswith("…")
    assert mask_account("ACC-123456") == "******3456"
    assert mask_account("12") == "**"


@pytest.mark.parametrize(
    ("alerts", "max_sessions", "sessions"),
    [(1, 4, 1), (25, 4, 1), (26, 4, 2), (75, 4, 3), (100, 4, 4), (2_000, 4, 4), (2_000, 1, 1)],
)
def test_a_delivery_opens_one_more_smtp_session_per_25_alerts_up_to_the_limit(
    alerts: int, max_sessions: int, sessions: int
) -> None:
    assert smtp_session_count(alerts, max_sessions) == sessions


def test_a_delivery_needs_at_least_one_session() -> None:
    with pytest.raises(ConfigurationError, match="at least 1"):
        AlertDelivery(SmtpSettings("127.0.0.1", 25), "a@b", ("c@d",), max_sessions=0)


class RefusingClient:
    """Stands in for `smtplib.SMTP` after the server answered a message with `error`; `sock` is
    None when smtplib closed the connection (a 421 reply), `rset_reply` is its answer to RSET."""

    def __init__(
        self,
        error: Exception,
        connected: bool = True,
        rset_reply: tuple[int, bytes] | Exception = (250, b"2.0.0 OK"),
    ) -> None:
        self.error, self.rset_reply = error, rset_reply
        self.sock = object() if connected else None

    def send_message(self, message) -> dict:
        raise self.error

    def rset(self) -> tuple[int, bytes]:
        if self.sock is None:
            raise smtplib.SMTPServerDisconnected("please run connect() first")
        if isinstance(self.rset_reply, Exception):
            raise self.rset_reply
        return self.rset_reply

    def quit(self) -> None:
        pass


def send_through(client: RefusingClient) -> None:
    mailer = SmtpMailer(SmtpSettings("127.0.0.1", 25))
    mailer._client = client  # type: ignore[assignment]  # the session as if connected
    mailer.send(render_alert(ALERT, "from@x", ["a@x"]))


@pytest.mark.parametrize(
    "error",
    [
        smtplib.SMTPRecipientsRefused({"a@x": (550, b"5.1.1 no such user")}),
        smtplib.SMTPSenderRefused(553, b"5.7.1 sender not allowed", "from@x"),
        smtplib.SMTPDataError(554, b"5.7.1 message rejected as spam"),
        smtplib.SMTPNotSupportedError("SMTPUTF8 not supported"),
    ],
    ids=["rcpt", "mail", "data", "smtputf8"],
)
def test_a_message_refused_on_a_usable_session_is_a_refusal_of_that_message_only(
    error: Exception,
) -> None:
    with pytest.raises(MessageRefusedError, match="refused the message") as raised:
        send_through(RefusingClient(error))
    assert raised.value.__cause__ is error


@pytest.mark.parametrize(
    "client",
    [
        RefusingClient(smtplib.SMTPDataError(421, b"4.3.0 closing"), connected=False),
        RefusingClient(
            smtplib.SMTPDataError(554, b"5.7.1 no"),
            rset_reply=smtplib.SMTPServerDisconnected("Connection unexpectedly closed"),
        ),
        RefusingClient(smtplib.SMTPRecipientsRefused({"a@x": (550, b"no")}), rset_reply=(421, b"")),
        RefusingClient(smtplib.SMTPServerDisconnected("Connection unexpectedly closed")),
        RefusingClient(TimeoutError("timed out")),
        RefusingClient(ConnectionResetError(104, "Connection reset by peer")),
    ],
    ids=["421-closed", "rset-disconnected", "rset-refused", "disconnected", "timeout", "reset"],
)
def test_a_broken_session_is_not_taken_for_a_refusal_of_one_message(
    client: RefusingClient,
) -> None:
    with pytest.raises(AlertDeliveryError) as raised:
        send_through(client)
    assert not isinstance(raised.value, MessageRefusedError)


def smtp_resource(**addresses: object) -> SmtpResource:
    fields: dict[str, object] = {
        "sender": "fraud-alerts@bank.example",
        "recipients": ["risk-analysts@bank.example"],
        "operator_recipients": ["ops@bank.example"],
        **addresses,
    }
    return SmtpResource(host="127.0.0.1", port=25, **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value", "said"),
    [
        ("sender", "jürgen@bank.example", "SMTP sender (FRAUD_SMTP_SENDER): 'jürgen@bank.example'"),
        ("sender", "Fraud Alerts <alerts@bank.example>", "not a bare address"),
        ("recipients", ["a@bank.example", "analyst@bänk.example"], "other than ASCII"),
        ("recipients", ["a@bank.example", "b@"], "FRAUD_ALERT_RECIPIENTS): 'b@' is not a bare"),
        ("recipients", ["a b@bank.example"], "not a bare address"),
        ("recipients", [], "FRAUD_ALERT_RECIPIENTS): no address given"),
        ("recipients", ["x" * 250 + "@bank.example"], "longer than 254"),
        ("operator_recipients", ["ops@bank.example\r\nBcc: x@evil"], "FRAUD_OPERATOR_RECIPIENTS"),
    ],
)
def test_an_address_smtp_cannot_carry_is_refused_where_it_is_configured(
    field: str, value: object, said: str
) -> None:
    """Before: accepted, then every alert failed at send time (a non-ASCII address crashed the
    delivery; a long list was cut short in the To header, from which smtplib takes the
    envelope)."""
    with pytest.raises(ConfigurationError, match=re.escape(said)):
        smtp_resource(**{field: value})


def test_plain_addresses_are_accepted() -> None:
    addresses = ["risk-analysts@localhost", "first.last+fraud@mail.bank-1.example", "o'neil@b.c"]
    resource = smtp_resource(sender="alerts@localhost", recipients=addresses)
    assert resource.alert_delivery().recipients == tuple(addresses)


def test_every_recipient_is_in_the_to_header_however_many() -> None:
    recipients = [f"risk-analyst-{i:03d}@bank.example" for i in range(100)]
    assert len(", ".join(recipients)) > 2_000  # what the header was cut at before
    message = parsed(render_alert(ALERT, "from@bank.example", recipients))
    assert [address.addr_spec for address in message["To"].addresses] == recipients
    assert all(len(line) <= 998 for line in message.as_string().splitlines())


def test_a_password_smtp_auth_cannot_carry_is_refused_without_showing_it() -> None:
    with pytest.raises(ConfigurationError, match="other than ASCII") as raised:
        SmtpSettings("127.0.0.1", 25, username="alerts", password="pässwort-Geheim")
    assert "pässwort" not in str(raised.value) and "ä" not in str(raised.value)
