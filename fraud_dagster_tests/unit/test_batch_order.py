"""The order rule of overlapping batch runs of one partition, with a scripted clock."""

from __future__ import annotations

from fraud_dagster.batch_order import RunningBatch, batches_ahead, wait_for_batches_ahead


class ScriptedPartition:
    """Runs of a partition and what is stored, changing as the (fake) clock advances."""

    def __init__(self, running: list[RunningBatch]) -> None:
        self.now = 0.0
        self.running = list(running)
        self.stored: set[str] = set()
        self.events: dict[float, tuple[str, str]] = {}

    def at(self, when: float, what: str, run_id: str) -> None:
        self.events[when] = (what, run_id)

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        for when, (what, run_id) in sorted(self.events.items()):
            if when <= self.now:
                if what == "stored":
                    self.stored.add(run_id)
                else:
                    self.running = [b for b in self.running if b.run_id != run_id]
                del self.events[when]

    def wait(self, first_offset: int, own_run_id: str, max_wait_seconds: float = 60.0):
        return wait_for_batches_ahead(
            lambda: list(self.running),
            lambda batch: batch.run_id in self.stored,
            first_offset,
            own_run_id,
            max_wait_seconds,
            poll_seconds=0.5,
            clock=lambda: self.now,
            sleep=self.sleep,
        )


A = RunningBatch(0, 99, "run-a")
B = RunningBatch(100, 199, "run-b")
C = RunningBatch(200, 299, "run-c")


def test_only_ranges_before_the_batch_and_not_itself_are_ahead() -> None:
    assert batches_ahead([C, B, A], first_offset=200, own_run_id="run-c") == [A, B]
    assert batches_ahead([A, B], first_offset=100, own_run_id="run-b") == [A]
    assert batches_ahead([B, C], first_offset=100, own_run_id="run-b") == []


def test_nothing_running_ahead_returns_at_once() -> None:
    partition = ScriptedPartition([B, C])
    outcome = partition.wait(first_offset=100, own_run_id="run-b")
    assert outcome.waited_seconds == 0.0
    assert outcome.waited_for == [] and not outcome.gave_up


def test_waits_until_the_run_ahead_has_stored_its_range_not_until_it_ends() -> None:
    partition = ScriptedPartition([A, B])
    partition.at(2.0, "stored", "run-a")  # run-a still sends alerts afterwards
    partition.at(5.0, "ended", "run-a")
    outcome = partition.wait(first_offset=100, own_run_id="run-b")
    assert outcome.waited_seconds == 2.0
    assert outcome.waited_for == ["run-a"] and not outcome.gave_up
    assert partition.now == 2.0


def test_waits_for_every_run_ahead() -> None:
    partition = ScriptedPartition([A, B, C])
    partition.at(1.0, "stored", "run-a")
    partition.at(3.0, "stored", "run-b")
    outcome = partition.wait(first_offset=200, own_run_id="run-c")
    assert outcome.waited_seconds == 3.0
    assert outcome.waited_for == ["run-a", "run-b"]


def test_a_run_ahead_that_fails_without_storing_does_not_hold_the_batch() -> None:
    partition = ScriptedPartition([A, B])
    partition.at(1.5, "ended", "run-a")
    outcome = partition.wait(first_offset=100, own_run_id="run-b")
    assert outcome.waited_seconds == 1.5
    assert not outcome.gave_up


def test_gives_up_after_the_limit_and_names_the_runs() -> None:
    partition = ScriptedPartition([A, B])
    outcome = partition.wait(first_offset=100, own_run_id="run-b", max_wait_seconds=10.0)
    assert outcome.gave_up
    assert outcome.gave_up_on == [A]
    assert 10.0 <= outcome.waited_seconds < 10.5
