"""Several RL steps per iteration, and snapshot + replay resume: a tiny run of ONE iteration of three RL
steps is SIGKILLed inside step 2 (twice: before step 2's policy update is committed, then after step 2's
reward samples are), resumed in a fresh process each time, and compared with an uninterrupted run.

The iteration writes no intermediate checkpoint (the default), so each resume must rebuild the live
weights from the iteration's start checkpoint by replaying the committed updates from their stored rows:

* nothing committed is regenerated (same write token: no rollout is sampled twice);
* the resumed run has exactly the stages of the uninterrupted run, every table and checkpoint file
  byte-identical (weights, optimizer, scheduler and RNG state);
* the restarted processes did replay (their logs name the replayed TRAIN tables), and no intermediate
  checkpoint ever existed.

Kills are deterministic: the driver is held at the write with spark_core.faults, then SIGKILLed there.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from spark_core import faults
from spark_core.store import Store

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RUN = "steps"
STEPS = 3
KILLS = [  # (stage below runs/RUN, point): both inside step 2 of 3
    ("iter=0001/train/phase=policy/rl_step=02", "mid_write"),
    ("iter=0001/reward_samples/rl_step=02", "after_write"),
]


def _driver(store: Path, models: Path, fault_dir: Path | None, log_name: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PYTHONPATH": str(REPO)}
    env.pop(faults.ENV, None)
    if fault_dir is not None:
        env[faults.ENV] = str(fault_dir)
    log = open(store.parent / log_name, "ab")
    return subprocess.Popen([sys.executable, str(HERE / "fault_driver.py"), str(store), RUN, str(models), str(STEPS)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _log(store: Path, name: str) -> str:
    return (store.parent / name).read_text(errors="replace")


def _finish(proc: subprocess.Popen, store: Path, log_name: str) -> None:
    rc = proc.wait(timeout=900)
    assert rc == 0, f"the driver failed (rc {rc}):\n{_log(store, log_name)[-4000:]}"


def _committed(store: Store) -> dict[str, str]:
    return {f"iter={it:04d}/{stage}": store.manifest(store.stage_uri(RUN, it, stage))["token"]
            for it in store.list_iterations(RUN) for stage in store.list_stages(RUN, it)}


def _files(store: Store, stage: str) -> dict[str, str]:
    it, name = int(stage.split("/", 1)[0].removeprefix("iter=")), stage.split("/", 1)[1]
    uri = store.stage_uri(RUN, it, name)
    root = Path(store._p(uri))
    return {f: hashlib.sha256((root / f).read_bytes()).hexdigest() for f in store.manifest(uri)["files"]}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("steps-models")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, models: Path) -> Store:
    store_dir = tmp_path_factory.mktemp("steps-reference") / "store"
    _finish(_driver(store_dir, models, None, "reference.log"), store_dir, "reference.log")
    return Store(str(store_dir))


def test_an_iteration_of_three_steps_has_one_checkpoint_and_per_step_tables(reference: Store) -> None:
    stages = set(_committed(reference))
    for stage in ("samples", "verified", "reward_items", "reward_pool", "train/phase=policy", "reward_samples",
                  "reward_verified", "train/phase=reward"):
        assert {f"iter=0001/{stage}/rl_step={s:02d}" for s in (1, 2, 3)} <= stages, stage
    checkpoints = sorted(s for s in stages if "checkpoint" in s)
    assert checkpoints == ["iter=0000/checkpoint", "iter=0001/checkpoint"]
    # The unpartitioned name reads all steps as one table, in step order, with the step as a column.
    samples = reference.read_table(reference.stage_uri(RUN, 1, "samples"))
    assert samples.column("rl_step").to_pylist() == sorted(samples.column("rl_step").to_pylist())
    assert set(samples.column("rl_step").to_pylist()) == {1, 2, 3}
    assert samples.num_rows == 3 * 8 * 4  # steps x questions_per_iteration x n (tiny preset)
    # Every step trained on its own batch: the optimizer step counter runs on across the steps.
    train = reference.read_table(reference.stage_uri(RUN, 1, "train/phase=policy")).to_pylist()
    assert [r["rl_step"] for r in train] == [1, 2, 3]
    assert len({r["step"] for r in train}) == 3
    questions = [set(samples.filter(samples.column("rl_step").to_numpy() == s).column("question_id").to_pylist())
                 for s in (1, 2, 3)]
    assert not (questions[0] & questions[1]) and not (questions[1] & questions[2])


def test_sigkill_in_step_2_of_3_resumes_by_replay_bit_identical(tmp_path: Path, models: Path,
                                                                   reference: Store) -> None:
    store_dir, fault_dir = tmp_path / "store", tmp_path / "faults"
    store = Store(str(store_dir))
    kills: list[dict[str, str]] = []
    for n, (stage, point) in enumerate(KILLS):
        key = f"runs/{RUN}/{stage}"
        faults.arm(fault_dir, key, point)
        proc = _driver(store_dir, models, fault_dir, f"driver{n}.log")
        try:
            faults.wait_held(fault_dir, key, point, timeout_s=600, alive=lambda: proc.poll() is None)
        except (RuntimeError, TimeoutError) as err:
            proc.kill()
            pytest.fail(f"{stage}@{point}: {err}\n{_log(store_dir, f'driver{n}.log')[-4000:]}")
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and anything it started, as a crash would
        proc.wait(timeout=60)
        kills.append(_committed(store))
    _finish(_driver(store_dir, models, None, "final.log"), store_dir, "final.log")
    final = _committed(store)

    # Nothing committed was regenerated: no rollout sampled twice, no update trained into the store twice.
    for committed in kills:
        assert {s: final.get(s) for s in committed} == committed
    assert "iter=0001/samples/rl_step=02" in kills[0] and "iter=0001/train/phase=policy/rl_step=02" not in kills[0]
    assert "iter=0001/reward_samples/rl_step=02" in kills[1]
    # The restarts rebuilt the weights by replay (no intermediate checkpoint exists to load instead).
    run = f"runs/{RUN}/iter=0001"
    first_restart, last_restart = _log(store_dir, "driver1.log"), _log(store_dir, "final.log")
    assert f"{run}/train/phase=policy/rl_step=01" in first_restart and "replaying" in first_restart
    assert f"{run}/train/phase=reward/rl_step=01" in first_restart
    for update in ("policy/rl_step=01", "reward/rl_step=01", "policy/rl_step=02"):
        assert f"replaying {store_dir}/{run}/train/phase={update}" in last_restart, update
    assert "losses differ" not in first_restart + last_restart
    assert not [s for s in final if "policy_checkpoint" in s or "step_checkpoint" in s]

    assert sorted(final) == sorted(_committed(reference))
    different = [s for s in sorted(final) if _files(store, s) != _files(reference, s)]
    assert different == [], f"not byte-identical to the uninterrupted run: {different}"
    assert store.latest(RUN) == 1
