"""Logging of the CLI and the local services: stderr plus a rotating file under var/log/."""

from __future__ import annotations

import logging
import logging.handlers
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(
    log_dir: Path, level: str = "INFO", file_name: str = "fraud-dagster.log"
) -> None:
    log_dir.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    root.setLevel(level.upper())
    for handler in list(root.handlers):
        root.removeHandler(handler)
    stderr = logging.StreamHandler()
    stderr.setFormatter(logging.Formatter(FORMAT))
    to_file = logging.handlers.RotatingFileHandler(
        log_dir / file_name, maxBytes=10 * 1024 * 1024, backupCount=3
    )
    to_file.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(stderr)
    root.addHandler(to_file)
    # kafka-python is chatty at INFO about every connection; alembic about every schema stamp
    # of the in-memory Dagster instance that initializing resources outside a run creates.
    logging.getLogger("kafka").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
