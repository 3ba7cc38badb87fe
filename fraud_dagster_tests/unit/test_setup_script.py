"""scripts/setup.sh refuses an interpreter outside pyproject.toml's requires-python before it
installs anything (run on a copy of the script beside a pyproject.toml that no Python meets)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from fraud_dagster.settings import PROJECT_ROOT


def run_setup_against(
    tmp_path: Path, requires: str, path_first: Path | None = None
) -> subprocess.CompletedProcess[str]:
    (tmp_path / "scripts").mkdir(exist_ok=True)
    shutil.copy(PROJECT_ROOT / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    (tmp_path / "pyproject.toml").write_text(f'[project]\nrequires-python = "{requires}"\n')
    return subprocess.run(
        ["bash", "scripts/setup.sh"],
        check=False,
        cwd=tmp_path,
        env={
            **os.environ,
            "PYTHON": sys.executable,
            "VENV": "venv",
            "PATH": os.pathsep.join([str(path_first or tmp_path), os.environ["PATH"]]),
        },
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_an_unsupported_python_is_refused_with_the_range_before_a_virtualenv_is_made(
    tmp_path: Path,
) -> None:
    done = run_setup_against(tmp_path, ">=3.99,<4.0")
    assert done.returncode == 1
    assert f"is Python {sys.version.split()[0]}; fraud_dagster needs >=3.99,<4.0" in done.stderr
    assert "run again with PYTHON set to a supported interpreter" in done.stderr
    assert not (tmp_path / "venv").exists()


def test_a_virtualenv_made_with_an_unsupported_python_is_named_for_removal(
    tmp_path: Path,
) -> None:
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "venv" / "bin" / "python").symlink_to(sys.executable)
    done = run_setup_against(tmp_path, ">=3.99,<4.0")
    assert done.returncode == 1
    assert "venv was made with it: remove venv" in done.stderr


def test_a_java_older_than_17_on_the_path_is_refused_before_anything_is_installed(
    tmp_path: Path,
) -> None:
    """Kafka 4 does not start on Java 11; setup says so instead of a broker failing later."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    java = bin_dir / "java"
    java.write_text("#!/bin/sh\necho 'openjdk version \"11.0.24\" 2024-07-16' >&2\n")
    java.chmod(0o755)
    supported = f">={sys.version_info.major}.{sys.version_info.minor},<4"
    done = run_setup_against(tmp_path, supported, path_first=bin_dir)
    assert done.returncode == 1
    assert "java on PATH is Java 11; Kafka 4 needs 17 or newer" in done.stderr
    assert not (tmp_path / "venv").exists()
