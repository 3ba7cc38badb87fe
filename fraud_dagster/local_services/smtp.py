"""A local SMTP server (aiosmtpd) that stores each received message as an .eml file.

Optional STARTTLS (with a self-signed certificate made on first use) and AUTH LOGIN/PLAIN
(credentials from the environment, never from the command line). Run in the foreground with
`python -m fraud_dagster.local_services.smtp`, or in the background with `fraud-dagster smtp start`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import signal
import ssl
import sys
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from fraud_dagster.errors import LocalServiceError
from fraud_dagster.local_services.process import ManagedProcess, port_is_open, wait_until

logger = logging.getLogger(__name__)

AUTH_USERNAME_ENV = "FRAUD_LOCAL_SMTP_USERNAME"
AUTH_PASSWORD_ENV = "FRAUD_LOCAL_SMTP_PASSWORD"


class MaildirHandler:
    """Writes every accepted message to `mail_dir` as `<utc time>-<id>.eml`, atomically."""

    def __init__(self, mail_dir: Path) -> None:
        self.mail_dir = mail_dir
        mail_dir.mkdir(parents=True, exist_ok=True)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%f")
        name = f"{stamp}-{uuid.uuid4().hex[:8]}.eml"
        tmp = self.mail_dir / f".{name}.tmp"
        content = envelope.original_content or envelope.content
        tmp.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        tmp.replace(self.mail_dir / name)
        return "250 Message accepted for delivery"


def self_signed_certificate(directory: Path, host: str = "127.0.0.1") -> tuple[Path, Path]:
    """(cert, key) PEM files for `host`, made once with `cryptography`."""
    cert_path, key_path = directory / "smtp-cert.pem", directory / "smtp-key.pem"
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fraud-dagster local SMTP")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=825))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(host))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


class _Authenticator:
    def __init__(self, username: str, password: str) -> None:
        self._username = username.encode()
        self._password = password.encode()

    def __call__(
        self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        ok = (
            isinstance(auth_data, LoginPassword)
            and auth_data.login == self._username
            and auth_data.password == self._password
        )
        return AuthResult(success=ok, handled=False)


@dataclass
class LocalSmtpServer:
    """aiosmtpd on `host:port`, optionally with STARTTLS and required AUTH."""

    mail_dir: Path
    port: int = 8025
    host: str = "127.0.0.1"
    starttls: bool = False
    cert_dir: Path | None = None
    username: str | None = None
    password: str | None = None

    def __post_init__(self) -> None:
        self._controller: Controller | None = None

    def start(self) -> None:
        kwargs: dict[str, Any] = {}
        if self.starttls:
            cert, key = self_signed_certificate(self.cert_dir or self.mail_dir.parent / "smtp-tls")
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(cert, key)
            kwargs.update(tls_context=context, require_starttls=True)
        if self.username:
            kwargs.update(
                authenticator=_Authenticator(self.username, self.password or ""),
                auth_required=True,
                auth_require_tls=self.starttls,
            )
        self._controller = Controller(
            MaildirHandler(self.mail_dir), hostname=self.host, port=self.port, **kwargs
        )
        self._controller.start()
        logger.info(
            "SMTP server on %s:%d (starttls=%s, auth=%s) writing to %s",
            self.host,
            self.port,
            self.starttls,
            bool(self.username),
            self.mail_dir,
        )

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None


def background_process(var_dir: Path) -> ManagedProcess:
    return ManagedProcess(
        "smtp", var_dir / "run" / "smtp.pid", marker="fraud_dagster.local_services.smtp"
    )


def start_background(
    var_dir: Path, mail_dir: Path, port: int, host: str = "127.0.0.1", starttls: bool = False
) -> int:
    """Start the server as a detached process (credentials pass through the environment).

    Refused when another process holds the port: the new server would fail to bind and exit
    while that other one answered, and the alerts would go to it."""
    if port_is_open(host, port):
        raise LocalServiceError(
            f"port {port} on {host} is taken by another process; stop it, or start the SMTP "
            "server on a free port (`fraud-dagster smtp start --port PORT`) and set "
            "FRAUD_SMTP_PORT to match"
        )
    process = background_process(var_dir)
    command = [
        sys.executable,
        "-m",
        "fraud_dagster.local_services.smtp",
        "--host",
        host,
        "--port",
        str(port),
        "--mail-dir",
        str(mail_dir),
        "--cert-dir",
        str(var_dir / "smtp-tls"),
    ]
    if starttls:
        command.append("--starttls")
    log_file = var_dir / "log" / "smtp.log"
    pid = process.start(command, log_file=log_file)

    def answering() -> bool:
        if not process.is_running():
            raise LocalServiceError(f"the SMTP server exited as it started; see {log_file}")
        return port_is_open(host, port)

    wait_until(answering, 20, f"SMTP server answering on {host}:{port}")
    return pid


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8025)
    parser.add_argument("--mail-dir", type=Path, required=True)
    parser.add_argument("--cert-dir", type=Path, default=None)
    parser.add_argument("--starttls", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    server = LocalSmtpServer(
        mail_dir=args.mail_dir,
        port=args.port,
        host=args.host,
        starttls=args.starttls,
        cert_dir=args.cert_dir,
        username=os.environ.get(AUTH_USERNAME_ENV),
        password=os.environ.get(AUTH_PASSWORD_ENV),
    )
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    signal.signal(signal.SIGINT, lambda *_: stopped.set())
    server.start()
    stopped.wait()
    server.stop()


if __name__ == "__main__":
    main()
