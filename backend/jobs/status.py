"""``freesegdiff jobs``: the progress of queued runs, read from Redis (the run's hash and its RQ jobs), and of the
background runs /predict started, read from the shared store (``backend.jobs.background_runs``)."""

from __future__ import annotations

from datetime import datetime, timezone

import redis

from backend.jobs.background_runs import current, described
from backend.storage.job_ledger import RedisLedger
from backend.storage.run_registry import RunRecord, RunRegistry
from backend.jobs.progress import summary
from backend.jobs.queue import job_states

JOB_STATES = ("queued", "started", "finished", "failed", "scheduled", "deferred", "stopped", "canceled", "missing")
MAX_FAILURES_SHOWN = 20
_UNITS = {"project": ("tasks", "task "), "folder": ("images", "")}


def describe_run(connection: redis.Redis, run_id: str) -> str:
    """The run's counts, speed, chunk states and failures; KeyError when Redis holds no such run."""
    ledger = RedisLedger(connection, run_id)
    fields = ledger.fields()
    if not fields:
        raise KeyError(run_id)
    unit, item = _UNITS.get(fields.get("kind", ""), ("items", ""))
    progress = ledger.progress()
    created = datetime.fromtimestamp(float(fields["created"]), timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    states = job_states(connection, ledger.job_ids())
    first, *rest = summary(f"run {run_id} ({fields.get('kind')} {fields.get('target')})", progress, unit, item,
                           MAX_FAILURES_SHOWN).splitlines()
    chunks = ", ".join(f"{states[state]} {state}" for state in JOB_STATES if states[state])
    return "\n".join([first, f"  created {created}; model version {fields.get('model_version', '(none yet)')}",
                      f"  chunks: {chunks or 'none'}", *rest])


def describe_recent_runs(connection: redis.Redis, count: int = 10) -> str:
    """The latest runs, newest first, each with its counts."""
    runs = []
    for run_id in RedisLedger.recent(connection, count):
        try:
            runs.append(describe_run(connection, run_id).splitlines()[0])
        except KeyError:
            continue  # expired
    return "\n".join(runs) if runs else "no runs in Redis (annotate-project --queue, annotate-folder --queue)"


def describe_background_run(record: RunRecord) -> str:
    """One line: ``background run <id> (project P, model_version V, local): state, counts, speed, time left``."""
    shown = described(record)
    left = f", {shown['seconds_left']:.0f} s left" if shown["seconds_left"] is not None else ""
    queued = f", queue run {record.queue_run}" if record.queue_run else ""
    lines = [f"background run {record.id} (project {record.project}, {record.model_version}, {record.mode}{queued}): "
             f"{record.state}, {record.total} tasks: {record.done} done, {record.skipped} skipped, {record.failed} "
             f"failed ({shown['tasks_per_second']:.2f} tasks/s{left})"]
    lines += [f"  failed task {task}: {reason}" for task, reason in record.failures[:MAX_FAILURES_SHOWN]]
    if record.reason:
        lines.append(f"  {record.reason}")
    return "\n".join(lines)


def describe_background_runs(registry: RunRegistry, connection: redis.Redis | None) -> str:
    """The background runs /predict started, newest first."""
    runs = [describe_background_run(current(record, connection)) for record in registry.runs()]
    return "\n".join(runs) if runs else "no background runs (a /predict over FREESEG_PREDICT_BUDGET_SECONDS starts one)"
