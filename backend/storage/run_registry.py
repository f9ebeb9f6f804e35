"""The background runs /predict started: one record each in the shared store, so that every process sees them.

A record (``background:<id>``, JSON) names the run's project, ``model_version``, task ids and mode
(``local``: a server's own inference worker runs it; ``queued``: Redis Queue chunks, whose
progress is the run's ledger), with the counts its owner last wrote. ``claim`` is the one place
a run begins: under the store's lock, it leaves out the tasks an active run of the same project
and model_version already holds, so a second "Retrieve Predictions" adds no work.

A local run's owner writes a heartbeat every few seconds; a run whose owner stopped writing for
``STALE_SECONDS``, or whose owner process on this host is gone, is lost: it waits, still holding its
tasks, for a server to ``adopt`` it (backend.server.background); one that cannot marks it failed, and
then a second request predicts its tasks that still lack a prediction.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace

from backend.storage.shared_store import SharedStore

NAMESPACE = "background"
INDEX_LOCK = f"{NAMESPACE}:index"
ID_PREFIX = "r"  # every run id starts so: the store lists names by a non-empty prefix
STALE_SECONDS = 30.0  # a local run whose heartbeat is older has lost its process
KEEP_SECONDS = 7 * 24 * 3600  # ended runs are listed this long
ACTIVE_STATES = ("queued", "running")
STATES = ("queued", "running", "done", "cancelled", "failed")


def this_process() -> str:
    """``host:pid``: the owner of the local runs this process starts."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class RunRecord:
    """One background run as every process sees it; counts as its owner last wrote them."""

    id: str
    project: int
    model_version: str
    mode: str  # "local" or "queued"
    task_ids: list[int]
    owner: str  # host:pid of the process running a local run
    created: float
    heartbeat: float
    state: str = "queued"
    done: int = 0
    skipped: int = 0
    failed: int = 0
    failures: list[list[str]] = field(default_factory=list)  # [task id, one-line reason]
    seconds: float = 0.0  # of work, from its start to its last settled task
    cancel: bool = False  # asked to stop: its owner stops after the current batch
    reason: str = ""  # why it failed
    queue_run: str = ""  # a queued run's ledger id (``freesegdiff jobs --run``)

    @property
    def total(self) -> int:
        return len(self.task_ids)

    def lost(self, now: float) -> bool:
        """A local run whose owner stopped: no heartbeat for STALE_SECONDS, or its process on this host is gone."""
        if self.mode != "local" or self.state not in ACTIVE_STATES:
            return False
        host, _, pid = self.owner.rpartition(":")
        gone = host == socket.gethostname() and pid.isdigit() and not _alive(int(pid))
        return gone or now - self.heartbeat > STALE_SECONDS

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> RunRecord:
        return cls(**json.loads(data))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class RunRegistry:
    """The background runs' records in ``store`` (Redis with REDIS_URL, else files under MODEL_DIR)."""

    def __init__(self, store: SharedStore) -> None:
        self.store = store

    def claim(self, project: int, model_version: str, task_ids: Sequence[int], mode: str,
              active: Callable[[RunRecord], bool]) -> RunRecord | None:
        """A new run of the ``task_ids`` that no run ``active`` says is going holds for this project and
        model_version; None when every one is held already."""
        with self.store.lock(INDEX_LOCK):
            now = time.time()
            held = {task for record in self.runs()
                    if record.project == project and record.model_version == model_version and active(record)
                    for task in record.task_ids}
            free = list(dict.fromkeys(int(task) for task in task_ids if int(task) not in held))
            if not free:
                return None
            record = RunRecord(ID_PREFIX + uuid.uuid4().hex[:11], project, model_version, mode, free, this_process(), now, now)
            self.put(record)
            return record

    def runs(self) -> list[RunRecord]:
        """Every record, newest first; those ended more than KEEP_SECONDS ago are dropped."""
        now, records = time.time(), []
        for name in self.store.names(NAMESPACE, ID_PREFIX):
            record = self.get(name)
            if record is None:
                continue
            if record.state not in ACTIVE_STATES and now - record.heartbeat > KEEP_SECONDS:
                self.store.delete(f"{NAMESPACE}:{name}")
                continue
            records.append(record)
        return sorted(records, key=lambda record: record.created, reverse=True)

    def get(self, run_id: str) -> RunRecord | None:
        try:
            data = self.store.get(f"{NAMESPACE}:{run_id}")
        except ValueError:  # not a safe name: no such run
            return None
        return RunRecord.from_bytes(data) if data else None

    def put(self, record: RunRecord) -> None:
        self.store.put(f"{NAMESPACE}:{record.id}", record.to_bytes())

    def update(self, run_id: str, change: Callable[[RunRecord], RunRecord | None]) -> RunRecord | None:
        """The record changed by ``change``, read and written whole under its lock; None when there is none, or
        when ``change`` returns None (the record is left as it is)."""
        with self.store.lock(f"{NAMESPACE}:{run_id}"):
            record = self.get(run_id)
            changed = change(record) if record is not None else None
            if changed is not None:
                self.put(changed)
            return changed

    def adopt(self, run_id: str) -> RunRecord | None:
        """The lost run, now this process's (its heartbeat fresh), when it is still lost: of several processes
        taking up the same run, one gets it. None for the others, or when there is no such run."""
        def take(record: RunRecord) -> RunRecord | None:
            now = time.time()
            if record.cancel or not record.lost(now):
                return None
            return replace(record, owner=this_process(), heartbeat=now, state="running", reason="")

        return self.update(run_id, take)

    def request_cancel(self, run_id: str) -> RunRecord | None:
        """Ask the run to stop (its owner stops after the current batch); None when there is no such run."""
        return self.update(run_id, lambda record: replace(record, cancel=True))
