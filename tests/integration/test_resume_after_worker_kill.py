"""(b) A worker killed (SIGKILL, with its flow-run processes) while an iteration trains: after a
restart and a new trigger, finished stages are skipped (manifests unchanged byte for byte), the
iteration completes, its tables equal those of an uninterrupted run with the same seed, and no
temporary or orphaned object is left behind.

Deterministic: the iteration's one checkpoint upload is held (spark_core.faults) with one file uploaded
(to its final key: remote checkpoints skip the temporary key, the manifest makes them visible) and the
rest not, and the worker is killed there. The after-policy weights were
never written to the store (they stayed in the killed process): the resumed run replays the committed
policy update from its stored rows (snapshot + replay) and must still match the uninterrupted run."""

from __future__ import annotations

import copy
import json
import time

import pytest

from infra.local.processes import alive

from it_helpers import (
    RUN_LEASE_TTL_S,
    TERMINAL,
    TIMINGS,
    ReferenceRun,
    assert_resumed,
    create_flow_run,
    ensure_worker,
    fault_dir,
    flow_run,
    hold,
    manifests,
    read_stage,
    run_root,
    set_crashed,
    wait_flow_run,
    worker_log_tail,
)
from spark_core import faults

# A hung server or flow run fails the test instead of stalling CI (setup of the session stack included).
pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

# The lease of the killed flow run must expire before the new one may start (store lease 30 s via
# SPARK_RUN_LEASE_TTL_S): wait well longer than that.
LOCK_WAIT_S = 180
POINT = "mid_write"


def _wait_any_held(api: str, flow_run_id: str, stack, keys: list[str], timeout_s: float = 300) -> int:
    """The pid held at POINT on the first of `keys` the run reaches."""
    held = {k: fault_dir(stack) / f"{k.replace('/', '~')}@{POINT}.held" for k in keys}
    deadline = time.monotonic() + timeout_s
    while not any(p.exists() for p in held.values()):
        assert time.monotonic() < deadline, f"no checkpoint write reached {POINT} in {timeout_s} s\n{worker_log_tail(stack)}"
        run = flow_run(api, flow_run_id)
        assert run["state_type"] not in TERMINAL, (
            f"flow run ended {run['state_type']} before a checkpoint write reached {POINT}\n{worker_log_tail(stack)}"
        )
        time.sleep(0.5)
    [key] = [k for k, p in held.items() if p.exists()]
    return faults.wait_held(fault_dir(stack), key, POINT, timeout_s=10)


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
    # The iteration's one checkpoint is written by its last update (train-reward, or train-policy when no
    # reward phase follows); a flow run that ends first fails the wait with its log.
    keys = [hold(stack, run_id, 1, "checkpoint", POINT)]
    _, first = create_flow_run(prefect_api, dep, params, "resume-first")
    held_pid = _wait_any_held(prefect_api, first["id"], stack, keys)
    flow_pids = stack.flow_run_pids()
    assert held_pid in flow_pids, f"the held writer {held_pid} is not one of the flow-run processes {flow_pids}"
    assert flow_pids, "the worker has no flow-run process while a task runs"
    stack.kill_worker()
    assert [p for p in flow_pids if alive(p, None)] == [], "flow-run processes survived the kill"
    done_before = manifests(s3, root)
    assert "iter=0001/verified" in done_before, sorted(done_before)
    assert "iter=0001/checkpoint" not in done_before and "iter=0001/policy_checkpoint" not in done_before
    last_update = "iter=0001/train/phase=reward" if "iter=0001/reward_samples" in done_before else "iter=0001/train/phase=policy"
    assert last_update not in done_before
    for key in keys:  # the hold that did not fire must not stop the resumed run
        faults.disarm(fault_dir(stack), key, POINT)
    half = [k.rsplit("/", 1)[-1] for k in s3.find(f"{root}/iter=0001/checkpoint")]
    assert half and "_SUCCESS.json" not in half, f"the kill was meant to leave a half-uploaded checkpoint: {half}"
    set_crashed(prefect_api, first["id"], "worker killed by the resume test")
    # The dead holder's run lease must run out soon (flows/guard.py reads SPARK_RUN_LEASE_TTL_S, which
    # the test worker sets), or the new trigger could only fail after LOCK_WAIT_S.
    lease = json.loads(s3.cat_file(f"{root}/_LOCK.json"))
    assert float(lease["expires_at"]) - time.time() <= RUN_LEASE_TTL_S + 5, (
        f"the run lease was not shortened by SPARK_RUN_LEASE_TTL_S={RUN_LEASE_TTL_S} (flows/guard.py must honour "
        f"it for the store lease): {lease}"
    )

    ensure_worker(stack)
    _, second = create_flow_run(prefect_api, dep, params, "resume-second")
    assert second["id"] != first["id"]
    wait_flow_run(prefect_api, second["id"], stack, timeout_s=480)
    TIMINGS["resume test: first trigger -> resumed iteration Completed"] = time.monotonic() - start

    done_after = assert_resumed(s3, root, done_before)
    assert "iter=0001/checkpoint" in done_after
    # The rewrite removed the killed upload's file first: the folder holds exactly what the manifest lists.
    listed = json.loads(done_after["iter=0001/checkpoint"])["files"]
    prefix = f"{root}/iter=0001/checkpoint/"
    on_s3 = sorted(k.split(prefix, 1)[-1] for k in s3.find(prefix.rstrip("/")))
    assert on_s3 == sorted([*listed, "_SUCCESS.json"]), on_s3

    # Same tables as the uninterrupted reference run (iterations 0 and 1).
    reference = {k for k in manifests(s3, reference_run.root) if k.startswith(("iter=0000/", "iter=0001/"))}
    assert set(done_after) == reference
    for stage in sorted(reference):
        if json.loads(done_after[stage])["kind"] != "table":
            continue
        _, table = read_stage(s3, root, stage)
        _, expected = read_stage(s3, reference_run.root, stage)
        assert table.equals(expected), f"{stage} differs from the uninterrupted run"

    assert not s3.exists(f"{root}/_LOCK.json"), "the run lease was not released"
