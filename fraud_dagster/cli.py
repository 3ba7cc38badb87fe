"""`fraud-dagster`: local services, producing transactions, training, labels and the demo."""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from fraud_dagster.errors import ConfigurationError, FraudDagsterError
from fraud_dagster.logging_setup import LOG_FILE, configure_logging
from fraud_dagster.settings import PROJECT_ROOT, Settings, load_settings, topic_name_problem

if TYPE_CHECKING:
    from fraud_dagster.stream_status import StreamStatus

logger = logging.getLogger("fraud_dagster.cli")


def _kafka_options(settings: Settings) -> dict:
    from fraud_dagster.resources import resolved_resources

    return resolved_resources(settings)["kafka"].client_options()


def _local_kafka(settings: Settings, args: argparse.Namespace):
    from fraud_dagster.local_services.kafka import LocalKafka

    data_dir = (
        Path(args.data_dir) if getattr(args, "data_dir", None) else settings.var_dir / "kafka"
    )
    return LocalKafka(
        data_dir=data_dir,
        port=getattr(args, "port", None) or 9092,
        controller_port=getattr(args, "controller_port", None) or 9093,
    )


def cmd_kafka(settings: Settings, args: argparse.Namespace) -> int:
    broker = _local_kafka(settings, args)
    if args.action == "start":
        broker.start()
        print_line(f"Kafka is up at {broker.bootstrap_servers} (data in {broker.data_dir})")
    elif args.action == "stop":
        stopped = broker.stop()
        print_line("Kafka stopped" if stopped else "Kafka was not running (by our pid file)")
    else:
        running = broker.is_running()
        print_line(f"Kafka {'running' if running else 'not running'} ({broker.data_dir})")
        return 0 if running else 3
    return 0


def cmd_smtp(settings: Settings, args: argparse.Namespace) -> int:
    from fraud_dagster.local_services import smtp

    process = smtp.background_process(settings.var_dir)
    if args.action == "start":
        if process.is_running():
            print_line("SMTP server already running")
            return 0
        smtp.start_background(
            settings.var_dir,
            settings.mail_dir,
            port=args.port or settings.smtp_port,
            starttls=args.starttls,
        )
        print_line(
            f"SMTP server on 127.0.0.1:{args.port or settings.smtp_port}, "
            f"mail in {settings.mail_dir}"
        )
    elif args.action == "stop":
        print_line("SMTP server stopped" if process.stop() else "SMTP server was not running")
    else:
        running = process.is_running()
        print_line(f"SMTP server {'running' if running else 'not running'}")
        return 0 if running else 3
    return 0


def _local_postgres(settings: Settings, args: argparse.Namespace):
    from fraud_dagster.local_services.postgres import LocalPostgres

    base_dir = (
        Path(args.data_dir) if getattr(args, "data_dir", None) else settings.var_dir / "postgres"
    )
    server = LocalPostgres(base_dir=base_dir, port=getattr(args, "postgres_port", None) or 5433)
    server.port = server.running_port() or server.port  # env/status: the port it runs on
    return server


def postgres_env(server) -> dict[str, str]:
    """The variables that point the app (FRAUD_DATABASE_URL) and the Dagster instance
    (DAGSTER_PG_*) at the local server's two databases. They hold its password."""
    from fraud_dagster.instance_config import dagster_pg_env
    from fraud_dagster.local_services.postgres import DAGSTER_DATABASE

    return {
        "FRAUD_DATABASE_URL": server.url(),
        **dagster_pg_env(server.url(DAGSTER_DATABASE)),
    }


def cmd_postgres(settings: Settings, args: argparse.Namespace) -> int:
    server = _local_postgres(settings, args)
    if args.action == "start":
        server.start()
        print_line(
            f"PostgreSQL is up on {server.host}:{server.port} (data in {server.data_dir}); "
            'point the project at it with: eval "$(fraud-dagster postgres env)"'
        )
    elif args.action == "stop":
        stopped = server.stop()
        print_line("PostgreSQL stopped" if stopped else "PostgreSQL was not running")
    elif args.action == "env":
        if not server.is_running():
            print_line("# PostgreSQL is not running: fraud-dagster postgres start")
            return 3
        for name, value in postgres_env(server).items():
            print_line(f"export {name}={shlex.quote(value)}")
    else:
        running = server.is_running()
        where = f" on {server.host}:{server.port}" if running else ""
        print_line(
            f"PostgreSQL {'running' if running else 'not running'}{where} ({server.data_dir})"
        )
        return 0 if running else 3
    return 0


def cmd_instance(settings: Settings, args: argparse.Namespace) -> int:
    home = prepare_dagster_home(settings, Path(args.home) if args.home else None, args.postgres)
    storage = "PostgreSQL (DAGSTER_PG_* variables)" if args.postgres else "SQLite"
    print_line(f"wrote {home / 'dagster.yaml'} (storage: {storage}); export DAGSTER_HOME={home}")
    return 0


def cmd_topic(settings: Settings, args: argparse.Namespace) -> int:
    from fraud_dagster.kafka_io import ensure_topic

    ensure_topic(_kafka_options(settings), args.topic or settings.kafka_topic, args.partitions)
    print_line(
        f"topic {args.topic or settings.kafka_topic} has at least {args.partitions} partition(s)"
    )
    return 0


def cmd_produce(settings: Settings, args: argparse.Namespace) -> int:
    from fraud_dagster import producer

    topic = args.topic or settings.kafka_topic
    if args.from_csv:
        path = Path(args.from_csv)
        total = args.limit or producer.count_csv_rows(path)
        messages = producer.handbook_messages(path, limit=args.limit)
    else:
        messages = producer.synthetic_messages(args.count, seed=args.seed)
        total = len(messages)
    report = producer.produce(
        _kafka_options(settings),
        topic,
        messages,
        total=total,
        rate_per_second=args.rate,
        show_progress=not args.quiet,
    )
    print_line(
        f"sent {report.sent} transactions to {topic} in {report.seconds:.1f}s ({report.rate:.0f}/s)"
    )
    return 0


def cmd_train(settings: Settings, args: argparse.Namespace) -> int:
    from fraud_dagster.training import (
        DEFAULT_MODEL_KIND,
        build_estimator,
        load_labelled_csv,
        publish_model,
        simulated_training_data,
        train_model,
    )

    kind = args.kind or DEFAULT_MODEL_KIND
    build_estimator(kind)  # an unknown kind fails before the data is prepared
    if args.data:
        frame, source = load_labelled_csv(Path(args.data)), str(args.data)
    else:
        frame, source = simulated_training_data(args.days, args.seed)
    result = train_model(frame, kind=kind)
    entry = publish_model(
        Path(args.models_dir) if args.models_dir else settings.models_dir,
        result,
        source=source,
        make_default=args.default,
    )
    metrics = ", ".join(f"{k}={v:.3f}" for k, v in result.metrics.items())
    print_line(
        f"published model {entry.version} ({entry.file}, {entry.kind}); {metrics}; "
        f"threshold {entry.threshold:.3f}; reload_model promotes it once validated"
    )
    return 0


def cmd_label(settings: Settings, args: argparse.Namespace) -> int:
    from fraud_dagster.labels import record_analyst_label
    from fraud_dagster.resources import resolved_resources

    engine = resolved_resources(settings)["database"].get_engine()
    record_analyst_label(engine, args.transaction_id, args.fraud, args.by)
    print_line(
        f"recorded {args.transaction_id} as {'fraud' if args.fraud else 'genuine'} (by {args.by})"
    )
    return 0


def cmd_load_labels(settings: Settings, args: argparse.Namespace) -> int:
    from fraud_dagster.labels import load_replay_labels
    from fraud_dagster.resources import resolved_resources

    engine = resolved_resources(settings)["database"].get_engine()
    report = load_replay_labels(engine, Path(args.from_csv), args.as_of, args.delay_days)
    print_line(
        f"loaded {report.loaded} labels ({report.frauds} frauds) of transactions up to "
        f"{report.known_until:%Y-%m-%d %H:%M:%S} (as of {report.as_of:%Y-%m-%d %H:%M:%S}, "
        f"{args.delay_days}-day delay); {report.already_labelled} were labelled already"
    )
    return 0


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    from fraud_dagster.resources import resolved_resources
    from fraud_dagster.stream_status import render_status, stream_status

    resources = resolved_resources(settings)
    status = stream_status(
        resources["kafka"].client_options(),
        settings.kafka_topic,
        settings.kafka_consumer_group,
        resources["database"].get_engine(),
    )
    if any(p.gaps for p in status.partitions):
        status = _with_runs_if_readable(status, settings)
    for line in render_status(status, settings.dagster_ui_url):
        print_line(line)
    return 2 if args.check and status.needs_attention else 0


def _with_runs_if_readable(status: StreamStatus, settings: Settings) -> StreamStatus:
    """`status` with the runs of its unstored ranges, read from the Dagster instance at
    $DAGSTER_HOME (else the demo's); unchanged, with a warning, if there is none or it cannot be
    read: the status must answer while Dagster is down."""
    import dagster as dg

    from fraud_dagster.batching import SCORE_TRANSACTIONS_JOB
    from fraud_dagster.range_runs import with_batch_runs

    home = os.environ.get("DAGSTER_HOME") or str(settings.var_dir / "dagster")
    if not (Path(home) / "dagster.yaml").is_file():
        logger.warning("no Dagster instance at %s: the unstored ranges' runs are not shown", home)
        return status
    try:
        with dg.DagsterInstance.from_config(home) as instance:
            return with_batch_runs(status, instance, SCORE_TRANSACTIONS_JOB)
    except Exception as exc:  # any failure to read Dagster: the status still answers
        logger.warning(
            "cannot read the Dagster instance at %s (%s: %s): the unstored ranges' runs are "
            "not shown",
            home,
            type(exc).__name__,
            exc,
        )
        return status


def cmd_db(settings: Settings, args: argparse.Namespace) -> int:
    from fraud_dagster.resources import resolved_resources
    from fraud_dagster.storage.database import url_for_display

    engine = resolved_resources(settings)["database"].get_engine()
    print_line(f"schema ready on {url_for_display(engine.url)}")
    return 0


def prepare_dagster_home(
    settings: Settings, home: Path | None = None, postgres: bool = False
) -> Path:
    """A DAGSTER_HOME holding the repo's dagster.yaml (written anew so edits take effect), with
    the PostgreSQL storage section of dagster.postgres.yaml if asked."""
    from fraud_dagster.instance_config import write_dagster_home

    return write_dagster_home(home or settings.var_dir / "dagster", postgres=postgres)


def _stop_like_ctrl_c_on_termination() -> None:
    """`kill` (SIGTERM) or a closed terminal (SIGHUP) stops the demo the way Ctrl-C does.

    Python's default for both is to exit on the spot, and the broker, the SMTP server and
    `dagster dev` outlived the demo holding their ports, so the next demo could not start its
    UI. The first signal interrupts; later ones are ignored so that the stopping can finish.

    Ctrl-C (SIGINT) gets Python's own handler explicitly: a process started in the background
    by a non-interactive shell inherits SIGINT ignored, and Python then leaves it ignored, so
    `kill -INT` did nothing (and `dagster dev`, started from here, inherited the same).
    """

    def interrupt(signum: int, _frame: object) -> None:
        for ignored in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(ignored, signal.SIG_IGN)
        logger.info("%s received: stopping the demo", signal.Signals(signum).name)
        raise KeyboardInterrupt

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _refuse_remote_services(settings: Settings, local_kafka: str, postgres: bool) -> None:
    """The demo starts local services and sends simulated transactions: refuse to run while
    the environment points the pipeline elsewhere (the exports of "Pointing at existing
    infrastructure" still set), or the demo's transactions and alerts would go there."""
    problems = []
    if settings.kafka_bootstrap_servers != local_kafka:
        problems.append(
            f"FRAUD_KAFKA_BOOTSTRAP_SERVERS={settings.kafka_bootstrap_servers} is not the demo's "
            f"broker {local_kafka} (unset it: the demo's broker listens on 9092)"
        )
    if settings.kafka_security_protocol != "PLAINTEXT":
        problems.append(f"FRAUD_KAFKA_SECURITY_PROTOCOL={settings.kafka_security_protocol}")
    if settings.smtp_host not in ("127.0.0.1", "localhost"):
        problems.append(f"FRAUD_SMTP_HOST={settings.smtp_host}")
    if settings.secret_is_set("FRAUD_DATABASE_URL") and not postgres:
        from fraud_dagster.storage.database import parse_database_url

        try:
            host = parse_database_url(settings.env["FRAUD_DATABASE_URL"]).host
        except ConfigurationError:
            host = "an unreadable URL"
        if host not in (None, "127.0.0.1", "localhost"):
            problems.append(f"FRAUD_DATABASE_URL (a database on {host})")
    if problems:
        raise ConfigurationError(
            "the demo runs on local services only, but the environment points elsewhere: "
            + "; ".join(problems)
            + ". Unset these variables for the demo (or run `dagster dev` yourself)."
        )


def cmd_demo(settings: Settings, args: argparse.Namespace) -> int:
    """Services, topic, demo transactions, then `dagster dev` with the sensor on.

    Ctrl-C (or SIGTERM, SIGHUP) stops `dagster dev` and every service this command started.
    """
    _stop_like_ctrl_c_on_termination()
    from fraud_dagster import producer
    from fraud_dagster.kafka_io import ensure_topic
    from fraud_dagster.local_services import smtp
    from fraud_dagster.simulator import to_messages

    broker = _local_kafka(settings, args)
    _refuse_remote_services(settings, broker.bootstrap_servers, postgres=args.postgres)
    mail = smtp.background_process(settings.var_dir)
    postgres = _local_postgres(settings, args) if args.postgres else None
    # What this command started, and so stops: a broker or server the user started before
    # (`fraud-dagster kafka start`, ...) keeps running.
    started: list[Callable[[], object]] = []
    try:
        if not broker.is_running():
            broker.start()
            started.append(broker.stop)
        storage_env: dict[str, str] = {}
        if postgres is not None:
            if not postgres.is_running():
                postgres.start()
                started.append(postgres.stop)
            storage_env = postgres_env(postgres)
        if not mail.is_running():
            smtp.start_background(settings.var_dir, settings.mail_dir, port=settings.smtp_port)
            started.append(mail.stop)
        options = _kafka_options(settings)
        ensure_topic(options, settings.kafka_topic, args.partitions)
        demo = producer.synthetic_transactions(args.count, seed=args.seed)
        producer.produce(options, settings.kafka_topic, to_messages(demo), total=len(demo))
        logger.info(
            "sent %d demo transactions (%d fraudulent by the simulator's labels); "
            "Dagster UI at http://127.0.0.1:%d, alerts in %s",
            len(demo),
            int(demo["is_fraud"].sum()),
            args.dagster_port,
            settings.mail_dir,
        )
        if args.no_dagster:
            return 0
        home = prepare_dagster_home(settings, postgres=postgres is not None)
        env = {**os.environ, **storage_env, "DAGSTER_HOME": str(home)}
        env.setdefault("FRAUD_DAGSTER_UI_URL", f"http://127.0.0.1:{args.dagster_port}")
        command = [
            str(Path(sys.executable).with_name("dagster")),
            "dev",
            "-w",
            str(PROJECT_ROOT / "workspace.yaml"),
            "-h",
            "127.0.0.1",
            "-p",
            str(args.dagster_port),
        ]
        # Its own process group: whatever of it outlives its shutdown (a code location server
        # has been seen to) is ended with the group. Ctrl-C reaches it through the handler below.
        # It runs in DAGSTER_HOME: from the repo, `dagster dev` would warn that the repo's
        # dagster.yaml is not used, although DAGSTER_HOME holds a copy of it.
        dagster = subprocess.Popen(command, cwd=home, env=env, start_new_session=True)
        try:
            return dagster.wait()
        except KeyboardInterrupt:
            dagster.send_signal(signal.SIGINT)
            try:
                dagster.wait(timeout=30)
            except subprocess.TimeoutExpired:
                dagster.kill()
            return 0
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(dagster.pid, signal.SIGKILL)
    finally:
        if not args.keep_services:
            # A second Ctrl-C would cut the stopping short and leave the rest running.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            for stop in reversed(started):
                stop()


def print_line(text: str) -> None:
    """Command results go to stdout (for scripts); diagnostics go through logging."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _utc_datetime(text: str) -> datetime:
    """An ISO 8601 argument as naive UTC (the database's convention)."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 date/time: {text!r}") from None
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value


def _at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer of `minimum` or more (a count of 0 or -5 would otherwise
    fail later with a library's traceback, or do nothing and say it succeeded)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {minimum} or more, got {value}")
        return value

    return parse


def _port(text: str) -> int:
    value = _at_least(1)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is at most 65535, got {value}")
    return value


def _positive_rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number above 0, got {text!r}")
    return value


def _topic_name(text: str) -> str:
    if problem := topic_name_problem(text):
        raise argparse.ArgumentTypeError(problem)
    return text


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _log_level(text: str) -> str:
    """A log level name (also from FRAUD_LOG_LEVEL, which argparse reads through this too)."""
    if text.strip().upper() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(LOG_LEVELS)}")
    return text.strip().upper()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fraud-dagster", description=__doc__)
    parser.add_argument(
        "--log-level",
        type=_log_level,
        default=os.environ.get("FRAUD_LOG_LEVEL", "INFO"),
        help=f"{', '.join(LOG_LEVELS)} (default: FRAUD_LOG_LEVEL, else INFO)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    kafka = sub.add_parser("kafka", help="local Apache Kafka broker (KRaft, 127.0.0.1)")
    kafka.add_argument("action", choices=["start", "stop", "status"])
    kafka.add_argument("--port", type=_port, default=None, help="client port (default 9092)")
    kafka.add_argument("--controller-port", type=_port, default=None, help="default 9093")
    kafka.add_argument("--data-dir", default=None, help="default var/kafka")
    kafka.set_defaults(handler=cmd_kafka)

    smtp = sub.add_parser("smtp", help="local SMTP server writing .eml files to var/mail/")
    smtp.add_argument("action", choices=["start", "stop", "status"])
    smtp.add_argument("--port", type=_port, default=None, help="default FRAUD_SMTP_PORT (8025)")
    smtp.add_argument("--starttls", action="store_true", help="offer STARTTLS (self-signed cert)")
    smtp.set_defaults(handler=cmd_smtp)

    topic = sub.add_parser("topic", help="create or grow the transaction topic")
    topic.add_argument("action", choices=["create"])
    topic.add_argument("--topic", type=_topic_name, default=None)
    topic.add_argument("--partitions", type=_at_least(1), default=1)
    topic.set_defaults(handler=cmd_topic)

    produce = sub.add_parser("produce", help="send transactions to the topic")
    source = produce.add_mutually_exclusive_group(required=True)
    source.add_argument("--count", type=_at_least(1), help="this many synthetic transactions")
    source.add_argument("--from-csv", help="replay a handbook-format CSV (.csv or .csv.gz)")
    produce.add_argument(
        "--limit", type=_at_least(1), default=None, help="send at most this many CSV rows"
    )
    produce.add_argument(
        "--rate", type=_positive_rate, default=None, help="messages per second (default: max)"
    )
    produce.add_argument("--seed", type=int, default=0)
    produce.add_argument("--topic", type=_topic_name, default=None)
    produce.add_argument("--quiet", action="store_true", help="no progress bar")
    produce.set_defaults(handler=cmd_produce)

    train = sub.add_parser("train", help="train, evaluate and publish a model to models/")
    train.add_argument("--data", default=None, help="labelled CSV; default: the simulator")
    train.add_argument("--days", type=_at_least(1), default=90, help="simulated days")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--models-dir", default=None)
    train.add_argument("--default", action="store_true", help="serve it when nothing is promoted")
    train.add_argument(
        "--kind",
        default=None,
        help="estimator: forest_boosting (default), gradient_boosting, random_forest, logistic",
    )
    train.set_defaults(handler=cmd_train)

    label = sub.add_parser("label", help="record a confirmed outcome of a transaction")
    label.add_argument("transaction_id")
    verdict = label.add_mutually_exclusive_group(required=True)
    verdict.add_argument("--fraud", dest="fraud", action="store_true")
    verdict.add_argument("--genuine", dest="fraud", action="store_false")
    label.add_argument("--by", default=os.environ.get("USER", "analyst"), help="who confirmed it")
    label.set_defaults(handler=cmd_label)

    load_labels = sub.add_parser(
        "load-labels", help="replay: load a handbook CSV's labels known after the delay"
    )
    load_labels.add_argument("--from-csv", required=True, help="handbook-format CSV (.csv/.gz)")
    load_labels.add_argument(
        "--as-of",
        type=_utc_datetime,
        default=None,
        help="the replay's now (ISO 8601; UTC without an offset); default: the latest stored "
        "transaction's time",
    )
    load_labels.add_argument(
        "--delay-days", type=_at_least(0), default=7, help="days until a label is known (default 7)"
    )
    load_labels.set_defaults(handler=cmd_load_labels)

    pg = sub.add_parser("postgres", help="local PostgreSQL server (Debian's binaries, 127.0.0.1)")
    pg.add_argument("action", choices=["start", "stop", "status", "env"])
    pg.add_argument("--port", dest="postgres_port", type=_port, default=None, help="default 5433")
    pg.add_argument("--data-dir", default=None, help="default var/postgres")
    pg.set_defaults(handler=cmd_postgres)

    instance = sub.add_parser("instance", help="write DAGSTER_HOME/dagster.yaml")
    instance.add_argument("--home", default=None, help="default var/dagster")
    instance.add_argument(
        "--postgres",
        action="store_true",
        help="storage on PostgreSQL (dagster.postgres.yaml; credentials from DAGSTER_PG_*)",
    )
    instance.set_defaults(handler=cmd_instance)

    status = sub.add_parser(
        "status",
        help="where the stream stands: lag, unstored gaps to rerun, lost offsets, alert outbox",
    )
    status.add_argument(
        "--check",
        action="store_true",
        help="exit 2 if offsets below stored ones are not stored (a batch to rerun); 1 is an "
        "error (Kafka or the database unreachable)",
    )
    status.set_defaults(handler=cmd_status)

    db = sub.add_parser("db", help="application database")
    db.add_argument("action", choices=["init"])
    db.set_defaults(handler=cmd_db)

    demo = sub.add_parser(
        "demo", help="services + demo transactions + dagster dev (Ctrl-C stops all)"
    )
    demo.add_argument("--count", type=_at_least(1), default=2000)
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument("--partitions", type=_at_least(1), default=2)
    demo.add_argument("--dagster-port", type=_port, default=3000)
    demo.add_argument("--no-dagster", action="store_true", help="set up and produce only")
    demo.add_argument(
        "--keep-services", action="store_true", help="leave Kafka, SMTP (and PostgreSQL) running"
    )
    demo.add_argument(
        "--postgres",
        action="store_true",
        help="application database and Dagster instance storage on a local PostgreSQL server "
        "(var/postgres, port --postgres-port) instead of SQLite",
    )
    demo.add_argument("--postgres-port", type=_port, default=None, help="default 5433")
    demo.set_defaults(handler=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
    except ConfigurationError as exc:  # before logging is set up: it needs the settings
        sys.stderr.write(f"fraud-dagster: {exc}\n")
        sys.exit(2)
    chatter = configure_logging(settings.log_dir, args.log_level)
    try:
        code = args.handler(settings, args)
    except FraudDagsterError as exc:
        if chatter is not None and chatter.dropped:
            logger.error("%s (the client's own messages: %s)", exc, settings.log_dir / LOG_FILE)
        else:
            logger.error("%s", exc)
        code = 1
    except OSError as exc:  # a path it cannot write, a file gone: the system's words suffice
        logger.error("fraud-dagster %s: %s", args.command, exc)
        code = 1
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
