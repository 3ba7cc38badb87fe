"""Alert claims held by Dagster runs, and which of them their runs left behind.

A run sends alerts on a claim named by a token that starts with its run id. A run that ends
(its worker died with the daemon, the database failed under it, it was killed) can leave alerts
`sending`. Without its run to ask, such a claim is taken over only once it is
`STALE_CLAIM_AFTER` (10 minutes) old; with the Dagster instance to ask, a claim whose run has
ended is given up at once, so the next sender (the run's retry, or `retry_alerts`) sends those
alerts seconds later instead.

Ended in the instance is not always ended on the machine: a run forced to CANCELED from the UI,
or marked so by run monitoring after `cancel_timeout_seconds`, may still be finishing its current
emails. Its claims are given up only once its worker process is gone too, so no alert goes out
twice while the run's own sessions are still sending it.
"""

from __future__ import annotations

import os
import uuid

import dagster as dg
from sqlalchemy.engine import Engine

from fraud_dagster.run_health import WORKER_START_TAG, process_is_alive, run_worker
from fraud_dagster.storage.outbox import claim_holders

_SEPARATOR = ":"
# A run in one of these has stopped executing, as the instance sees it (see `abandoned_claims`).
ENDED_STATUSES = (
    dg.DagsterRunStatus.SUCCESS,
    dg.DagsterRunStatus.FAILURE,
    dg.DagsterRunStatus.CANCELED,
)


def claim_token(run_id: str) -> str:
    """A new claim token for one send of the run `run_id` (unique per send)."""
    return f"{run_id}{_SEPARATOR}{uuid.uuid4().hex[:8]}"


def claiming_run_id(token: str) -> str | None:
    """The run id a token was made for by `claim_token`; None for other senders' tokens."""
    run_id, separator, _ = token.partition(_SEPARATOR)
    return run_id if separator and run_id else None


def abandoned_claims(instance: dg.DagsterInstance, engine: Engine) -> frozenset[str]:
    """Tokens of the claims held now by runs that have ended: they will send nothing more.

    A run counts as ended when the instance says so and the worker process it reported (its
    first engine event with a pid) no longer exists, or is this process: a run executed here
    (in process, as tests and `execute_job` do) has returned, and a run that reported no worker
    is taken at the instance's word. Claims of senders that are not runs of this instance are
    not included (they expire). One outbox query; when any claim is held, one runs query and
    one event query per ended run holding claims.
    """
    by_run: dict[str, list[str]] = {}
    for token in claim_holders(engine):
        run_id = claiming_run_id(token)
        if run_id is not None:
            by_run.setdefault(run_id, []).append(token)
    if not by_run:
        return frozenset()
    ended = instance.get_runs(
        filters=dg.RunsFilter(run_ids=list(by_run), statuses=list(ENDED_STATUSES))
    )
    return frozenset(
        token
        for run in ended
        if not _still_executing_elsewhere(instance, run)
        for token in by_run[run.run_id]
    )


def _still_executing_elsewhere(instance: dg.DagsterInstance, run: dg.DagsterRun) -> bool:
    worker = run_worker(instance, run.run_id)
    return (
        worker is not None
        and worker.pid != os.getpid()
        and process_is_alive(worker.pid, worker.reported_at, run.tags.get(WORKER_START_TAG))
    )
