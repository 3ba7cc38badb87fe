"""The batch runs behind an unstored offset range, so that an operator opens the right run.

`stream_status` reads the broker and the application database only, so that it answers while
Dagster is down. Where the Dagster instance can be read, this adds to each unstored range the
batches that tried it: per batch its newest run (the one to re-execute from failure, or one still
under way), that run's status and how many runs the batch had (the first, Dagster's automatic
retries, reruns). An operator then needs no tag filter in the UI.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import dagster as dg

from fraud_dagster.batching import (
    TAG_FIRST_OFFSET,
    TAG_LAST_OFFSET,
    TAG_PARTITION,
    TAG_TOPIC,
    TAG_TOPIC_ID,
)
from fraud_dagster.gap_watch import GapNotice
from fraud_dagster.stream_status import Gap, StreamStatus

# Batches named per unstored range; the rest of a longer one is given by its offsets and run tags.
MAX_BATCHES_NAMED = 5


@dataclass(frozen=True)
class BatchRuns:
    """One batch of an unstored range: its offsets and the runs that tried it."""

    first: int
    last: int
    run_id: str  # the newest run of the batch
    status: str  # that run's status (FAILURE, CANCELED, STARTED, QUEUED, ...)
    runs: int  # every run of the batch: the first, Dagster's retries, reruns


def batches_of_range(
    instance: dg.DagsterInstance,
    job_name: str,
    topic: str,
    partition: int,
    gap: Gap,
    topic_id: str | None = None,
    limit: int = MAX_BATCHES_NAMED,
) -> tuple[BatchRuns, ...]:
    """The batches covering `gap` from its first offset on, each found by its first offset's
    tag (one run query per batch), at most `limit`. Stops at an offset no run starts at (a range
    no run was ever launched for). Runs of an earlier topic of the same name (another topic id
    in their tags) do not count; runs without the tag do."""
    found: list[BatchRuns] = []
    offset = gap.first
    while offset <= gap.last and len(found) < limit:
        tags = {TAG_TOPIC: topic, TAG_PARTITION: str(partition), TAG_FIRST_OFFSET: str(offset)}
        runs = [
            run
            for run in instance.get_runs(filters=dg.RunsFilter(job_name=job_name, tags=tags))
            if topic_id is None or run.tags.get(TAG_TOPIC_ID, topic_id) == topic_id
        ]
        if not runs:
            break
        newest = runs[0]  # get_runs lists the newest first
        last = int(newest.tags.get(TAG_LAST_OFFSET, gap.last))
        found.append(BatchRuns(offset, last, newest.run_id, newest.status.value, len(runs)))
        offset = last + 1
    return tuple(found)


def gap_with_batch_runs(
    gap: Gap, partition: int, status: StreamStatus, instance: dg.DagsterInstance, job_name: str
) -> Gap:
    """`gap` (of `partition` in `status`) with the batches and runs that tried it."""
    batches = batches_of_range(instance, job_name, status.topic, partition, gap, status.topic_id)
    return replace(gap, batches=batches)


def with_batch_runs(
    status: StreamStatus, instance: dg.DagsterInstance, job_name: str
) -> StreamStatus:
    """`status` with the batches and runs of each unstored range (`Gap.batches`)."""
    partitions = [
        replace(
            partition,
            gaps=[
                gap_with_batch_runs(gap, partition.partition, status, instance, job_name)
                for gap in partition.gaps
            ],
        )
        for partition in status.partitions
    ]
    return replace(status, partitions=partitions)


def notices_with_batch_runs(
    notices: list[GapNotice], status: StreamStatus, instance: dg.DagsterInstance, job_name: str
) -> list[GapNotice]:
    """`notices` (of unstored ranges in `status`) with the batches and runs of their ranges."""
    return [
        replace(
            notice,
            gap=gap_with_batch_runs(notice.gap, notice.partition, status, instance, job_name),
        )
        for notice in notices
    ]
