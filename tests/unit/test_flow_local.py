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
from prefect.testing.utilities import prefect_test_harness
from typer.testing import CliRunner

from spark_cli.main import app
from flows.iteration import spark_iteration
from flows.run import progress_key, spark_run
from prefect.logging.handlers import APILogWorker
from pipeline_engine import ArithmeticEngine
from spark_core import stages as S
from spark_core.config import SparkConfig
from spark_core.data_checks import DataError
from spark_core.store import RunLockedError, Store
from tasks.common import describe_outputs
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
    with get_client(sync_client=True) as client:
        # No concurrency limit and no task tags by default: each would cost a slot request per task.
        assert client.read_global_concurrency_limits(limit=100) == []
        task_runs: list = []
        while batch := client.read_task_runs(limit=200, offset=len(task_runs)):
            task_runs += batch
    assert len(task_runs) > 20 and not [t.name for t in task_runs if t.tags]

    keys = artifact_keys(RUN)
    metrics = Artifact.get(keys["metrics"])
    assert metrics is not None and metrics.type == "table"
    rows = json.loads(metrics.data)
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert Artifact.get(keys["stages"]).type == "markdown"
    assert "verified/part-00000.parquet" in Artifact.get(keys["stages"]).data
    assert "data:image/png;base64," in Artifact.get(keys["summary"]).data

    # The run's progress artifact ends at 2 of 2 iterations (it was updated after each one).
    progress = Artifact.get(progress_key(RUN))
    assert progress is not None and progress.type == "progress" and float(progress.data) == 100.0
    assert progress.description == f"Run {RUN}: 2 of 2 iterations complete"

    # Every task logged what it wrote: stage, rows, URI and seconds.
    APILogWorker.drain_all(timeout=30)
    messages, offset = [], 0
    with get_client(sync_client=True) as client:
        while batch := client.read_logs(limit=200, offset=offset):
            messages += [log.message for log in batch]
            offset += len(batch)
    for it, stage in ((1, "verified"), (2, "train/phase=policy"), (0, "checkpoint")):
        uri = store.stage_uri(RUN, it, stage)
        rows = store.manifest(uri).get("rows")
        what = f"{rows} rows" if rows is not None else "checkpoint"
        wrote = [m for m in messages if m.startswith(f"{stage}: wrote {what} to {uri} in ")]
        assert wrote and " s; stage " in wrote[0], (stage, [m for m in messages if stage in m][:5])


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
    header = next(i for i, ln in enumerate(lines) if "policy_rwd" in ln and "judge_acc" in ln and "verdict_parse" in ln)
    rows = [ln.split() for ln in lines[header + 1:] if ln.split() and ln.split()[0].isdigit()]
    assert [r[0] for r in rows] == ["0", "1"]
    assert Store(str(tmp_path)).latest("cli") == 1
    assert "spark ls" in result.stdout


def test_artifact_keys_are_valid_prefect_keys() -> None:
    assert artifact_slug("Tiny_Run.2025-01-01 12:00") == "tiny-run-2025-01-01-12-00"
    assert artifact_slug("___") == "run"
    for key in artifact_keys("My.Run").values():
        assert key == key.lower() and all(c.isalnum() or c == "-" for c in key)


def test_task_log_lines_say_what_was_written_or_skipped() -> None:
    written = {"stage": "verified", "uri": "s3://spark/runs/r/iter=0001/verified", "rows": 32, "seconds": 0.25,
               "skipped": False}
    assert describe_outputs(written, 1.04) == (
        "verified: wrote 32 rows to s3://spark/runs/r/iter=0001/verified in 1.0 s; stage 0.2 s")
    assert describe_outputs({**written, "skipped": True}, 0.1) == (
        "verified: already complete (32 rows at s3://spark/runs/r/iter=0001/verified); nothing to do in 0.1 s")
    assert describe_outputs({"iteration": 1, "latest": 1}) == "done: iteration=1, latest=1"


def test_bad_parameters_fail_the_flow_before_any_model_loads(prefect_api: None, tmp_path: Path) -> None:
    from prefect.exceptions import ParameterTypeError

    from spark_core.config import ConfigError

    S.workspace().reset()
    with pytest.raises(ConfigError, match=r"sampling\.n: Input should be greater than or equal to 2"):
        spark_iteration(run_id="bad", preset="tiny", overrides={"sampling.n": 1}, store=str(tmp_path))
    with pytest.raises(ParameterTypeError, match="sampling"):
        spark_iteration(run_id="bad", preset="tiny", overrides={"sampling": {"n": "many"}}, store=str(tmp_path))
    with pytest.raises(ParameterTypeError, match="preset"):
        spark_run(run_id="bad", preset="huge", store=str(tmp_path))
    assert S.workspace().model is None and not any(tmp_path.iterdir()), "nothing loaded, nothing written"


def _task_runs_of(state) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def test_bad_data_fails_the_flow_before_any_task(prefect_api: None, tiny_cfg: SparkConfig, tmp_path: Path) -> None:
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"question": "1+1?", "answer": "2"}\n{"question": "2+2?", "answer": \n')
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.data.source, cfg.data.path = "file", str(bad)
    state = spark_iteration(run_id="bad-data", config=cfg, store=str(tmp_path / "store"), return_state=True)
    assert state.is_failed()
    with pytest.raises(DataError, match=rf"{bad}: line 2, column \d+: not valid JSON"):
        state.result()
    assert _task_runs_of(state) == []
    assert not (tmp_path / "store" / "runs").exists()


def test_an_invalid_parameter_is_rejected_before_any_task(prefect_api: None, tiny_cfg: SparkConfig,
                                                          tmp_path: Path) -> None:
    """A full config mapping from an API caller is validated against SparkConfig by the flow itself
    (`config` is a plain mapping parameter, so the error is the config's, naming the field)."""
    from spark_core.config import ConfigError

    config = tiny_cfg.model_dump(mode="json")
    config["sampling"]["n"] = 1  # GRPO needs at least 2
    state = spark_iteration(run_id="bad-param", config=config, store=str(tmp_path / "store"), return_state=True)
    assert state.is_failed()
    with pytest.raises(ConfigError, match=r"sampling\.n: Input should be greater than or equal to 2"):
        state.result()
    assert _task_runs_of(state) == []
    assert not (tmp_path / "store" / "runs").exists()


def test_gpu_tasks_carry_the_concurrency_tag_only_when_asked(prefect_api: None, scripted_sampling: None,
                                                             tiny_cfg: SparkConfig, tmp_path: Path) -> None:
    """`gpu_concurrency_tag` tags exactly the GPU-bound task runs (for a server-side tag limit)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName, TaskRunFilter, TaskRunFilterFlowRunId

    result = spark_iteration(run_id="tagged", config=flow_cfg(tiny_cfg), store=str(tmp_path),
                             gpu_concurrency_tag="gpu")
    assert result["status"] == "ran"
    with get_client(sync_client=True) as client:
        [run] = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=["spark-tagged"])))
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[run.id])))
    gpu_bound = ("init-run-", "sample-", "train-", "evaluate-")  # flows.steps.GPU_STEPS, by task run name
    assert {t.name for t in runs if t.name.startswith(gpu_bound)} >= {"init-run-tagged", "sample-policy-it1",
                                                                      "train-policy-it1"}
    wrong = [(t.name, t.tags) for t in runs if t.tags != (["gpu"] if t.name.startswith(gpu_bound) else [])]
    assert not wrong, wrong


def test_embedded_prefect_turns_heartbeats_off_only_without_a_server() -> None:
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as STARTUP_S,
        PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE as RECORDER_BATCH,
        get_current_settings,
        temporary_settings,
    )

    from flows.common import embedded_prefect

    with temporary_settings(updates={PREFECT_API_URL: None}):
        with embedded_prefect() as applied:
            assert applied and PREFECT_FLOWS_HEARTBEAT_FREQUENCY.value() is None and RECORDER_BATCH.value() == 500
            # what the temporary server's process inherits (Prefect passes the set settings as env vars)
            env = get_current_settings().to_environment_variables(exclude_unset=True)
            assert env["PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE"] == "500"
            assert STARTUP_S.value() == 120  # Prefect's 20 s is not enough on a loaded machine
        with temporary_settings(updates={STARTUP_S: 300}), embedded_prefect():
            assert STARTUP_S.value() == 300  # a longer wait the user set is kept
        assert PREFECT_FLOWS_HEARTBEAT_FREQUENCY.value() == 180  # Prefect's default again
        assert RECORDER_BATCH.value() == 1 and STARTUP_S.value() == 20
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:4200/api"}):
        with embedded_prefect() as applied:  # a real server: heartbeats detect crashed runs there
            assert not applied and PREFECT_FLOWS_HEARTBEAT_FREQUENCY.value() == 180 and RECORDER_BATCH.value() == 1


def test_only_the_gpu_steps_get_the_tag() -> None:
    from flows.steps import GPU_STEPS, TASKS

    assert TASKS.with_concurrency_tag(None) is TASKS and TASKS.with_concurrency_tag("") is TASKS
    tagged = TASKS.with_concurrency_tag("gpu")
    for name in ("sample_policy_task", "train_policy_task", "sample_reward_task", "train_reward_task",
                 "evaluate_task", "init_run_task", "verify_policy_task", "publish_task", "finish_iteration_task"):
        assert getattr(tagged, name).tags == ({"gpu"} if name in GPU_STEPS else set()), name
        assert getattr(TASKS, name).tags == set(), name
