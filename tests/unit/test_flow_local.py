"""The Prefect flows on the tiny preset against a temporary Prefect API (prefect_test_harness):
a two-iteration run with both SPARK phases, resuming after LATEST, repairing an interrupted
iteration, refusing a concurrent trigger, artifacts, and `spark run` end to end.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import pytest
from prefect.artifacts import Artifact
from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency
from prefect.testing.utilities import prefect_test_harness
from typer.testing import CliRunner

from flows.cli import app
from flows.guard import limit_name
from flows.iteration import spark_iteration
from flows.run import spark_run
from pipeline_engine import ArithmeticEngine
from spark_core import stages as S
from spark_core.config import SparkConfig
from spark_core.store import RunLockedError, Store
from tasks.publish import artifact_keys, artifact_slug

RUN = "flow"


@pytest.fixture(scope="module")
def prefect_api() -> Iterator[None]:
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def scripted_sampling() -> Iterator[None]:
    """Sampling in the process-wide workspace answers right and wrong, so the reward phase runs."""
    ws = S.workspace()
    ws.reset()
    ws.engine_factory = lambda cfg, w: ArithmeticEngine(w.get_tokenizer(cfg))
    yield
    ws.engine_factory = None
    ws.reset()


def flow_cfg(tiny_cfg: SparkConfig) -> SparkConfig:
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.eval.benchmarks[0].limit = 2
    cfg.eval.max_rounds = 0
    cfg.eval.pairwise = False
    return cfg


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("flow-store")


def tokens(store: Store, run_id: str, it: int) -> dict[str, str]:
    return {s: store.manifest(store.stage_uri(run_id, it, s))["token"] for s in store.list_stages(run_id, it)}


def test_spark_run_two_iterations(prefect_api: None, scripted_sampling: None, tiny_cfg: SparkConfig,
                                  store_dir: Path) -> None:
    result = spark_run(config=flow_cfg(tiny_cfg), iterations=2, run_id=RUN, store=str(store_dir))
    store = Store(str(store_dir))
    assert result["latest"] == 2 and store.latest(RUN) == 2
    assert [r["iteration"] for r in result["iterations"]] == [1, 2]
    assert store.list_iterations(RUN) == [0, 1, 2]
    for it in (1, 2):
        listed = store.list_stages(RUN, it)
        for stage in ("samples", "verified", "reward_items", "reward_pool", "train/phase=policy",
                      "reward_samples", "reward_verified", "train/phase=reward", "checkpoint",
                      "eval/benchmark=arithmetic"):
            assert stage in listed, (it, stage)
        assert Path(store.iter_uri(RUN, it), "report", "metrics.png").read_bytes()[:4] == b"\x89PNG"
    # Nothing half-written, no lease left behind.
    assert not list(Path(store.run_uri(RUN)).rglob("_tmp-*"))
    assert not Path(store.run_uri(RUN), "_LOCK.json").exists()
    with get_client(sync_client=True) as client:  # the run's one-slot limit exists and was released
        limit = client.read_global_concurrency_limit_by_name(limit_name(RUN))
    assert limit.limit == 1 and limit.active_slots == 0

    keys = artifact_keys(RUN)
    metrics = Artifact.get(keys["metrics"])
    assert metrics is not None and metrics.type == "table"
    rows = json.loads(metrics.data)
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert Artifact.get(keys["stages"]).type == "markdown"
    assert "verified/part-00000.parquet" in Artifact.get(keys["stages"]).data
    assert "data:image/png;base64," in Artifact.get(keys["summary"]).data


def test_resume_after_a_crash_redoes_only_what_is_missing(prefect_api: None, scripted_sampling: None,
                                                           store_dir: Path) -> None:
    """A crash during iteration 2's policy update: LATEST is still 1 and the later stages are missing.
    Resuming (no config: run.json is the config) skips iterations 0-1 and iteration 2's done stages."""
    store = Store(str(store_dir))
    before = {it: tokens(store, RUN, it) for it in (0, 1, 2)}
    kept = ["samples", "verified", "reward_items", "reward_pool"]
    for stage in before[2]:
        if stage not in kept:
            store.delete(store.stage_uri(RUN, 2, stage))
    store.set_latest(RUN, 1)
    S.workspace().reset()  # a new process: nothing loaded

    result = spark_run(run_id=RUN, store=str(store_dir))
    assert [r["iteration"] for r in result["iterations"]] == [2] and store.latest(RUN) == 2
    after = {it: tokens(store, RUN, it) for it in (0, 1, 2)}
    assert after[0] == before[0] and after[1] == before[1]
    assert {s: after[2][s] for s in kept} == {s: before[2][s] for s in kept}, "done stages are not redone"
    assert set(after[2]) == set(before[2])
    # Complete: another trigger does nothing.
    assert spark_run(run_id=RUN, store=str(store_dir))["iterations"] == []
    assert spark_iteration(run_id=RUN, store=str(store_dir))["status"] == "complete"


def test_a_second_trigger_is_refused_and_writes_nothing(prefect_api: None, store_dir: Path) -> None:
    store = Store(str(store_dir))
    listing = sorted(str(p) for p in Path(store.run_uri(RUN)).rglob("*"))
    with store.run_lock(RUN, ttl_s=60):  # another process holds the store lease
        with pytest.raises(RunLockedError, match="is being run by host"):
            spark_iteration(run_id=RUN, store=str(store_dir), lock_wait_s=0.5)
    with concurrency(limit_name(RUN), occupy=1, strict=True):  # another flow run holds the Prefect slot
        with pytest.raises(RunLockedError, match="concurrency limit spark-run-flow is full"):
            spark_iteration(run_id=RUN, store=str(store_dir), lock_wait_s=0.5)
    after = sorted(str(p) for p in Path(store.run_uri(RUN)).rglob("*") if p.name != "_LOCK.json")
    assert after == [p for p in listing if not p.endswith("_LOCK.json")]


def test_cli_run_prints_metrics_per_iteration(prefect_api: None, tiny_cfg: SparkConfig, tmp_path: Path) -> None:
    """`spark run` with the real HF engine on the tiny model (it never boxes an answer: rewards are 0)."""
    runner = CliRunner()
    args = ["run", "--preset", "tiny", "--store", str(tmp_path), "--run-id", "cli", "--iterations", "1",
            "--set", f"model.cache_dir={tiny_cfg.model.cache_dir}", "--set", "eval.max_rounds=0",
            "--set", "eval.pairwise=false", "--set", "eval.benchmarks=[{name: arithmetic, limit: 2}]"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = [ln for ln in result.stdout.splitlines() if ln.strip()]
    header = next(i for i, ln in enumerate(lines) if "policy_reward" in ln and "arithmetic/accuracy" in ln)
    rows = [ln.split() for ln in lines[header + 1:] if ln.split() and ln.split()[0].isdigit()]
    assert [r[0] for r in rows] == ["0", "1"]
    assert Store(str(tmp_path)).latest("cli") == 1
    assert "spark ls" in result.stdout


def test_artifact_keys_are_valid_prefect_keys() -> None:
    assert artifact_slug("Tiny_Run.2025-01-01 12:00") == "tiny-run-2025-01-01-12-00"
    assert artifact_slug("___") == "run"
    for key in artifact_keys("My.Run").values():
        assert key == key.lower() and all(c.isalnum() or c == "-" for c in key)
