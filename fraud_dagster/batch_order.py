"""Offset order inside a partition while its batch runs overlap.

dagster.yaml lets two batch runs of one partition be under way at once, so the next batch's
run worker starts (process, imports, model, Kafka fetch) while the previous batch is still
working; that start-up is most of a short run. Features read the stored history of the batch's
accounts and merchants, so a batch must not compute them before every earlier batch of its
partition is stored. `wait_for_batches_ahead` is that rule, with the run queries and the
database behind two callables so it is testable without Dagster.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True, order=True)
class RunningBatch:
    """A batch run under way (or waiting to start), by its offset range and partition."""

    first_offset: int
    last_offset: int
    run_id: str
    partition: int = 0


@dataclass
class OrderWait:
    """What the wait found: how long it took and which runs it gave up on, if any."""

    waited_seconds: float = 0.0
    waited_for: list[str] = field(default_factory=list)
    gave_up_on: list[RunningBatch] = field(default_factory=list)

    @property
    def gave_up(self) -> bool:
        return bool(self.gave_up_on)


def batches_ahead(
    running: Iterable[RunningBatch], first_offset: int, own_run_id: str
) -> list[RunningBatch]:
    """The running batches whose ranges end before `first_offset`, lowest first."""
    return sorted(b for b in running if b.run_id != own_run_id and b.last_offset < first_offset)


def wait_for_batches_ahead(
    list_running: Callable[[], Iterable[RunningBatch]],
    is_stored: Callable[[RunningBatch], bool],
    first_offset: int,
    own_run_id: str,
    max_wait_seconds: float,
    poll_seconds: float = 0.2,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> OrderWait:
    """Return once every batch of the partition running ahead of `first_offset` is stored.

    A run ahead counts as done when its range is stored (its alerts and checks may still be
    going) or when it is no longer running: a failed batch does not hold the stream back, it
    is retried or rerun by itself (the same rule as before runs overlapped). Runs still queued
    are not waited for: they may be waiting for this run's slot. After `max_wait_seconds` the
    wait gives up and reports which runs it gave up on; the caller decides what that means.
    """
    outcome = OrderWait()
    started = clock()
    while True:
        pending = [
            b for b in batches_ahead(list_running(), first_offset, own_run_id) if not is_stored(b)
        ]
        for batch in pending:
            if batch.run_id not in outcome.waited_for:
                outcome.waited_for.append(batch.run_id)
        outcome.waited_seconds = clock() - started
        if not pending:
            return outcome
        if outcome.waited_seconds >= max_wait_seconds:
            outcome.gave_up_on = pending
            return outcome
        sleep(poll_seconds)
