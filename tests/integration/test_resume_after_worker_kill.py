"""(b) A worker killed (SIGKILL, with its flow-run processes) while an iteration trains: after a
restart and a new trigger, finished stages are skipped (manifests unchanged byte for byte), the
iteration completes, its tables equal those of an uninterrupted run with the same seed, and no
temporary object is left behind."""

from __future__ import annotations

import copy
import json
import time

import pytest

from infra.local.processes import alive

from it_helpers import (
    RUN_LEASE_TTL_S,
    TIMINGS,
    ReferenceRun,
    create_flow_run,
    ensure_worker,
    manifests,
    read_stage,
    run_root,
    set_crashed,
    stray_tmp_keys,
    wait_flow_run,
    wait_task_state,
)

# A hung server or flow run fails the test instead of stalling CI (setup of the session stack included).
pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

# The lease of the killed flow run must expire before the new one may start (store lease 30 s via
# SPARK_RUN_LEASE_TTL_S; Prefect's concurrency slot lease is at least 60 s): wait longer than both.
LOCK_WAIT_S = 180


def test_killed_iteration_resumes_from_the_store(worker, prefect_api, deployed, s3, reference_run: ReferenceRun):
    stack = worker
    store_uri = stack.store_uri("resume")
    config = copy.deepcopy(reference_run.config)
    config["store"]["uri"] = store_uri
    run_id = reference_run.run_id  # same id and seed, other prefix: the tables must come out equal
    root = run_root(store_uri, run_id)
    params = {"run_id": run_id, "config": config, "lock_wait_s": LOCK_WAIT_S}
    dep = deployed["spark-iteration"].id

    start = time.monotonic()
    _, first = create_flow_run(prefect_api, dep, params, "resume-first")
    wait_task_state(prefect_api, first["id"], "train-policy-it1", "RUNNING", stack)
    flow_pids = stack.flow_run_pids()
    assert flow_pids, "the worker has no flow-run process while a task runs"
    stack.kill_worker()
    assert [p for p in flow_pids if alive(p, None)] == [], "flow-run processes survived the kill"
    done_before = manifests(s3, root)
    assert "iter=0001/verified" in done_before, sorted(done_before)
    assert "iter=0001/checkpoint" not in done_before and "iter=0001/train/phase=policy" not in done_before
    set_crashed(prefect_api, first["id"], "worker killed by the resume test")
    # The dead holder's run lease must run out soon (flows/guard.py reads SPARK_RUN_LEASE_TTL_S, which
    # the test worker sets), or the new trigger could only fail after LOCK_WAIT_S.
    lease = json.loads(s3.cat_file(f"{root}/_LOCK.json"))
    assert float(lease["expires_at"]) - time.time() <= RUN_LEASE_TTL_S + 5, (
        f"the run lease was not shortened by SPARK_RUN_LEASE_TTL_S={RUN_LEASE_TTL_S} (flows/guard.py must honour "
        f"it for the store lease and the Prefect slot's lease_duration): {lease}"
    )

    ensure_worker(stack)
    _, second = create_flow_run(prefect_api, dep, params, "resume-second")
    assert second["id"] != first["id"]
    wait_flow_run(prefect_api, second["id"], stack, timeout_s=480)
    TIMINGS["resume test: first trigger -> resumed iteration Completed"] = time.monotonic() - start

    done_after = manifests(s3, root)
    for stage, manifest in done_before.items():
        assert done_after[stage] == manifest, f"{stage} was rewritten on resume"
    assert "iter=0001/checkpoint" in done_after
    assert s3.cat_file(f"{root}/LATEST").strip() == b"1"

    # Same tables as the uninterrupted reference run (iterations 0 and 1).
    reference = {k for k in manifests(s3, reference_run.root) if k.startswith(("iter=0000/", "iter=0001/"))}
    assert set(done_after) == reference
    for stage in sorted(reference):
        if json.loads(done_after[stage])["kind"] != "table":
            continue
        _, table = read_stage(s3, root, stage)
        _, expected = read_stage(s3, reference_run.root, stage)
        assert table.equals(expected), f"{stage} differs from the uninterrupted run"

    assert stray_tmp_keys(s3, root) == []
    assert not s3.exists(f"{root}/_LOCK.json"), "the run lease was not released"
