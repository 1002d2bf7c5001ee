"""The fault matrix, SIGKILL part: a tiny run killed at a named point of every stage's write, resumed in a
fresh process each time, loses nothing.

One run is driven through a chain of faults: the driver (tests/unit/fault_driver.py, the flow's own
loop and stage functions on a local store) is held at (stage, point) with spark_core.faults, SIGKILLed
there with its whole process group, and started again; the restarted driver is held and killed at the
next fault of the chain, and so on, until a last start completes the run. Then:

* lost: 0 - every stage that was committed when a kill happened is still there with the same write
  token (never regenerated), and the run has exactly the stages of an uninterrupted run;
* every committed table is byte-identical (each Parquet part) to the uninterrupted run with the same
  seed, and every checkpoint file too;
* no temporary key is left, and at each kill the held stage itself was not visible before its manifest.

A chain instead of one run per fault keeps the matrix at about one run's compute plus one interpreter
start per fault. With SPARK_FAULT_REPORT=path each fault's result is appended there as a JSON line
(docs/reliability.md is written from it).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from typing import Iterator

import pytest
from prefect.artifacts import Artifact
from prefect.settings import get_current_settings
from prefect.testing.utilities import prefect_test_harness

from spark_core import faults
from spark_core.store import Store
from tasks.publish import artifact_keys, stage_artifact_key

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RUN = "matrix"

# (stage path below runs/RUN, point), in the order the run writes the stages: every stage of both
# phases, evaluation of iteration 0 and 1, each of the four points at least three times, and the
# LATEST write that closes iteration 1.
CHAIN = [
    ("iter=0000/checkpoint", "mid_write"),
    ("iter=0000/eval/benchmark=arithmetic", "before_manifest"),
    ("iter=0001/samples", "before_write"),
    ("iter=0001/verified", "mid_write"),
    ("iter=0001/reward_items", "before_manifest"),
    ("iter=0001/reward_pool", "after_write"),
    ("iter=0001/train/phase=policy", "mid_write"),  # the after-policy weights are live only: replayed
    ("iter=0001/train/phase=policy", "before_manifest"),
    ("iter=0001/reward_samples", "after_write"),
    ("iter=0001/reward_verified", "before_write"),
    ("iter=0001/checkpoint", "before_manifest"),
    ("iter=0001/train/phase=reward", "mid_write"),
    ("iter=0001/eval/benchmark=arithmetic", "after_write"),
    ("LATEST", "before_write"),  # every stage of iteration 1 committed, the iteration not yet closed
]
# The whole product, every stage at every point (50 faults, ~4 times the chain's time): run on demand
# with SPARK_FAULT_MATRIX=full; docs/reliability.md gives its last result.
STAGE_ORDER = [
    "iter=0000/checkpoint", "iter=0000/eval/benchmark=arithmetic", "iter=0001/samples", "iter=0001/verified",
    "iter=0001/reward_items", "iter=0001/reward_pool", "iter=0001/train/phase=policy",
    "iter=0001/reward_samples", "iter=0001/reward_verified", "iter=0001/checkpoint",
    "iter=0001/train/phase=reward", "iter=0001/eval/benchmark=arithmetic",
]
if os.environ.get("SPARK_FAULT_MATRIX") == "full":
    CHAIN = [(stage, point) for stage in STAGE_ORDER for point in faults.POINTS]
    CHAIN += [("LATEST", "before_write"), ("LATEST", "after_write")]


# Publishing (Prefect artifacts, then LATEST) exists only in the Prefect flow: it is killed there, in
# both iterations, by a driver that runs the real spark-iteration flow against a temporary Prefect API.
PUBLISH_CHAIN = [("iter=0000/publish", "mid_write"), ("iter=0001/publish", "mid_write")]


def _driver(store: Path, models: Path, fault_dir: Path | None, prefect_api: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PYTHONPATH": str(REPO)}
    env.pop(faults.ENV, None)
    if fault_dir is not None:
        env[faults.ENV] = str(fault_dir)
    if prefect_api is not None:
        env.update(SPARK_FAULT_DRIVER_FLOW="1", PREFECT_API_URL=prefect_api)
    log = open(store.parent / "driver.log", "ab")
    return subprocess.Popen([sys.executable, str(HERE / "fault_driver.py"), str(store), RUN, str(models)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _log_tail(store: Path) -> str:
    text = (store.parent / "driver.log").read_text(errors="replace").splitlines()
    return "\n".join(text[-40:])


def _finish(proc: subprocess.Popen, store: Path) -> None:
    rc = proc.wait(timeout=900)
    assert rc == 0, f"the driver failed (rc {rc}):\n{_log_tail(store)}"


def _committed(store: Store) -> dict[str, str]:
    """stage (below the run) -> the write token of its manifest, for every committed stage."""
    out = {}
    for it in store.list_iterations(RUN):
        for stage in store.list_stages(RUN, it):
            uri = store.stage_uri(RUN, it, stage)
            out[f"iter={it:04d}/{stage}"] = store.manifest(uri)["token"]
    return out


def _files(store: Store, stage: str) -> dict[str, str]:
    """sha256 of every file of a committed stage, by name (the manifest's list, plus nothing else)."""
    it, name = int(stage.split("/", 1)[0].removeprefix("iter=")), stage.split("/", 1)[1]
    uri = store.stage_uri(RUN, it, name)
    root = Path(store._p(uri))
    return {f: hashlib.sha256((root / f).read_bytes()).hexdigest() for f in store.manifest(uri)["files"]}


def _tmp_keys(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if "_tmp-" in p.name)


@pytest.fixture(scope="module")
def prefect_api() -> Iterator[str]:
    """A temporary Prefect server (its own database) for the flow-mode driver; yields its API URL."""
    with prefect_test_harness(server_startup_timeout=120):
        yield get_current_settings().api.url


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fault-models")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, models: Path) -> Store:
    """The uninterrupted run (same seed, same run id, another store)."""
    store_dir = tmp_path_factory.mktemp("fault-reference") / "store"
    _finish(_driver(store_dir, models, None), store_dir)
    return Store(str(store_dir))


def test_sigkill_at_every_stage_loses_nothing(tmp_path: Path, models: Path, reference: Store) -> None:
    store_dir, fault_dir = tmp_path / "store", tmp_path / "faults"
    store = Store(str(store_dir))
    expected = _committed(reference)
    assert {stage for stage, _ in CHAIN} <= set(expected) | {"LATEST"}, sorted(expected)
    report_path = os.environ.get("SPARK_FAULT_REPORT")
    kills: list[tuple[str, str, dict[str, str]]] = []

    for stage, point in CHAIN:
        key = f"runs/{RUN}/{stage}"
        faults.arm(fault_dir, key, point)
        proc = _driver(store_dir, models, fault_dir)
        try:
            faults.wait_held(fault_dir, key, point, timeout_s=600, alive=lambda: proc.poll() is None)
        except (RuntimeError, TimeoutError) as err:
            proc.kill()
            pytest.fail(f"{stage}@{point}: {err}\n{_log_tail(store_dir)}")
        committed = _committed(store)
        if stage == "LATEST":  # held before it moves from 0 to 1 (iteration 1 not visible as done), or after
            assert store.latest(RUN) == (0 if point == "before_write" else 1), f"LATEST@{point}: {store.latest(RUN)}"
        else:  # the held stage is visible only once its manifest is written (after_write), never before
            assert (stage in committed) == (point == "after_write"), f"{stage}@{point}: {sorted(committed)}"
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and anything it started, as a crash would
        proc.wait(timeout=60)
        kills.append((stage, point, committed))

    _finish(_driver(store_dir, models, None), store_dir)  # the last restart completes the run
    final = _committed(store)
    results = []
    for stage, point, committed in kills:
        # A committed stage must survive every later restart untouched.
        lost = sorted(s for s, token in committed.items() if final.get(s) != token)
        results.append({"fault": f"SIGKILL at {stage} {point}", "committed_at_kill": len(committed),
                        "lost": len(lost), "lost_stages": lost})
    assert sorted(final) == sorted(expected), "the resumed run's stages differ from an uninterrupted run"
    different = [s for s in sorted(final) if _files(store, s) != _files(reference, s)]
    leftovers = _tmp_keys(store_dir / "runs" / RUN)
    assert store.latest(RUN) == 1
    if report_path:
        with open(report_path, "a") as fh:
            for r in results:
                fh.write(json.dumps({**r, "differs": different, "tmp_left": leftovers}) + "\n")
    for r in results:
        print(f"{r['fault']}: committed {r['committed_at_kill']}, lost: {r['lost']}")
    assert [r for r in results if r["lost"]] == [], results
    assert different == [], f"committed stages not byte-identical to the uninterrupted run: {different}"
    assert leftovers == [], leftovers


def test_sigkill_while_publishing_loses_nothing_and_publishes_again(
        tmp_path: Path, models: Path, reference: Store, prefect_api: str) -> None:
    """Killed between the first and the last artifact of iteration 0, then of iteration 1: the restarted
    flow skips every committed stage, publishes the iteration again in full, and only then moves LATEST."""
    store_dir, fault_dir = tmp_path / "store", tmp_path / "faults"
    store = Store(str(store_dir))
    keys = artifact_keys(RUN)
    kills: list[tuple[str, dict[str, str]]] = []
    for stage, point in PUBLISH_CHAIN:
        key = f"runs/{RUN}/{stage}"
        faults.arm(fault_dir, key, point)
        proc = _driver(store_dir, models, fault_dir, prefect_api)
        try:
            faults.wait_held(fault_dir, key, point, timeout_s=600, alive=lambda: proc.poll() is None)
        except (RuntimeError, TimeoutError) as err:
            proc.kill()
            pytest.fail(f"{stage}@{point}: {err}\n{_log_tail(store_dir)}")
        iteration = int(stage.split("/")[0].removeprefix("iter="))
        # Held with the first artifacts made and the rest not: the iteration is not visible as done.
        assert store.latest(RUN) == (None if iteration == 0 else iteration - 1), store.latest(RUN)
        assert Artifact.get(keys["summary"]) is not None
        if iteration == 0:
            assert Artifact.get(keys["index"]) is None, "the run index was published before the hold"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        kills.append((stage, _committed(store)))

    _finish(_driver(store_dir, models, None, prefect_api), store_dir)
    final = _committed(store)
    for stage, committed in kills:
        lost = sorted(s for s, token in committed.items() if final.get(s) != token)
        print(f"SIGKILL at {stage} mid_write: committed {len(committed)}, lost: {len(lost)}")
        assert lost == [], f"{stage}: committed stages rewritten after the kill: {lost}"
    assert store.latest(RUN) == 1
    assert sorted(final) == sorted(_committed(reference))
    different = [s for s in sorted(final) if _files(store, s) != _files(reference, s)]
    assert different == [], f"committed stages not byte-identical to the uninterrupted run: {different}"
    assert _tmp_keys(store_dir / "runs" / RUN) == []
    # Published again in full: the latest run index and summary are iteration 1's, and every table stage
    # of iteration 1 has its preview.
    assert "iteration 1" in Artifact.get(keys["summary"]).description
    assert "iter=0001" in Artifact.get(keys["index"]).data
    for stage in store.list_stages(RUN, 1):
        if stage != "checkpoint":
            assert Artifact.get(stage_artifact_key(RUN, stage)) is not None, stage
    assert (store_dir / "runs" / RUN / "iter=0001" / "report" / "metrics.png").read_bytes()[:4] == b"\x89PNG"
