"""The pieces under queued runs: the run ledger and task locks on a real redis-server, and the backoff."""

from __future__ import annotations

import logging
import uuid

import httpx
import pytest
from label_studio_sdk.core.api_error import ApiError

from backend.labelstudio.backoff import Backoff, is_transient, with_backoff
from backend.storage.job_ledger import RUN_TTL_SECONDS, ProcessLedger, Outcome, RedisLedger
from backend.jobs.locks import RedisLocks
from backend.net.fetch import ImageFetchError


@pytest.mark.parametrize("make_ledger", ["memory", "redis"])
def test_each_item_is_settled_and_counted_once(make_ledger, redis_server):
    connection = redis_server.client()
    ledger = ProcessLedger(4) if make_ledger == "memory" else RedisLedger.create(connection, "project", "7", 4)
    ledger.begin()
    assert ledger.record("12", Outcome.DONE) is True
    assert ledger.record("12", Outcome.FAILED, "late") is False  # a chunk run again changes nothing
    assert ledger.record("3", Outcome.FAILED, "HTTP 404") and ledger.record("20", Outcome.SKIPPED)
    assert ledger.settled("12") and not ledger.settled("99")
    progress = ledger.progress()
    assert (progress.total, progress.done, progress.skipped, progress.failed) == (4, 1, 1, 1)
    assert progress.failures == [("3", "HTTP 404")] and not progress.complete
    ledger.record("4", Outcome.DONE)
    assert ledger.progress().complete


def test_redis_runs_are_listed_and_keep_the_first_workers_model_version(redis_server):
    connection = redis_server.client()
    ledger = RedisLedger.create(connection, "folder", "/data/out", 2)
    assert RedisLedger.recent(connection, 1) == [ledger.run_id]
    assert ledger.claim_model_version("v-gpu") == "v-gpu"
    assert ledger.claim_model_version("v-cpu") == "v-gpu"
    ledger.add_jobs(["a", "b"])
    assert ledger.job_ids() == ["a", "b"] and ledger.fields()["chunks"] == "2"


def test_every_chunk_of_a_run_gets_the_memory_its_first_chunk_read(redis_server):
    connection = redis_server.client()
    with_memory = RedisLedger.create(connection, "project", "p1", 4)
    assert with_memory.claim_memory(lambda: b"revision 3") == b"revision 3"
    assert with_memory.claim_memory(lambda: b"revision 4") == b"revision 3"
    assert RedisLedger(connection, with_memory.run_id).claim_memory(lambda: None) == b"revision 3"
    assert 0 < connection.ttl(with_memory.memory_key) <= RUN_TTL_SECONDS
    with_memory.release_memory()
    assert not connection.exists(with_memory.memory_key)
    without = RedisLedger.create(connection, "project", "p2", 4)
    assert without.claim_memory(lambda: None) is None
    assert without.claim_memory(lambda: b"revision 1") is None


def test_a_task_lock_held_by_another_writer_is_waited_for_then_given_up(redis_server):
    scope = uuid.uuid4().hex
    # the holder's lease outlasts the waiter's patience whatever the scheduling (equal, they raced)
    connection = redis_server.client()
    holder, waiter = RedisLocks(connection, scope, seconds=5), RedisLocks(connection, scope, seconds=1)
    with holder.holding("5") as refresh:
        assert refresh is not None
        refresh()
        with waiter.holding("5") as second:
            assert second is None  # still held after a whole lease: left to its holder
    with waiter.holding("5") as again:
        assert again is not None  # released


def test_transient_failures_are_retried_with_growing_waits(caplog):
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ApiError(status_code=503, body={"detail": "busy"})
        return "ok"

    with caplog.at_level(logging.WARNING, logger="backend.labelstudio.backoff"):
        assert with_backoff(flaky, "reading task 1", Backoff(attempts=4, first_wait=0.01)) == "ok"
    assert len(calls) == 3
    assert [r.getMessage() for r in caplog.records] == [
        "reading task 1 failed (HTTP 503: busy); try 2 of 4 in 0.0 s",
        "reading task 1 failed (HTTP 503: busy); try 3 of 4 in 0.0 s",
    ]
    assert Backoff(first_wait=1).wait(1) == 1 and Backoff(first_wait=1).wait(4) == 8 and Backoff().wait(20) == 30


def test_final_failures_are_not_retried_and_retries_are_bounded():
    calls = []

    def missing() -> None:
        calls.append(1)
        raise ApiError(status_code=404, body={"detail": "Not found"})

    with pytest.raises(ApiError):
        with_backoff(missing, "reading task 1", Backoff(attempts=5, first_wait=0.01))
    assert len(calls) == 1

    def down() -> None:
        calls.append(1)
        raise httpx.ConnectError("refused")

    with pytest.raises(httpx.ConnectError):
        with_backoff(down, "listing tasks", Backoff(attempts=3, first_wait=0.01))
    assert len(calls) == 4


@pytest.mark.parametrize("error, transient", [
    (ImageFetchError("http_502", "HTTP 502"), True),
    (ImageFetchError("timeout", "no data"), True),
    (ImageFetchError("http_404", "HTTP 404"), False),
    (ImageFetchError("too_large", "big"), False),
    (ApiError(status_code=429, body=None), True),
    (ApiError(status_code=400, body=None), False),
    (httpx.ReadTimeout("slow"), True),
    (ValueError("bad config"), False),
])
def test_what_counts_as_transient(error, transient):
    assert is_transient(error) is transient
