"""`fraud-dagster postgres` and `fraud-dagster instance --postgres` against a real local server."""

from __future__ import annotations

import os
import shlex
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa

from fraud_dagster import cli
from fraud_dagster.errors import LocalServiceError
from fraud_dagster.local_services.postgres import LocalPostgres, postgres_bin_dir
from fraud_dagster.local_services.process import free_port
from fraud_dagster_tests.operations_support import require

pytestmark = pytest.mark.postgres


def run_cli(*argv: str) -> int:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--log-level", "WARNING", *argv])
    return exit_info.value.code


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    try:
        postgres_bin_dir()
    except LocalServiceError:
        require(False, "PostgreSQL server binaries not found (scripts/setup.sh installs them)")
    monkeypatch.setenv("FRAUD_VAR_DIR", str(tmp_path / "var"))
    base = Path(tempfile.mkdtemp(prefix="fraud-pg-cli-"))
    base.chmod(0o755)  # the server runs as `postgres` when the tests run as root
    yield base / "pg"
    run_cli("postgres", "stop", "--data-dir", str(base / "pg"))
    shutil.rmtree(base, ignore_errors=True)


def test_postgres_start_env_instance_status_stop(
    data_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    port = free_port()
    assert run_cli("postgres", "start", "--port", str(port), "--data-dir", str(data_dir)) == 0
    assert f"127.0.0.1:{port}" in capsys.readouterr().out

    assert run_cli("postgres", "env", "--data-dir", str(data_dir)) == 0
    exported = dict(
        shlex.split(line.removeprefix("export "))[0].split("=", 1)
        for line in capsys.readouterr().out.splitlines()
    )
    assert set(exported) == {
        "FRAUD_DATABASE_URL",
        "DAGSTER_PG_HOST",
        "DAGSTER_PG_PORT",
        "DAGSTER_PG_USERNAME",
        "DAGSTER_PG_PASSWORD",
        "DAGSTER_PG_DB",
    }
    assert exported["DAGSTER_PG_PORT"] == str(port)
    engine = sa.create_engine(exported["FRAUD_DATABASE_URL"])
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT current_database()")).scalar_one() == "fraud"
    engine.dispose()

    home = tmp_path / "dagster_home"
    assert run_cli("instance", "--postgres", "--home", str(home)) == 0
    config = (home / "dagster.yaml").read_text()
    assert "QueuedRunCoordinator" in config and "postgres_db" in config
    assert exported["DAGSTER_PG_PASSWORD"] not in config  # credentials stay in the environment
    for name, value in exported.items():
        monkeypatch.setenv(name, value)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        assert instance.get_runs() == []

    assert run_cli("postgres", "status", "--data-dir", str(data_dir)) == 0
    status = capsys.readouterr().out
    assert "running" in status and exported["DAGSTER_PG_PASSWORD"] not in status
    assert run_cli("postgres", "stop", "--data-dir", str(data_dir)) == 0
    assert run_cli("postgres", "status", "--data-dir", str(data_dir)) == 3


@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs the server as another user")
def test_a_data_dir_the_postgres_user_cannot_enter_is_named_before_initdb(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """As root the server runs as `postgres`; under a private (0700) directory, such as root's
    home, initdb used to fail with a bare "Permission denied"."""
    private = data_dir.parent / "private"
    private.mkdir(mode=0o700)
    inside = private / "pg"

    code = run_cli("postgres", "start", "--port", str(free_port()), "--data-dir", str(inside))

    said = capsys.readouterr().err
    assert code == 1
    assert f"cannot enter {private} (mode 0700)" in said
    assert "chmod o+x" in said
    assert not (inside / "data").exists()  # initdb did not run


def test_the_password_files_are_private_while_initdb_reads_them(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The data directory is open to others (the server's user enters it as root), so the
    superuser password must be in files only their owner reads from the moment they exist: a
    copy made with the umask's mode (0644) was readable by anyone while initdb ran."""
    modes: dict[str, int] = {}
    run = LocalPostgres._run

    def run_and_look(self: LocalPostgres, tool: str, *args: str) -> object:
        if tool == "initdb":
            modes.update({path.name: path.stat().st_mode for path in self.base_dir.iterdir()})
        return run(self, tool, *args)

    monkeypatch.setattr(LocalPostgres, "_run", run_and_look)
    port = str(free_port())
    assert run_cli("postgres", "start", "--port", port, "--data-dir", str(data_dir)) == 0

    assert {"password", "initdb-pwfile"} <= set(modes)
    readable_by_others = {name: oct(mode & 0o777) for name, mode in modes.items() if mode & 0o077}
    assert readable_by_others == {}
    assert not (data_dir / "initdb-pwfile").exists()
