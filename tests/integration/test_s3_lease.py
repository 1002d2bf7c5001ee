"""The run lease on S3 (SeaweedFS): conditional PUTs make taking it atomic, so of several simultaneous
acquirers exactly one wins, a waiting one gets it once released, and a lease written by someone else
since our last write is detected as lost. This lease is the only guard against two triggers running the
same iteration (no Prefect concurrency limit)."""

from __future__ import annotations

import json
import threading
import time
import uuid
from unittest import mock

import pytest

from spark_core.store import RunLockedError, Store

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.fixture
def s3_env(stack, s3):
    env = {k: v for k, v in stack.env().items() if k != "PREFECT_API_URL"}
    with mock.patch.dict("os.environ", env):
        yield f"s3://{stack.settings.bucket}/lease-{uuid.uuid4().hex[:8]}"


def _race(stores: list[Store], run_id: str) -> list[int]:
    barrier = threading.Barrier(len(stores))
    won: list[int] = []

    def attempt(k: int) -> None:
        barrier.wait()
        try:
            stores[k].run_lock(run_id, ttl_s=60, wait_s=0).acquire()
        except RunLockedError:
            return
        won.append(k)

    threads = [threading.Thread(target=attempt, args=(k,)) for k in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return won


def test_simultaneous_acquirers_on_s3_exactly_one_wins(s3_env: str) -> None:
    stores = [Store(s3_env) for _ in range(6)]  # six S3 clients, as six processes would have
    for attempt in range(3):  # a new lease, three times over (timing differs each round)
        assert len(_race(stores, f"absent-{attempt}")) == 1
    stale = stores[0].join(stores[0].run_uri("stale"), "_LOCK.json")
    stores[0]._write_json(stale, {"owner": "dead", "host": "elsewhere", "pid": 1, "expires_at": time.time() - 1})
    assert len(_race(stores, "stale")) == 1
    assert stores[0]._read_json(stale)["owner"] != "dead"


def test_s3_lease_waits_renews_and_detects_a_thief(s3_env: str) -> None:
    a, b = Store(s3_env), Store(s3_env)
    first = a.run_lock("r", ttl_s=30).acquire()
    with pytest.raises(RunLockedError, match="is being run by host"):
        b.run_lock("r", wait_s=0.5, poll_s=0.1).acquire()
    assert first.renew() and first.renew()  # renewing our own lease (If-Match on our ETag) goes on working
    threading.Timer(0.5, first.release).start()
    second = b.run_lock("r", wait_s=20, poll_s=0.1).acquire()
    assert second.held
    uri = b.join(b.run_uri("r"), "_LOCK.json")
    a._write_json(uri, dict(json.loads(b.fs.cat_file(b._p(uri))), owner="thief"))  # someone overwrote it
    assert second.renew() is False
    with pytest.raises(RunLockedError, match="no longer holds"):
        second.check()
    second.release()
    assert json.loads(b.fs.cat_file(b._p(uri)))["owner"] == "thief", "release never deletes someone else's lease"
