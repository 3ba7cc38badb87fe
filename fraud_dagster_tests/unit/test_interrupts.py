"""Later interrupts held while an interrupted step records what it did: real signals, sent by
the test process to itself, against a handler that raises like a Dagster step's."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator

import pytest

from fraud_dagster.interrupts import later_interrupts_held
from fraud_dagster_tests.helpers import interrupts_raised_as


class StepInterrupted(BaseException):
    """What the handler in place raises (Dagster: DagsterExecutionInterruptedError)."""


@pytest.fixture
def raising_handler() -> Iterator[list[int]]:
    """SIGINT and SIGTERM raise StepInterrupted each time; yields the signals it was called for."""
    with interrupts_raised_as(StepInterrupted) as called:
        yield called


def interrupt(signum: signal.Signals) -> None:
    """Send `signum` to this process; Python runs its handler before the next statement."""
    os.kill(os.getpid(), signum)


def test_the_first_interrupt_raises_and_the_later_ones_are_held_and_logged(
    raising_handler: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    recorded: list[str] = []
    with pytest.raises(StepInterrupted), later_interrupts_held("recording the test's work"):
        try:
            interrupt(signal.SIGTERM)
        except StepInterrupted:
            interrupt(signal.SIGINT)
            interrupt(signal.SIGTERM)
            recorded.append("the work")
            raise

    assert raising_handler == [signal.SIGTERM]
    assert recorded == ["the work"]
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        "interrupted again (SIGINT, SIGTERM) while recording the test's work: held until that "
        "was done, so that it was not cut short"
    ]


def test_after_the_block_every_interrupt_reaches_the_handler_in_place_again(
    raising_handler: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    with later_interrupts_held("nothing"):
        pass
    for signum in (signal.SIGINT, signal.SIGINT):
        with pytest.raises(StepInterrupted):
            interrupt(signum)

    assert raising_handler == [signal.SIGINT, signal.SIGINT]
    assert not caplog.records, "no interrupt was held"


def test_a_signal_left_to_the_system_is_not_touched() -> None:
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with later_interrupts_held("nothing"):
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
            interrupt(signal.SIGTERM)  # ignored by the system, as before the block
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_outside_the_main_thread_nothing_changes(raising_handler: list[int]) -> None:
    seen: list[object] = []

    def in_a_worker() -> None:
        with later_interrupts_held("a worker's work"):
            seen.append(signal.getsignal(signal.SIGINT))

    worker = threading.Thread(target=in_a_worker)
    worker.start()
    worker.join()

    assert seen and seen[0] is signal.getsignal(signal.SIGINT), "the handler in place, kept"
