"""Shared pieces of the operations tests: reconstructable jobs, accounting, fault injection.

Reconstructable jobs let the tests run batches with `dagster.execute_job` on a real instance
(outputs in the instance's storage, as a daemon-launched run keeps them), which is what Dagster's
re-execution ("from failure", "all steps") needs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import sqlalchemy as sa

from fraud_dagster.batching import TAG_TOPIC
from fraud_dagster.definitions import build_definitions
from fraud_dagster.local_services.postgres import LocalPostgres, temporary_postgres
from fraud_dagster.producer import synthetic_transactions
from fraud_dagster.resources import build_resources
from fraud_dagster.settings import Settings, load_settings
from fraud_dagster.simulator import to_messages
from fraud_dagster.storage import schema
from fraud_dagster.storage.database import create_engine, ensure_schema
from fraud_dagster_tests.helpers import MailBox, produce, table_rows


def running_under_ci() -> bool:
    """CI sets CI (CI=true); there a missing prerequisite is an error, not a reason to skip."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require(condition: bool, reason: str) -> None:
    """Skip the test unless `condition` holds, or, under CI, fail it: a CI run must not go green
    by skipping what it could not run."""
    if condition:
        return
    if running_under_ci():
        pytest.fail(f"{reason} (CI is set: a missing prerequisite fails the test)", pytrace=False)
    pytest.skip(reason)


def score_transactions_job(environment: str = "") -> dg.JobDefinition:
    """The batch job as the code location builds it from the environment (reconstructable).

    `environment` only tells apart the services a test points the project at; see
    `fresh_reconstructable`.
    """
    return build_definitions(load_settings()).resolve_job_def("score_transactions")


def send_pending_alerts_job() -> dg.JobDefinition:
    return build_definitions(load_settings()).resolve_job_def("send_pending_alerts")


def fresh_reconstructable():  # -> ReconstructableJob (not exported by dagster)
    """A reconstructable `score_transactions_job` for today's environment.

    Dagster caches a reconstructed job per code pointer for the whole process; passing the
    project's environment as an argument gives each set of services its own pointer, so a test
    that points the project at other services (broker, database, models) never runs the
    previous test's job. Only a digest of it is passed: the pointer is stored with the run,
    and the environment holds secrets.
    """
    environment = hashlib.sha256(
        json.dumps({k: v for k, v in sorted(os.environ.items()) if k.startswith("FRAUD_")}).encode()
    ).hexdigest()
    return dg.build_reconstructable_job(
        __name__, "score_transactions_job", reconstructable_kwargs={"environment": environment}
    )


def run_request(
    request: dg.RunRequest, instance: dg.DagsterInstance, **kwargs: Any
) -> dg.JobExecutionResult:
    """Execute a sensor's batch RunRequest the way a run worker does (storage on the instance)."""
    with dg.execute_job(
        fresh_reconstructable(),
        instance=instance,
        run_config=request.run_config,
        tags={**request.tags, "dagster/run_key": request.run_key},
        **kwargs,
    ) as result:
        return result


def reexecute(
    instance: dg.DagsterInstance, parent_run_id: str, *, from_failure: bool
) -> dg.JobExecutionResult:
    """What the UI's "Re-execute from failure" / "Re-execute all" buttons do (the UI also
    carries the parent's own tags over, as here)."""
    options = (
        dg.ReexecutionOptions.from_failure(parent_run_id, instance)
        if from_failure
        else dg.ReexecutionOptions(parent_run_id=parent_run_id)
    )
    parent = instance.get_run_by_id(parent_run_id)
    assert parent is not None
    tags = {k: v for k, v in parent.tags.items() if not k.startswith("dagster/")}
    with dg.execute_job(
        fresh_reconstructable(),
        instance=instance,
        reexecution_options=options,
        tags=tags,
    ) as result:
        return result


def sensor_tick(
    name: str,
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    settings: Settings,
    cursor: str | None,
) -> dg.SensorResult:
    """One tick of the sensor `name` with `cursor`, as the daemon evaluates it (an error
    propagates; the daemon would then keep `cursor`)."""
    sensor = defs.resolve_sensor_def(name)
    with dg.build_sensor_context(
        instance=instance, cursor=cursor, resources=build_resources(settings)
    ) as context:
        result = sensor(context)
    assert isinstance(result, dg.SensorResult)
    return result


def retry_alerts_tick(
    defs: dg.Definitions, settings: Settings, instance: dg.DagsterInstance
) -> dg.RunRequest | dg.SkipReason:
    sensor = defs.resolve_sensor_def("retry_alerts")
    with dg.build_sensor_context(instance=instance, resources=build_resources(settings)) as context:
        result = sensor.evaluate_tick(context)
    if result.run_requests:
        (request,) = result.run_requests
        return request
    return dg.SkipReason(result.skip_message)


def run_retry_job(
    defs: dg.Definitions, instance: dg.DagsterInstance, request: dg.RunRequest
) -> dg.ExecuteInProcessResult:
    job = defs.resolve_job_def("send_pending_alerts")
    return job.execute_in_process(
        run_config=request.run_config, instance=instance, raise_on_error=False
    )


def materializations(instance: dg.DagsterInstance, run_id: str, asset: str) -> list[dict[str, Any]]:
    """Metadata of every materialization (or observation) of `asset` in a run, as plain values."""
    found = []
    for record in instance.all_logs(run_id):
        event = record.dagster_event
        if event is None or event.event_type_value not in (
            "ASSET_MATERIALIZATION",
            "ASSET_OBSERVATION",
        ):
            continue
        data = event.event_specific_data
        item = getattr(data, "materialization", None) or getattr(data, "asset_observation", None)
        if item.asset_key.to_user_string() == asset:
            found.append({key: value.value for key, value in item.metadata.items()})
    return found


def executed_steps(instance: dg.DagsterInstance, run_id: str) -> set[str]:
    return {
        record.dagster_event.step_key.rsplit(".", 1)[-1]
        for record in instance.all_logs(run_id)
        if record.dagster_event and record.dagster_event.event_type_value == "STEP_START"
    }


def accounting(database_url: str, topic: str) -> Counter[tuple[int, int]]:
    """How often each (partition, offset) of `topic` is stored, scored and rejected together."""
    counts: Counter[tuple[int, int]] = Counter()
    ensure_schema(create_engine(database_url))
    for table in (schema.scored_transactions, schema.rejected_transactions):
        for row in table_rows(database_url, table):
            if row["source_topic"] == topic:
                counts[(row["source_partition"], row["source_offset"])] += 1
    return counts


def emails_by_transaction(messages: list) -> Counter[str]:
    return Counter(message["X-Fraud-Transaction-Id"] for message in messages)


def analyst_alerts(mailbox: MailBox) -> list:
    """The fraud alerts the analysts received (the operators' emails carry a run id instead)."""
    return [m for m in mailbox.messages() if not m["X-Fraud-Run-Id"]]


def operator_emails(mailbox: MailBox) -> list:
    """The emails the operators received about runs (failed, canceled)."""
    return [m for m in mailbox.messages() if m["X-Fraud-Run-Id"]]


def wait_for(
    check: Callable[[], bool],
    timeout_seconds: float,
    what: str,
    state: Callable[[], str] | None = None,
) -> None:
    """Poll `check` until it holds; on timeout fail saying `what` did not happen, and what
    `state` reports then (what a failure in CI needs to be understood)."""
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    found = f"; found: {state()}" if state is not None else ""
    raise AssertionError(f"{what} did not happen within {timeout_seconds:.0f}s{found}")


def step_events(
    instance: dg.DagsterInstance, run_id: str, event_type: dg.DagsterEventType, step: str
) -> list[dg.EventLogEntry]:
    """The run's events of `event_type` for the op `step` (e.g. "persist")."""
    return [
        entry
        for entry in instance.all_logs(run_id, of_type=event_type)
        if entry.step_key is not None and entry.step_key.rsplit(".", 1)[-1] == step
    ]


def error_text(error: Any) -> str:
    """A Dagster error (SerializableErrorInfo) with its causes, as one line of text."""
    parts = []
    while error is not None:
        parts.append(f"{error.cls_name}: {error.message.strip()}")
        error = error.cause or error.context
    return " <- ".join(parts)


def step_errors(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    """The errors of the run's failed step attempts (retried or final), one line each."""
    entries = instance.all_logs(
        run_id,
        of_type={dg.DagsterEventType.STEP_UP_FOR_RETRY, dg.DagsterEventType.STEP_FAILURE},
    )
    return [
        f"{entry.step_key}: {error_text(entry.dagster_event.event_specific_data.error)}"
        for entry in entries
    ]


def batch_records(instance: dg.DagsterInstance, topic: str) -> list[dg.RunRecord]:
    return list(instance.get_run_records(filters=dg.RunsFilter(tags={TAG_TOPIC: topic})))


def wait_until_settled(
    instance: dg.DagsterInstance, database_url: str, topic: str, expected: int, log: Path
) -> list[dg.RunRecord]:
    """Wait until every produced offset is stored and no batch run is queued or running."""

    def settled() -> bool:
        records = batch_records(instance, topic)
        stored = sum(accounting(database_url, topic).values())
        return stored >= expected and all(r.dagster_run.is_finished for r in records)

    try:
        wait_for(settled, 300, f"{expected} messages stored by the daemon's runs")
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}; daemon log:\n{log.read_text(errors='replace')[-3000:]}"
        ) from None
    return batch_records(instance, topic)


def tampered_models_dir(source: Path, destination: Path) -> Path:
    """A copy of the published models whose joblib files were changed after publication."""
    shutil.copytree(source, destination)
    for path in destination.glob("*.joblib"):
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    return destination


@contextmanager
def local_postgres() -> Iterator[LocalPostgres]:
    """A PostgreSQL server of the test's own (so the test may stop it)."""
    with temporary_postgres() as server:
        yield server


def execute_sql(url: str, statement: str) -> None:
    """Fault injection through the database itself (test-only DDL, no user data in it)."""
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(statement))
    finally:
        engine.dispose()


def refuse_writes(
    url: str, table: str, message: str, condition: str | None = None, statement: str = "INSERT"
) -> None:
    """Fault injection: a trigger that makes the database refuse `statement` (INSERT or UPDATE)
    on `table` (for rows whose NEW row meets `condition`, if given) with `message`, in the
    database's own dialect."""
    if sa.make_url(url).get_backend_name() == "postgresql":
        test = condition or "TRUE"
        execute_sql(
            url,
            "CREATE FUNCTION inject_fault() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            f"IF {test} THEN RAISE EXCEPTION '{message}'; END IF; RETURN NEW; END $$",
        )
        execute_sql(
            url,
            f"CREATE TRIGGER inject_fault BEFORE {statement} ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION inject_fault()",
        )
    else:
        when = f"WHEN {condition} " if condition else ""
        execute_sql(
            url,
            f"CREATE TRIGGER inject_fault BEFORE {statement} ON {table} {when}"
            f"BEGIN SELECT RAISE(ABORT, '{message}'); END",
        )


def accept_writes(url: str, table: str) -> None:
    """Remove the fault `refuse_writes` injected."""
    if sa.make_url(url).get_backend_name() == "postgresql":
        execute_sql(url, f"DROP TRIGGER inject_fault ON {table}")
        execute_sql(url, "DROP FUNCTION inject_fault()")
    else:
        execute_sql(url, "DROP TRIGGER inject_fault")


def stall_a_batch(settings: Settings, database_url: str, seed: int = 91) -> int:
    """Produce one batch of 60 whose rows the database refuses until `accept_writes`."""
    ensure_schema(create_engine(database_url))
    refuse_writes(database_url, "scored_transactions", "injected fault: database stalls")
    return produce(settings, to_messages(synthetic_transactions(60, seed=seed)))


def wait_for_the_batch_at_persist(instance: dg.DagsterInstance, topic: str) -> str:
    """The id of the topic's batch run, once that run has reached its persist step."""

    def persisting() -> str | None:
        for record in batch_records(instance, topic):
            run = record.dagster_run
            stats = instance.get_run_step_stats(run.run_id, ["transaction_batch.persist"])
            if run.status == dg.DagsterRunStatus.STARTED and stats:
                return run.run_id
        return None

    wait_for(lambda: persisting() is not None, 120, "the batch run at its persist step")
    run_id = persisting()
    assert run_id is not None
    return run_id
