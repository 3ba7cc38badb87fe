"""Logging of the CLI and the local services: stderr plus a rotating file under var/log/."""

from __future__ import annotations

import logging
import logging.handlers
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_FILE = "fraud-dagster.log"

# Libraries whose own lines stay out of the terminal (the log file keeps them): kafka-python
# logs each failed connection attempt at ERROR and WARNING -- twenty lines before the CLI's one
# "cannot reach Kafka" when the broker is down.
TERMINAL_QUIET_LOGGERS = ("kafka",)


class LibraryChatterFilter(logging.Filter):
    """Drop records of `loggers` (and their children) below CRITICAL, counting them."""

    def __init__(self, loggers: tuple[str, ...] = TERMINAL_QUIET_LOGGERS) -> None:
        super().__init__()
        self.loggers = loggers
        self.dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.name
        if record.levelno >= logging.CRITICAL or not any(
            name == logger or name.startswith(logger + ".") for logger in self.loggers
        ):
            return True
        self.dropped += 1
        return False


def configure_logging(
    log_dir: Path, level: str = "INFO", file_name: str = LOG_FILE
) -> LibraryChatterFilter | None:
    """Log to stderr and `log_dir/file_name`; returns the terminal's library filter, if any.

    Below DEBUG the libraries' lines (TERMINAL_QUIET_LOGGERS) go to the file only; at DEBUG
    the terminal shows them too.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    root.setLevel(level.upper())
    for handler in list(root.handlers):
        root.removeHandler(handler)
    stderr = logging.StreamHandler()
    stderr.setFormatter(logging.Formatter(FORMAT))
    chatter = None
    if root.level > logging.DEBUG:
        chatter = LibraryChatterFilter()
        stderr.addFilter(chatter)
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
    return chatter
