"""Helpers of the integration tests: trigger deployments over Prefect's REST API, wait for states, and
read what a run left in the S3 store (with s3fs, from outside the pipeline's own code)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs

from infra.local import Stack, StackError
from infra.local.processes import http_json
from spark_core import faults
from spark_core.config import load_config

TERMINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
SUCCESS = "_SUCCESS.json"
TMP_MARK = "_tmp-"
# The Prefect server on SQLite answers 503 while its database is busy (2 shared cores, several flow
# runs writing states): every request here is idempotent (creates carry an idempotency key), so retry.
API_RETRIES = 6

TIMINGS: dict[str, float] = {}

# The run guard no longer takes a Prefect concurrency slot (flows/guard.py), but a user-configured
# `gpu_concurrency_tag` limit does: its slot leases are at least 60 s and the server looks for expired
# ones every 15 s by default. A short loop lets a crashed flow run's slot come back soon after expiry.
SERVER_ENV = {"PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS": "2"}
RUN_LEASE_TTL_S = 30


def fault_dir(stack: Stack) -> Path:
    """Where tests arm fault holds for the worker's flow runs (spark_core.faults)."""
    return stack.state_dir / "faults"


def worker_env(stack: Stack) -> dict[str, str]:
    """Environment of the worker and so of every flow run."""
    fault_dir(stack).mkdir(parents=True, exist_ok=True)
    return {
        # Fault tests hold a stage write at a named point instead of racing a task (spark_core.faults).
        faults.ENV: str(fault_dir(stack)),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "SPARK_CACHE_DIR": str(stack.state_dir / "cache" / "checkpoints"),
        # A killed flow run's run lease must expire within a test's time (the default is 10 min).
        "SPARK_RUN_LEASE_TTL_S": str(RUN_LEASE_TTL_S),
    }


def started(what: str, start: Callable[[], float]) -> float:
    """Start a component; a failure fails the test with the component's log tail (no silent skip)."""
    try:
        seconds = start()
    except StackError as err:
        pytest.fail(f"{what} could not start: {err}", pytrace=False)
    if seconds:  # 0.0 means it was already running
        TIMINGS[f"start {what}"] = seconds
    return seconds


def ensure_worker(stack: Stack) -> None:
    started("Prefect worker", lambda: stack.start_worker(extra_env=worker_env(stack)))


@dataclass(frozen=True)
class ReferenceRun:
    run_id: str
    store_uri: str
    root: str  # s3fs path of runs/{run_id}
    config: dict
    flow_run: dict
    seconds: float


def tiny_config(store_uri: str, cache_dir: Path, **overrides: Any) -> dict[str, Any]:
    """The `tiny` preset as a complete JSON config (what the deployment's form submits)."""
    cfg = load_config(preset="tiny", overrides={"model": {"cache_dir": str(cache_dir)}, **overrides})
    data = cfg.model_dump(mode="json")
    data["store"]["uri"] = store_uri
    return data


def s3_filesystem(stack: Stack) -> s3fs.S3FileSystem:
    env = stack.env()
    return s3fs.S3FileSystem(
        key=env["AWS_ACCESS_KEY_ID"],
        secret=env["AWS_SECRET_ACCESS_KEY"],
        client_kwargs={"endpoint_url": env["AWS_ENDPOINT_URL"], "region_name": env["AWS_DEFAULT_REGION"]},
        # Other processes write the bucket: never answer from a cached listing.
        use_listings_cache=False,
        skip_instance_cache=True,
    )


def create_flow_run(
    api: str, deployment_id: str, parameters: dict[str, Any], idempotency_key: str | None = None,
    tags: list[str] | None = None,
) -> tuple[int, dict[str, Any]]:
    """POST /deployments/{id}/create_flow_run; returns (HTTP status, flow run)."""
    body: dict[str, Any] = {"parameters": parameters, "idempotency_key": idempotency_key or uuid.uuid4().hex}
    if tags:
        body["tags"] = tags
    url = f"{api}/deployments/{deployment_id}/create_flow_run"
    status, run = http_json("POST", url, body, timeout=30, retries=API_RETRIES)
    assert status in (200, 201), f"create_flow_run answered {status}: {run}"
    return status, run


def flow_run(api: str, flow_run_id: str) -> dict[str, Any]:
    status, run = http_json("GET", f"{api}/flow_runs/{flow_run_id}", timeout=15, retries=API_RETRIES)
    assert status == 200, f"GET flow run {flow_run_id}: {status} {run}"
    return run


def wait_flow_run(api: str, flow_run_id: str, stack: Stack, timeout_s: float = 300) -> dict[str, Any]:
    """Wait for a terminal state; fail with the state message and the worker log tail unless Completed."""
    deadline = time.monotonic() + timeout_s
    while True:
        run = flow_run(api, flow_run_id)
        if run["state_type"] in TERMINAL:
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"flow run {flow_run_id} still {run['state_type']} after {timeout_s} s\n"
                                 f"{worker_log_tail(stack)}")
        time.sleep(1)
    message = run["state"].get("message")
    assert run["state_type"] == "COMPLETED", (
        f"flow run {flow_run_id} ended {run['state_type']}: {message}\n{worker_log_tail(stack)}"
    )
    return run


def task_runs(api: str, flow_run_id: str) -> list[dict[str, Any]]:
    body = {"flow_runs": {"id": {"any_": [flow_run_id]}}, "sort": "EXPECTED_START_TIME_ASC", "limit": 200}
    status, runs = http_json("POST", f"{api}/task_runs/filter", body, timeout=15, retries=API_RETRIES)
    assert status == 200, f"task_runs/filter: {status} {runs}"
    return runs


def settled_task_runs(api: str, flow_run_id: str, names: tuple[str, ...] = (),
                      timeout_s: float = 120.0) -> list[dict[str, Any]]:
    """The task runs of an ended flow run once the server shows every one of them ended (and `names`
    among them). The server writes task runs from the client's events, after the flow run's own final
    state: right after a flow run completes, its last task runs can still read RUNNING or be missing on
    a busy machine. Returns what it has at the deadline; the caller's assertions then say what is off."""
    deadline = time.monotonic() + timeout_s
    while True:
        runs = task_runs(api, flow_run_id)
        if all(t["state_type"] in TERMINAL for t in runs) and set(names) <= {t["name"] for t in runs}:
            return runs
        if time.monotonic() > deadline:
            return runs
        time.sleep(0.5)


def hold(stack: Stack, run_id: str, iteration: int, stage: str, point: str) -> str:
    """Arm a hold of the worker's write of `stage` at `point`; returns the stage key to wait on."""
    key = f"runs/{run_id}/iter={iteration:04d}/{stage}"
    faults.arm(fault_dir(stack), key, point)
    return key


def wait_held(api: str, flow_run_id: str, stack: Stack, key: str, point: str, timeout_s: float = 300) -> int:
    """Block until the flow run is held at (key, point); fail with the worker log if it ended first."""
    last = {"at": 0.0, "alive": True}

    def alive() -> bool:  # ask the API at most once a second (the hold file is checked every 50 ms)
        if time.monotonic() - last["at"] >= 1.0:
            last.update(at=time.monotonic(), alive=flow_run(api, flow_run_id)["state_type"] not in TERMINAL)
        return bool(last["alive"])

    try:
        return faults.wait_held(fault_dir(stack), key, point, timeout_s=timeout_s, alive=alive)
    except (TimeoutError, RuntimeError) as err:
        raise AssertionError(f"{err}\n{worker_log_tail(stack)}") from None


def set_crashed(api: str, flow_run_id: str, message: str) -> None:
    """Mark a flow run whose process was killed as Crashed (what zombie detection would do)."""
    body = {"state": {"type": "CRASHED", "name": "Crashed", "message": message}, "force": True}
    url = f"{api}/flow_runs/{flow_run_id}/set_state"
    status, answer = http_json("POST", url, body, timeout=15, retries=API_RETRIES)
    assert status in (200, 201), f"set_state: {status} {answer}"


def worker_log_tail(stack: Stack, lines: int = 60) -> str:
    log = stack.state_dir / "worker.log"
    text = log.read_text(errors="replace").splitlines()[-lines:] if log.exists() else ["(no worker log)"]
    return "--- worker log tail ---\n" + "\n".join(text)


def run_root(store_uri: str, run_id: str) -> str:
    """`bucket/prefix/runs/{run_id}` (s3fs paths have no scheme)."""
    return f"{store_uri.removeprefix('s3://').rstrip('/')}/runs/{run_id}"


def manifests(fs: s3fs.S3FileSystem, root: str) -> dict[str, bytes]:
    """Every `_SUCCESS.json` under a run, keyed by stage path relative to the run (`iter=0001/samples`)."""
    out = {}
    for key in fs.find(root):
        if key.endswith("/" + SUCCESS) and TMP_MARK not in key:
            out[key[len(root) + 1 : -len(SUCCESS) - 1]] = fs.cat_file(key)
    return out


def read_stage(fs: s3fs.S3FileSystem, root: str, stage: str) -> tuple[dict[str, Any], Any]:
    """(manifest, pyarrow table) of a table stage, reading exactly the parts its manifest lists; a column
    the folder supplies (`phase` of `train/phase=policy`, not stored in the files) is added back."""
    manifest = json.loads(fs.cat_file(f"{root}/{stage}/{SUCCESS}"))
    tables = [pq.read_table(f"{root}/{stage}/{name}", filesystem=fs) for name in manifest["files"]]
    table = pa.concat_tables(tables) if tables else None
    partition = manifest.get("partition_columns") or {}
    for name, info in sorted(partition.items(), key=lambda kv: kv[1]["index"]):
        assert name not in table.column_names, f"{stage}: {name} is both a column and the folder"
        table = table.add_column(info["index"], name, pa.array([info["value"]] * table.num_rows, pa.string()))
    return manifest, table


def stray_tmp_keys(fs: s3fs.S3FileSystem, root: str) -> list[str]:
    return [key for key in fs.find(root) if TMP_MARK in key]


def assert_resumed(fs: s3fs.S3FileSystem, root: str, before: dict[str, bytes], latest: int = 1) -> dict[str, bytes]:
    """After a fault and recovery: every stage committed `before` is unchanged byte for byte, LATEST is
    `latest` and no temporary key is left; returns the run's manifests now."""
    after = manifests(fs, root)
    for stage, manifest in before.items():
        assert after.get(stage) == manifest, f"{stage} was rewritten (or lost) during recovery"
    assert fs.cat_file(f"{root}/LATEST").strip() == str(latest).encode()
    assert stray_tmp_keys(fs, root) == []
    return after
