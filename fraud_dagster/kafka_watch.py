"""Whether the transaction topic has been unreadable long enough to tell the operators.

While the broker cannot be reached, `kafka_transactions_sensor` skips its ticks and launches no
run, so no run fails and no failure email goes out: without this watch a broker outage at night
is silent outside the Dagster UI. The watch turns the sensor-level observations (topic readable
or not, at a time) into at most two notices per outage: "down" once it has lasted the alert
threshold, "back" when it ends (only for outages that long; a blip stays quiet).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from typing import Literal


@dataclass(frozen=True)
class KafkaWatch:
    """What the watch remembers between ticks (a sensor cursor)."""

    down_since: float | None = None  # first tick that could not read the topic
    last_error: str | None = None
    down_notified: bool = False

    def serialize(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def parse(cls, cursor: str | None) -> KafkaWatch:
        if not cursor:
            return cls()
        try:
            return cls(**json.loads(cursor))
        except (TypeError, ValueError):
            return cls()  # a cursor of another format: start watching afresh


@dataclass(frozen=True)
class KafkaNotice:
    """One email to the operators about an outage that started at `down_since`."""

    kind: Literal["down", "back"]
    down_since: float
    observed_at: float
    error: str | None


def observe(
    watch: KafkaWatch, error: str | None, now: float, alert_after_seconds: float
) -> tuple[KafkaWatch, KafkaNotice | None]:
    """The watch after one look at the topic (`error` None: readable) and the notice it calls
    for. The caller saves the new watch only once the notice is sent, so a notice that could not
    be sent is due again on the next look."""
    if error is not None:
        down = watch if watch.down_since is not None else KafkaWatch(down_since=now)
        down = replace(down, last_error=error)
        assert down.down_since is not None
        if not down.down_notified and now - down.down_since >= alert_after_seconds:
            notice = KafkaNotice("down", down.down_since, now, error)
            return replace(down, down_notified=True), notice
        return down, None
    if watch.down_since is None:
        return watch, None
    long_enough = watch.down_notified or now - watch.down_since >= alert_after_seconds
    notice = KafkaNotice("back", watch.down_since, now, watch.last_error) if long_enough else None
    return KafkaWatch(), notice
