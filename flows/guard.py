"""One trigger at a time per run: a Prefect global concurrency limit and a lease in the store.

Two triggers of the same run (two schedules firing, a manual run beside a scheduled one) must never run
the same iteration. Two guards, both taken before an iteration decides which iteration is next:

1. the Prefect global concurrency limit ``spark-run-{run}`` with one slot (created on first use; it
   shows up under Concurrency in the UI, where an operator can also see or reset it);
2. the run lease ``runs/{id}/_LOCK.json`` in the store (`spark_core.store.RunLock`), which also holds
   when flows talk to different Prefect servers or none is reachable.

A second trigger waits up to ``wait_s`` seconds, then fails with a message naming the holder.
"""

from __future__ import annotations

import logging
import os
from contextlib import ExitStack, contextmanager
from typing import Iterator

from prefect.concurrency.sync import concurrency

from spark_core.store import RunLock, RunLockedError, Store
from tasks.common import prefect_slug

log = logging.getLogger(__name__)

# Both leases are renewed in the background while the holder lives. When it dies they expire: the store
# lease after LEASE_TTL_S (at once when the holder ran on this machine: its pid is gone), the Prefect
# slot after SLOT_LEASE_S plus the server's repossessor period (15 s). A re-trigger after a crash
# therefore succeeds when it waits DEFAULT_WAIT_S.
# SPARK_RUN_LEASE_TTL_S shortens the store lease (tests kill workers on purpose); Prefect refuses slot
# leases under 60 s.
LEASE_TTL_S = float(os.environ.get("SPARK_RUN_LEASE_TTL_S", "120"))
SLOT_LEASE_S = max(60.0, min(LEASE_TTL_S, 120.0))
DEFAULT_WAIT_S = 150.0


def limit_name(run_id: str) -> str:
    return f"spark-run-{prefect_slug(run_id)}"


def _ensure_limit(name: str) -> None:
    """Create the one-slot limit if it does not exist (best effort: the store lease is the backstop)."""
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            client.upsert_global_concurrency_limit_by_name(name, limit=1)
    except Exception as err:  # noqa: BLE001 - a race with another creator or an old server
        log.debug("could not create concurrency limit %s: %s", name, err)


@contextmanager
def run_guard(store: Store, run_id: str, wait_s: float = DEFAULT_WAIT_S) -> Iterator[RunLock]:
    """Hold the run's concurrency slot and store lease for the duration of the block."""
    name = limit_name(run_id)
    _ensure_limit(name)
    with ExitStack() as stack:
        try:
            stack.enter_context(concurrency(
                name, occupy=1, timeout_seconds=max(wait_s, 1.0), lease_duration=SLOT_LEASE_S, strict=False
            ))
        except TimeoutError:
            raise RunLockedError(
                f"run {run_id} is being run by another flow run (concurrency limit {name} is full); "
                f"waited {wait_s:g} s"
            ) from None
        yield stack.enter_context(store.run_lock(run_id, ttl_s=LEASE_TTL_S, wait_s=wait_s))
