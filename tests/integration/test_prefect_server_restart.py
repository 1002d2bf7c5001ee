"""The Prefect server SIGKILLed (a crash, not a shutdown) and restarted while an iteration runs (its SQLite database kept): the run
ends up complete - by itself if the flow run rode out the outage, else after a re-trigger that resumes
from the store - with every stage committed once, nothing temporary left and LATEST advanced.

Deterministic: the sampling write is held (spark_core.faults) while the server is killed, and released
into the outage, so the task finishes and reports its state while there is no API."""

from __future__ import annotations

import time

import pytest

from it_helpers import (
    SERVER_ENV,
    TERMINAL,
    TIMINGS,
    assert_resumed,
    create_flow_run,
    ensure_worker,
    fault_dir,
    flow_run,
    hold,
    manifests,
    run_root,
    set_crashed,
    tiny_config,
    wait_flow_run,
    wait_held,
)
from spark_core import faults

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]

OUTAGE_S = 15.0
LOCK_WAIT_S = 180  # a crashed first run's store lease (SPARK_RUN_LEASE_TTL_S) must run out before the second


def _settle(api: str, flow_run_id: str, stack, timeout_s: float = 420) -> str:
    """The first run's end: a terminal state, or (its process gone while the API was down) Crashed."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = flow_run(api, flow_run_id)["state_type"]
        if state in TERMINAL:
            return state
        if not stack.flow_run_pids():  # no flow-run process left, yet the server still says RUNNING
            time.sleep(5)  # a last state report may still be on its way
            if flow_run(api, flow_run_id)["state_type"] not in TERMINAL:
                set_crashed(api, flow_run_id, "flow-run process gone after the Prefect server restart")
                return "CRASHED (process gone)"
        time.sleep(2)
    raise AssertionError(f"flow run {flow_run_id} neither ended nor lost its process in {timeout_s} s")


def test_iteration_survives_a_killed_prefect_server(worker, prefect_api, deployed, s3):
    stack = worker
    store_uri = stack.store_uri("server-restart")
    config = tiny_config(store_uri, stack.state_dir / "cache" / "models", eval={"every": 0})
    run_id = "tiny-server-restart"
    root = run_root(store_uri, run_id)
    params = {"run_id": run_id, "config": config, "lock_wait_s": LOCK_WAIT_S}
    dep = deployed["spark-iteration"].id
    start = time.monotonic()

    key = hold(stack, run_id, 1, "samples", "before_write")
    _, first = create_flow_run(prefect_api, dep, params, "server-restart-first")
    wait_held(prefect_api, first["id"], stack, key, "before_write")
    stack.kill_server()  # no graceful shutdown: whatever SQLite had not committed is gone
    assert not stack.server_healthy()
    faults.release(fault_dir(stack), key, "before_write")  # the task finishes while there is no API
    time.sleep(OUTAGE_S)
    TIMINGS["Prefect server SIGKILL: back up after"] = stack.start_server(extra_env=SERVER_ENV)

    outcome = _settle(prefect_api, first["id"], stack)
    TIMINGS[f"Prefect server restart: first run ended {outcome}"] = time.monotonic() - start
    done_first = manifests(s3, root)
    if outcome != "COMPLETED":
        ensure_worker(stack)  # the worker may have given up on the API while it was down
        _, second = create_flow_run(prefect_api, dep, params, "server-restart-second")
        wait_flow_run(prefect_api, second["id"], stack, timeout_s=600)
    TIMINGS["Prefect server restart test: trigger -> iteration complete"] = time.monotonic() - start

    done = assert_resumed(s3, root, done_first)
    for stage in ("samples", "verified", "train/phase=policy", "checkpoint"):
        assert f"iter=0001/{stage}" in done, sorted(done)
    print(f"Prefect server restart: first flow run ended {outcome}; stages committed then: {len(done_first)}")
