"""Test helpers: reading the SMTP server's mail dir, producing, running sensor-requested batches."""

from __future__ import annotations

import email
import email.policy
import json
import signal
import time
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import sqlalchemy as sa
from aiosmtpd.controller import Controller
from kafka import KafkaAdminClient, TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType

from fraud_dagster import producer
from fraud_dagster.kafka_io import offset_bounds
from fraud_dagster.resources import build_resources, resolved_resources
from fraud_dagster.sensors import KAFKA_SENSOR_NAME
from fraud_dagster.settings import Settings
from fraud_dagster.storage import schema


@dataclass
class MailBox:
    """The .eml files an aiosmtpd server wrote."""

    directory: Path

    def messages(self) -> list[EmailMessage]:
        if not self.directory.exists():
            return []
        return [
            email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
            for path in sorted(self.directory.glob("*.eml"))
        ]

    def wait_for(self, count: int, timeout_seconds: float = 30.0) -> list[EmailMessage]:
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            messages = self.messages()
            if len(messages) >= count:
                return messages
            time.sleep(0.2)
        return self.messages()


def produce(settings: Settings, messages: Iterable[Mapping[str, Any]]) -> int:
    options = resolved_resources(settings)["kafka"].client_options()
    return producer.produce(options, settings.kafka_topic, messages, show_progress=False).sent


def produce_raw(settings: Settings, values: Iterable[bytes | None], key: bytes = b"k") -> int:
    """Send raw values as they are (for malformed input)."""
    from fraud_dagster.kafka_io import producer as kafka_producer

    options = resolved_resources(settings)["kafka"].client_options()
    client = kafka_producer(options)
    futures = [client.send(settings.kafka_topic, key=key, value=value) for value in values]
    client.flush()
    for future in futures:
        future.get(timeout=10)
    client.close()
    return len(futures)


def evaluate_sensor(
    defs: dg.Definitions, settings: Settings, instance: dg.DagsterInstance, cursor: str | None
) -> dg.SensorResult:
    sensor = defs.resolve_sensor_def("kafka_transactions_sensor")
    # As a context manager: the context may open its own instance (and Dagster's state
    # storage with it), which a context left open leaves behind for later tests.
    with dg.build_sensor_context(
        instance=instance, cursor=cursor, resources=build_resources(settings)
    ) as context:
        return sensor.evaluate_tick(context)


def execute_requests(
    defs: dg.Definitions, instance: dg.DagsterInstance, result: Any
) -> list[dg.ExecuteInProcessResult]:
    """Execute the sensor's run requests in process, as the run worker would, in order."""
    job = defs.resolve_job_def("score_transactions")
    return [
        job.execute_in_process(
            run_config=request.run_config,
            instance=instance,
            tags={**request.tags, "dagster/run_key": request.run_key},
        )
        for request in result.run_requests
    ]


RUN_KEY_TAG = "dagster/run_key"
SENSOR_NAME_TAG = "dagster/sensor_name"


def tick_and_run(
    defs: dg.Definitions, settings: Settings, instance: dg.DagsterInstance, cursor: str | None
) -> tuple[str | None, list[str], list[str]]:
    """One sensor tick, its requests submitted as the daemon does; (cursor, run keys executed,
    run keys skipped because an earlier run of the sensor used them)."""
    result = evaluate_sensor(defs, settings, instance, cursor=cursor)
    job = defs.resolve_job_def("score_transactions")
    executed, skipped = [], []
    for request in result.run_requests:
        earlier = instance.get_runs(filters=dg.RunsFilter(tags={RUN_KEY_TAG: request.run_key}))
        if any(run.tags.get(SENSOR_NAME_TAG) == KAFKA_SENSOR_NAME for run in earlier):
            skipped.append(request.run_key)
            continue
        outcome = job.execute_in_process(
            run_config=request.run_config,
            instance=instance,
            tags={**request.tags, RUN_KEY_TAG: request.run_key, SENSOR_NAME_TAG: KAFKA_SENSOR_NAME},
        )
        assert outcome.success, request.run_key
        executed.append(request.run_key)
    return (result.cursor or cursor), executed, skipped


def admin_client(settings: Settings) -> KafkaAdminClient:
    options = resolved_resources(settings)["kafka"].client_options()
    return KafkaAdminClient(
        **{k: v for k, v in options.items() if k in KafkaAdminClient.DEFAULT_CONFIG}
    )


def set_topic_config(settings: Settings, configs: dict[str, str]) -> None:
    """Set topic-level configs (e.g. retention.bytes) on the test's topic, as an operator would."""
    admin = admin_client(settings)
    try:
        resource = ConfigResource(ConfigResourceType.TOPIC, settings.kafka_topic, configs)
        admin.alter_configs([resource])
    finally:
        admin.close()


def table_rows(database_url: str, table: sa.Table) -> list[dict[str, Any]]:
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(sa.select(table))]
    finally:
        engine.dispose()


def suspicious_ids(database_url: str) -> set[str]:
    return {
        row["transaction_id"] for row in table_rows(database_url, schema.suspicious_transactions)
    }


def graphql_text(base_url: str, query: str, variables: dict[str, Any] | None = None) -> str:
    """The raw JSON answer of the Dagster webserver's GraphQL API (what the UI reads)."""
    request = urllib.request.Request(
        f"{base_url}/graphql",
        data=json.dumps({"query": query, "variables": variables or {}}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.read().decode()


def graphql(base_url: str, query: str, variables: dict[str, Any] | None = None) -> dict:
    """The `data` of a GraphQL answer; an answer with errors fails the test."""
    payload = json.loads(graphql_text(base_url, query, variables))
    assert "errors" not in payload, payload
    return payload["data"]


def ordinary_and_large_amount(features: Iterable[str]) -> pd.DataFrame:
    """Two feature rows alike but for the amount: 40 and 400.

    The simulator (the handbook's) makes every amount above 220 a fraud, so any model trained on
    its data must score the second row above the first; a blank or wrong model does not.
    """
    history = {
        "account_tx_count_1d": 2,
        "account_mean_amount_1d": 50.0,
        "account_tx_count_7d": 10,
        "account_mean_amount_7d": 50.0,
        "account_tx_count_30d": 40,
        "account_mean_amount_30d": 50.0,
        "merchant_tx_count_1d": 5,
        "merchant_tx_count_7d": 30,
        "merchant_tx_count_30d": 120,
    }
    rows = [{**history, "transaction_amount": amount} for amount in (40.0, 400.0)]
    return pd.DataFrame(rows).reindex(columns=list(features), fill_value=0.0)


@contextmanager
def serving(handler: Any, port: int) -> Iterator[None]:
    """An aiosmtpd server with a test's own `handler` on `port` (stop the test's server first)."""
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield
    finally:
        controller.stop()


def delete_before(settings: Settings, offset: int) -> None:
    """Delete partition 0's records below `offset`, as retention deletes old segments."""
    admin = admin_client(settings)
    try:
        admin.delete_records({TopicPartition(settings.kafka_topic, 0): offset}, timeout_ms=30_000)
    finally:
        admin.close()
    options = resolved_resources(settings)["kafka"].client_options()
    deadline = time.monotonic() + 30
    while offset_bounds(options, settings.kafka_topic)[0].get(0) != offset:
        assert time.monotonic() < deadline, f"the log start did not reach {offset} within 30 s"
        time.sleep(0.2)


@contextmanager
def interrupts_raised_as(error: type[BaseException]) -> Iterator[list[int]]:
    """SIGINT and SIGTERM raise `error`, each time, as in a Dagster step (its
    `raise_interrupts_as`); yields the signals the handler was called for."""
    called: list[int] = []

    def raise_error(signum: int, _frame: object) -> None:
        called.append(signum)
        raise error()

    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        for signum in previous:
            signal.signal(signum, raise_error)
        yield called
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
