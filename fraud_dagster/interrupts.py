"""Holding the operator's later interrupts while an interrupted step records what it did.

Dagster turns each SIGINT or SIGTERM a run receives into an exception in the running step.
The first one (the UI's Terminate, Ctrl-C on `dagster dev`, a `kill`) is the operator's ask,
and the step answers it by recording what it has already done (the emails the SMTP server
accepted) before it ends. A second one (Ctrl-C reaching the run and then `dagster dev`'s
shutdown, or a second `kill`) would cut that recording short, and the next sender would send
those emails again. Within `later_interrupts_held`, it is held instead.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

logger = logging.getLogger(__name__)

INTERRUPT_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def later_interrupts_held(recording: str) -> Iterator[None]:
    """Within the block, the first SIGINT or SIGTERM goes to the handler in place (Dagster's:
    it raises, and the block records what it did, then ends); any later one is held, that is
    ignored, and logged once the block has ended, saying it was held while `recording`.

    Signals Python leaves to the system (default or ignored) are not touched. Outside the main
    thread nothing changes: only the main thread receives Python's signals and may set them.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    in_place = {signum: signal.getsignal(signum) for signum in INTERRUPT_SIGNALS}
    received: list[signal.Signals] = []

    def first_only(signum: int, frame: FrameType | None) -> None:
        received.append(signal.Signals(signum))
        if len(received) == 1:
            in_place[signum](signum, frame)

    wrapped = [signum for signum, handler in in_place.items() if callable(handler)]
    try:
        for signum in wrapped:
            signal.signal(signum, first_only)
        yield
    finally:
        for signum in wrapped:
            signal.signal(signum, in_place[signum])
        if len(received) > 1:
            logger.warning(
                "interrupted again (%s) while %s: held until that was done, so that it was "
                "not cut short",
                ", ".join(s.name for s in received[1:]),
                recording,
            )
