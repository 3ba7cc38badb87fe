"""A local PostgreSQL server (Debian's binaries) for the demo, the tests and the load test.

`initdb` on first use with a random password (kept in the data directory, mode 0600), then
`pg_ctl start` on 127.0.0.1 and a free or chosen port. PostgreSQL refuses to run as root, so
when we are root the server runs as the `postgres` system user (created by Debian's package).
Two databases are created: one for the application, one for the Dagster instance storage.
"""

from __future__ import annotations

import glob
import logging
import os
import pwd
import re
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from fraud_dagster.errors import LocalServiceError
from fraud_dagster.local_services.process import free_port, port_is_open

logger = logging.getLogger(__name__)

SUPERUSER = "fraud"
APP_DATABASE = "fraud"
DAGSTER_DATABASE = "dagster"
_DATABASE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def postgres_bin_dir() -> Path:
    """Where initdb/pg_ctl live: Debian keeps them off PATH, in /usr/lib/postgresql/N/bin."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    if candidates:
        return Path(candidates[0]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).resolve().parent
    raise LocalServiceError(
        "PostgreSQL server binaries not found; "
        "install them (Debian: `apt-get install -y postgresql`)"
    )


@dataclass
class LocalPostgres:
    """One PostgreSQL cluster under `base_dir`, listening on 127.0.0.1:`port`."""

    base_dir: Path
    port: int = 5433
    host: str = "127.0.0.1"

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    @property
    def _password_file(self) -> Path:
        return self.base_dir / "password"

    @property
    def _log_file(self) -> Path:
        return self.base_dir / "postgres.log"

    def _run_as(self) -> str | None:
        """The user the server must run as: `postgres` when we are root, else ourselves."""
        if os.geteuid() != 0:
            return None
        try:
            pwd.getpwnam("postgres")
        except KeyError as exc:
            raise LocalServiceError(
                "running as root, but there is no `postgres` user to run the server as; "
                "install Debian's postgresql package"
            ) from exc
        return "postgres"

    def _command(self, tool: str, *args: str) -> list[str]:
        command = [str(postgres_bin_dir() / tool), *args]
        user = self._run_as()
        return ["runuser", "-u", user, "--", *command] if user else command

    def _run(self, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            self._command(tool, *args), capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise LocalServiceError(
                f"{tool} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
            )
        return result

    def password(self) -> str:
        return self._password_file.read_text().strip()

    def url(self, database: str = APP_DATABASE, driver: str = "postgresql+psycopg2") -> str:
        """SQLAlchemy URL with the password: treat it as a secret (set it through an env var)."""
        password = quote(self.password(), safe="")
        return f"{driver}://{SUPERUSER}:{password}@{self.host}:{self.port}/{database}"

    def _require_reachable_by(self, user: str) -> None:
        """Fail with the directory to open when `user` cannot enter `base_dir`'s parent: initdb
        would fail with a bare "Permission denied" (e.g. a clone under root's 0700 home)."""

        def enters(path: Path) -> bool:
            test = ["runuser", "-u", user, "--", "test", "-x", str(path)]
            return subprocess.run(test, capture_output=True, check=False).returncode == 0

        parent = self.base_dir.resolve().parent
        if enters(parent):
            return
        blocker = next((p for p in reversed([parent, *parent.parents]) if not enters(p)), parent)
        raise LocalServiceError(
            f"PostgreSQL runs as `{user}` here (we are root), which cannot enter {blocker} "
            f"(mode {blocker.stat().st_mode & 0o777:04o}): put its data under another directory "
            f"(--data-dir, or FRAUD_VAR_DIR, e.g. under /var/tmp) or let others enter that one "
            f"(chmod o+x)"
        )

    def _initdb(self) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        user = self._run_as()
        if user:
            self._require_reachable_by(user)
        password = secrets.token_urlsafe(24)
        _write_private(self._password_file, password)
        pwfile = self.base_dir / "initdb-pwfile"
        _write_private(pwfile, password)
        if user:
            entry = pwd.getpwnam(user)
            for path in (self.base_dir, pwfile):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        try:
            self._run(
                "initdb",
                "-D",
                str(self.data_dir),
                "-U",
                SUPERUSER,
                f"--pwfile={pwfile}",
                "--auth-local=scram-sha-256",
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
            )
        finally:
            pwfile.unlink(missing_ok=True)

    def is_running(self) -> bool:
        if not (self.data_dir / "postmaster.pid").exists():
            return False
        result = subprocess.run(
            self._command("pg_ctl", "status", "-D", str(self.data_dir)),
            capture_output=True,
            text=True,
            check=False,
        )
        return result.returncode == 0

    def start(self, timeout_seconds: int = 60) -> None:
        if self.is_running():
            logger.info("PostgreSQL already running on %s:%d", self.host, self.port)
            return
        if port_is_open(self.host, self.port):
            raise LocalServiceError(f"port {self.port} on {self.host} is taken by another process")
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        options = (
            f"-p {self.port} -c listen_addresses={self.host} -c unix_socket_directories='' "
            "-c max_connections=200 -c fsync=on"
        )
        self._run(
            "pg_ctl",
            "start",
            "-D",
            str(self.data_dir),
            "-l",
            str(self._log_file),
            "-o",
            options,
            "-w",
            "-t",
            str(timeout_seconds),
        )
        self._create_databases()
        logger.info("PostgreSQL is up on %s:%d (data in %s)", self.host, self.port, self.data_dir)

    def running_port(self) -> int | None:
        """The port of the running server, from its postmaster.pid (line 4), or None."""
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return None
        return int(lines[3]) if len(lines) > 3 and lines[3].strip().isdigit() else None

    def _admin(self, create: tuple[str, ...] = (), drop: tuple[str, ...] = ()) -> None:
        """Create missing / drop existing databases. DDL takes no bound parameters, so every
        name is checked against a strict pattern first."""
        import sqlalchemy as sa

        names = [self._checked(name) for name in (*create, *drop)]
        engine = sa.create_engine(self.url("postgres"), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                existing = set(conn.execute(sa.text("SELECT datname FROM pg_database")).scalars())
                for name in names[: len(create)]:
                    if name not in existing:
                        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
                for name in names[len(create) :]:
                    if name in existing:
                        conn.execute(sa.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        finally:
            engine.dispose()

    @staticmethod
    def _checked(name: str) -> str:
        if not _DATABASE_NAME.fullmatch(name):
            raise LocalServiceError(
                f"database name {name!r} must be lower-case letters, digits and _ (at most 63)"
            )
        return name

    def create_database(self, name: str) -> str:
        """Create database `name` if missing (the tests' fresh database per test) and return
        its URL."""
        self._admin(create=(name,))
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop database `name`, closing its connections (test teardown)."""
        self._admin(drop=(name,))

    def _create_databases(self) -> None:
        self._admin(create=(APP_DATABASE, DAGSTER_DATABASE))

    def stop(self) -> bool:
        if not self.is_running():
            return False
        self._run("pg_ctl", "stop", "-D", str(self.data_dir), "-m", "fast", "-w")
        logger.info("stopped PostgreSQL on %s:%d", self.host, self.port)
        return True


@contextmanager
def temporary_postgres(prefix: str = "fraud-pg-") -> Iterator[LocalPostgres]:
    """A throw-away server on a free port, for tests and benchmarks; removed afterwards.

    Its directory is a fresh one under the system temp dir, opened to others (0755): when we
    are root the server runs as `postgres`, which could not enter a private (0700) parent.
    """
    base = Path(tempfile.mkdtemp(prefix=prefix))
    base.chmod(0o755)
    server = LocalPostgres(base_dir=base / "pg", port=free_port())
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


def _write_private(path: Path, text: str) -> None:
    """Write `text` to a file only its owner can read, from its first byte on: `base_dir` is
    open to others (the server's user must enter it), so a file created with the umask's mode
    and narrowed afterwards could be read in between."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        os.fchmod(handle.fileno(), 0o600)
        handle.write(text)
