"""One trigger at a time per run: the run lease in the store.

Two triggers of the same run (two schedules firing, a manual run beside a scheduled one) must never run
the same iteration. The guard is the lease ``runs/{id}/_LOCK.json`` (`spark_core.lock.RunLock`), taken
before an iteration decides which iteration is next. Taking it is atomic (judged and written under a
file lock of the run folder on a local store, a conditional PUT on S3), so it holds whichever Prefect
server the flows talk to, or none.

It used to be doubled by a one-slot Prefect global concurrency limit ``spark-run-{run}``. That added
nothing the lease does not guarantee, and cost: on a SQLite Prefect server every slot request and release
is a database write, which fails with "database is locked" while another write is going on, and the
client retries after about 2 s (Prefect 3.9.1, ``client/base.py``).

A second trigger waits up to ``wait_s`` seconds, then fails with a message naming the holder.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

from spark_core.lock import RunLock
from spark_core.store import Store

# The lease is renewed in the background while the holder lives. When it dies the lease expires after
# LEASE_TTL_S (at once when the holder ran on this machine: its pid is gone), so a re-trigger after a
# crash succeeds when it waits DEFAULT_WAIT_S. SPARK_RUN_LEASE_TTL_S shortens it (tests kill workers).
LEASE_TTL_S = float(os.environ.get("SPARK_RUN_LEASE_TTL_S", "120"))
DEFAULT_WAIT_S = 150.0


@contextmanager
def run_guard(store: Store, run_id: str, wait_s: float = DEFAULT_WAIT_S) -> Iterator[RunLock]:
    """Hold the run's store lease for the duration of the block."""
    with store.run_lock(run_id, ttl_s=LEASE_TTL_S, wait_s=wait_s) as lock:
        yield lock
