"""The pipeline stages on the tiny preset in a temporary local store: one whole SPARK iteration stage by
stage, idempotent re-runs, reproducible re-computation, crash repair, and LoRA checkpoints.

Sampling uses `ArithmeticEngine` (right and wrong boxed answers, so the reward phase runs); the tiny
model itself trains, saves and reloads. One test samples with the real HF engine.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
import torch
from safetensors.torch import load_file

from pipeline_engine import ArithmeticEngine
from spark_core import schemas
from spark_core import stages as S
from spark_core.config import SparkConfig
from spark_core.layout import eval_stage
from spark_core.store import Store

RUN = "stages"


def make_cfg(tiny_cfg: SparkConfig, store_dir: Path) -> SparkConfig:
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.store.uri = str(store_dir)
    cfg.eval.benchmarks[0].limit = 4
    cfg.eval.max_rounds = 1
    cfg.eval.pairwise = False
    return cfg


def scripted_workspace() -> S.Workspace:
    ws = S.Workspace()
    ws.engine_factory = lambda cfg, w: ArithmeticEngine(w.get_tokenizer(cfg))
    return ws


def run_iteration(cfg: SparkConfig, store: Store, run_id: str, it: int, ws: S.Workspace) -> dict:
    out = {
        "samples": S.sample_policy(cfg, store, run_id, it, ws),
        "verified": S.verify_policy(cfg, store, run_id, it),
        "pool": S.build_reward_data(cfg, store, run_id, it, ws),
        "train_policy": S.train_policy(cfg, store, run_id, it, ws),
    }
    if out["train_policy"]["reward_phase"]:
        out["reward_samples"] = S.sample_reward(cfg, store, run_id, it, ws)
        out["reward_verified"] = S.verify_reward(cfg, store, run_id, it)
        out["train_reward"] = S.train_reward(cfg, store, run_id, it, ws)
    out["eval"] = S.evaluate(cfg, store, run_id, it, "arithmetic", ws)
    out["finish"] = S.finish_iteration(cfg, store, run_id, it)
    return out


@pytest.fixture(scope="module")
def done(tiny_cfg: SparkConfig, tmp_path_factory: pytest.TempPathFactory) -> tuple[SparkConfig, Store, dict]:
    """Iteration 0 and iteration 1, stage by stage, in a fresh store."""
    root = tmp_path_factory.mktemp("stages")
    cfg = make_cfg(tiny_cfg, root)
    store = Store(str(root))
    ws = scripted_workspace()
    init = S.init_run(cfg, store, RUN, ws)
    S.evaluate(cfg, store, RUN, 0, "arithmetic", ws)
    S.finish_iteration(cfg, store, RUN, 0)
    results = run_iteration(cfg, store, RUN, 1, ws)
    results["init"] = init
    return cfg, store, results


def stage_manifests(store: Store, run_id: str, it: int) -> dict[str, dict]:
    return {s: store.manifest(store.stage_uri(run_id, it, s)) for s in store.list_stages(run_id, it)}


def test_one_iteration_writes_every_stage(done: tuple[SparkConfig, Store, dict]) -> None:
    cfg, store, r = done
    k, q = cfg.sampling.n, cfg.sampling.questions_per_iteration
    assert store.latest(RUN) == 1
    assert store.read_run(RUN)["config_hash"] == cfg.config_hash()
    assert set(store.list_stages(RUN, 0)) == {"checkpoint", "eval/benchmark=arithmetic"}

    listed = store.list_stages(RUN, 1)
    assert listed["samples"] == listed["verified"] == q * k
    assert r["train_policy"]["reward_phase"] is True, "mixed groups must fill the pool in iteration 1"
    for stage in ("reward_items", "reward_pool", "train/phase=policy", "reward_samples", "reward_verified",
                  "train/phase=reward", "checkpoint", "eval/benchmark=arithmetic"):
        assert stage in listed, stage
    # The intermediate after-policy checkpoint is dropped once the iteration completes.
    assert "policy_checkpoint" not in listed

    # Tables carry the contract columns first.
    for stage, schema in [("samples", schemas.SAMPLES), ("verified", schemas.VERIFIED),
                          ("reward_items", schemas.REWARD_ITEMS), ("reward_samples", schemas.REWARD_SAMPLES),
                          ("reward_verified", schemas.REWARD_VERIFIED), ("train/phase=policy", schemas.TRAIN),
                          ("eval/benchmark=arithmetic", schemas.EVAL)]:
        table = store.read_table(store.stage_uri(RUN, 1, stage))
        assert table.schema.names[: len(schema)] == schema.names, stage

    verified = store.read_table(store.stage_uri(RUN, 1, "verified")).to_pandas()
    assert set(verified["reward"]) == {0.0, 1.0}
    pool = store.read_table(store.stage_uri(RUN, 1, "reward_pool"))
    popped = [row["item_id"] for row in pool.to_pylist() if row["popped"]]
    assert len(popped) == cfg.reward_data.reward_batch_size
    assert store.manifest(store.stage_uri(RUN, 1, "reward_pool"))["popped_item_ids"] == popped
    reward = store.read_table(store.stage_uri(RUN, 1, "reward_samples")).to_pandas()
    assert sorted(set(reward["question_id"])) == sorted(popped)
    assert len(reward) == len(popped) * cfg.reward_n

    # Both phases stepped the same optimizer: global steps continue across phases.
    steps_p = store.read_table(store.stage_uri(RUN, 1, "train/phase=policy")).column("step").to_pylist()
    steps_r = store.read_table(store.stage_uri(RUN, 1, "train/phase=reward")).column("step").to_pylist()
    assert steps_p and steps_r and min(steps_r) > max(steps_p)

    ckpt = Path(store.stage_uri(RUN, 1, "checkpoint"))
    assert (ckpt / "config.json").exists() and (ckpt / "trainer_state" / "trainer_state.pt").exists()
    manifest = store.manifest(store.stage_uri(RUN, 1, "samples"))
    assert manifest["inputs"] == [store.stage_uri(RUN, 0, "checkpoint")]
    assert manifest["config_hash"] == cfg.config_hash() and manifest["seconds"] >= 0

    summary = S.iteration_summary(cfg, store, RUN, 1)
    assert summary["policy_reward"] is not None and 0 < summary["policy_reward"] < 1
    assert summary["reward_phase_reward"] is not None and summary["global_step"] == max(steps_r)
    assert "arithmetic/accuracy" in summary


def test_rerunning_stages_is_a_no_op(done: tuple[SparkConfig, Store, dict]) -> None:
    cfg, store, _ = done
    before = stage_manifests(store, RUN, 1)
    again = run_iteration(cfg, store, RUN, 1, scripted_workspace())
    assert all(v["skipped"] for k, v in again.items() if k != "finish")
    assert S.init_run(cfg, store, RUN)["skipped"] is True
    assert stage_manifests(store, RUN, 1) == before
    assert store.latest(RUN) == 1


def test_deleted_stages_are_recomputed_identically(done: tuple[SparkConfig, Store, dict]) -> None:
    """Everything from `verified` on is deleted and recomputed in a fresh workspace, which must load the
    previous checkpoint and trainer state from the store: same tables, same weights."""
    cfg, store, _ = done
    redo = ["verified", "reward_items", "reward_pool", "train/phase=policy", "reward_samples",
            "reward_verified", "train/phase=reward", "checkpoint", "eval/benchmark=arithmetic"]
    tables = {s: store.read_table(store.stage_uri(RUN, 1, s)) for s in redo if s != "checkpoint"}
    ckpt = Path(store.stage_uri(RUN, 1, "checkpoint"))
    weights = load_file(str(ckpt / "model.safetensors"))
    for stage in redo:
        store.delete(store.stage_uri(RUN, 1, stage))
    assert not store.is_done(store.stage_uri(RUN, 1, "verified"))

    run_iteration(cfg, store, RUN, 1, scripted_workspace())
    for stage, table in tables.items():
        again = store.read_table(store.stage_uri(RUN, 1, stage))
        assert again.equals(table), stage
    rebuilt = load_file(str(ckpt / "model.safetensors"))
    assert rebuilt.keys() == weights.keys()
    for name in weights:
        torch.testing.assert_close(rebuilt[name], weights[name], rtol=0, atol=1e-6)


def test_a_crash_between_checkpoint_and_table_is_repaired(done: tuple[SparkConfig, Store, dict]) -> None:
    """Training writes the checkpoint first; if the metrics table is lost, re-running restores it from the
    checkpoint's manifest without training again (the checkpoint stays the same write)."""
    cfg, store, _ = done
    table_uri = store.stage_uri(RUN, 1, "train/phase=reward")
    ckpt_uri = store.stage_uri(RUN, 1, "checkpoint")
    rows = store.read_table(table_uri).to_pylist()
    token = store.manifest(ckpt_uri)["token"]
    store.delete(table_uri)
    summary = S.train_reward(cfg, store, RUN, 1, scripted_workspace())
    assert summary["skipped"] is False
    assert store.read_table(table_uri).to_pylist() == rows
    assert store.manifest(ckpt_uri)["token"] == token


def test_missing_inputs_and_config_changes_fail_clearly(done: tuple[SparkConfig, Store, dict]) -> None:
    cfg, store, _ = done
    with pytest.raises(S.StageError, match="samples is missing"):
        S.verify_policy(cfg, store, RUN, 2)
    with pytest.raises(S.StageError, match="checkpoint is missing"):
        S.sample_policy(cfg, store, RUN, 3, scripted_workspace())
    changed = cfg.model_copy(deep=True)
    changed.train.lr = 0.5
    with pytest.raises(S.StageError, match="different config"):
        S.init_run(changed, store, RUN)
    with pytest.raises(S.StageError, match="no benchmark named"):
        S.evaluate(cfg, store, RUN, 1, "nope")


def test_seeds_are_per_stage_and_stable() -> None:
    assert S.stage_seed(0, 1, "samples") == S.stage_seed(0, 1, "samples")
    assert len({S.stage_seed(0, 1, "samples"), S.stage_seed(0, 2, "samples"),
                S.stage_seed(1, 1, "samples"), S.stage_seed(0, 1, "reward_samples")}) == 4


def test_hf_engine_sampling_is_reproducible(tiny_cfg: SparkConfig, tmp_path: Path) -> None:
    """The real in-process engine: deleting `samples` and re-sampling in a new process-like workspace
    gives the same completions and token ids."""
    from spark_core.engines.hf import HFEngine

    cfg = make_cfg(tiny_cfg, tmp_path)
    store = Store(str(tmp_path))
    S.init_run(cfg, store, "hf", S.Workspace())
    ws = S.Workspace()
    S.sample_policy(cfg, store, "hf", 1, ws)
    assert isinstance(ws.engine, HFEngine) and ws.engine.model is ws.model  # shares the trainer's model
    uri = store.stage_uri("hf", 1, "samples")
    first = store.read_table(uri)
    assert first.num_rows == cfg.sampling.questions_per_iteration * cfg.sampling.n
    store.delete(uri)
    S.sample_policy(cfg, store, "hf", 1, S.Workspace())
    assert store.read_table(uri).equals(first)


def test_openai_engine_config_samples_from_the_server(tiny_cfg: SparkConfig, tmp_path: Path) -> None:
    """sampling.engine=openai goes through engines.factory: the stage's prompts reach the (stand-in)
    OpenAI-compatible server with the configured model name, and its token ids land in `samples`."""
    from test_openai_engine import StandIn, start_standin

    from spark_core.engines.openai import OpenAIEngine

    state = StandIn(honour_n=True, token_ids=True)
    server, url = start_standin(state)
    try:
        cfg = make_cfg(tiny_cfg, tmp_path)
        cfg.sampling.engine = "openai"
        cfg.sampling.openai_base_url = url
        cfg.sampling.openai_model = "standin-model"
        store = Store(str(tmp_path))
        ws = S.Workspace()
        S.init_run(cfg, store, "oa", ws)
        S.sample_policy(cfg, store, "oa", 1, ws)
        assert isinstance(ws.engine, OpenAIEngine)
        samples = store.read_table(store.stage_uri("oa", 1, "samples")).to_pylist()
        requests = [r for r in state.requests if r["path"] == "/v1/completions"]
        assert {r["model"] for r in requests} == {"standin-model"}
        assert sorted(r["prompt"] for r in requests) == sorted(row["prompt"] for row in samples if row["sample_idx"] == 0)
        assert len(samples) == cfg.sampling.questions_per_iteration * cfg.sampling.n
        assert all(row["completion_ids"] for row in samples)
    finally:
        server.shutdown()


def test_lora_checkpoints_reload_into_the_same_model(tiny_cfg: SparkConfig, tmp_path: Path) -> None:
    from peft import PeftModel

    cfg = make_cfg(tiny_cfg, tmp_path)
    cfg.model.lora = {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    cfg.eval.every = 0
    cfg.store.intermediate_checkpoints = True  # the after-policy checkpoint is written too (its format is tested)
    store = Store(str(tmp_path))
    ws = scripted_workspace()
    S.init_run(cfg, store, "lora", ws)
    S.sample_policy(cfg, store, "lora", 1, ws)
    S.verify_policy(cfg, store, "lora", 1)
    S.build_reward_data(cfg, store, "lora", 1, ws)
    summary = S.train_policy(cfg, store, "lora", 1, ws)
    ckpt = Path(store.stage_uri("lora", 1, "policy_checkpoint" if summary["reward_phase"] else "checkpoint"))
    assert (ckpt / "adapter" / "adapter_config.json").exists() and (ckpt / "spark_lora.json").exists()

    ids = ws.get_tokenizer(cfg)("What is 2 + 3?", return_tensors="pt").input_ids
    fresh = S.Workspace().use(cfg, store, str(ckpt))
    model = fresh.get_model(cfg)
    assert isinstance(model, PeftModel)
    with torch.no_grad():
        live = ws.model.eval()(input_ids=ids).logits
        reloaded = model.eval()(input_ids=ids).logits
    torch.testing.assert_close(reloaded, live)
    trainer = fresh.get_trainer(cfg, store, "lora")
    assert trainer.global_step == ws.trainer.global_step


def test_eval_schedule() -> None:
    cfg = SparkConfig(iterations=5)
    cfg.eval.every = 2
    assert [i for i in range(6) if S.eval_due(cfg, i)] == [0, 2, 4, 5]
    cfg.eval.every = 0
    assert not any(S.eval_due(cfg, i) for i in range(6))


def test_eval_table_rows_match_the_benchmark(done: tuple[SparkConfig, Store, dict]) -> None:
    cfg, store, _ = done
    table = store.read_table(store.stage_uri(RUN, 1, eval_stage("arithmetic")))
    assert table.num_rows == cfg.eval.benchmarks[0].limit
    assert isinstance(table, pa.Table)
    frame = S.metrics_frame(cfg, store, RUN)
    assert list(frame["iteration"]) == [0, 1]
