"""The cursor of the operators' run-status email sensors: which event-log records were handled,
allowing for records that become visible out of storage-id order.

The event log's storage id is taken when a row is inserted, and the row becomes visible when its
transaction commits. On PostgreSQL (and MySQL) two runs failing at once can commit id 101 before
id 100, so a cursor that is only "the last id read" moves past 100 before 100 can be read, and
that failure is never mailed. SQLite writes one transaction at a time, so there ids appear in
order. This cursor keeps a watermark (every record at or below it was handled) and the ids
handled above it with when they were handled; the watermark moves up to a handled id only
SETTLE_SECONDS after it was handled, longer than any event insert stays uncommitted, and never
past a record that was read but not handled yet (its email failed).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

# How long a record below a handled one may stay invisible (its insert not committed) and still
# be read: far above the milliseconds between an event insert and its commit.
SETTLE_SECONDS = 60.0


@dataclass(frozen=True)
class RunEventCursor:
    """`watermark`: every record with a storage id at or below it was handled (or predates the
    sensor); `handled`: storage ids above it that were handled, with the time (epoch seconds)."""

    watermark: int
    handled: Mapping[int, float] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str | None) -> RunEventCursor | None:
        """The cursor saved by `serialize`, or by earlier versions (the bare last storage id);
        None for no cursor or one this code cannot read (the sensor then starts afresh)."""
        if text is None:
            return None
        if text.isdigit():
            return cls(int(text))
        try:
            data = json.loads(text)
            return cls(
                int(data["watermark"]),
                {int(key): float(when) for key, when in data["handled"].items()},
            )
        except (ValueError, TypeError, KeyError, AttributeError):
            return None

    def serialize(self) -> str:
        return json.dumps(
            {"watermark": self.watermark, "handled": {str(k): v for k, v in self.handled.items()}},
            sort_keys=True,
        )

    def is_new(self, storage_id: int) -> bool:
        """Whether the record with this id still needs handling."""
        return storage_id > self.watermark and storage_id not in self.handled

    def read_limit(self, new_per_tick: int) -> int:
        """How many records above the watermark to read for `new_per_tick` unhandled ones: the
        handled ones above it come back too."""
        return new_per_tick + len(self.handled)

    def with_handled(self, storage_id: int, now: float) -> RunEventCursor:
        return RunEventCursor(self.watermark, {**self.handled, storage_id: now})

    def settled(self, read: Iterable[int], truncated: bool, now: float) -> RunEventCursor:
        """The cursor after a tick that read the records with ids `read` (ascending; `truncated`
        if the read stopped at its limit): the watermark moves to the highest id handled at least
        SETTLE_SECONDS ago, but stays below every record read and not handled, and at or below
        the last one read when more may follow it."""
        ids = list(read)
        ceiling = min((i - 1 for i in ids if self.is_new(i)), default=None)
        if truncated and ids:
            ceiling = ids[-1] if ceiling is None else min(ceiling, ids[-1])
        old = [i for i, when in self.handled.items() if now - when >= SETTLE_SECONDS]
        target = max(old, default=self.watermark)
        if ceiling is not None:
            target = min(target, ceiling)
        watermark = max(self.watermark, target)
        return RunEventCursor(
            watermark, {i: when for i, when in self.handled.items() if i > watermark}
        )
