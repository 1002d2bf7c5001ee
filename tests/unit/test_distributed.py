"""Multi-process training: launcher command lines, errors, the train task's dispatch, and a real 2-rank
gloo train stage on the CPU compared with the single-process stage."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spark_core import distributed, layout
from spark_core.config import TrainConfig, load_config
from spark_core.distributed import DistributedError, launch
from spark_core.distributed.launch import launcher_command, stage_args

def test_torchrun_command() -> None:
    cmd = launcher_command(TrainConfig(launcher="torchrun", num_processes=4), ["--x", "1"], python="py")
    assert cmd == ["py", "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "4",
                   "-m", "spark_core.distributed", "--x", "1"]


def test_accelerate_command_uses_the_fsdp_config() -> None:
    fsdp = Path(__file__).parents[2] / "infra" / "accelerate" / "fsdp.yaml"
    cfg = TrainConfig(launcher="accelerate", accelerate_config=str(fsdp))
    cmd = launcher_command(cfg, stage_args("s3://b/p", "run1", 3, "reward"), num_processes=8, python="py")
    assert cmd == ["py", "-m", "accelerate.commands.launch", "--num_processes", "8", "--config_file", str(fsdp),
                   "-m", "spark_core.distributed", "--store", "s3://b/p", "--run-id", "run1", "--iteration", "3",
                   "--phase", "reward"]


def test_launcher_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(DistributedError, match="inprocess"):
        launcher_command(TrainConfig(), [])
    if launch.visible_gpu_count() == 0:
        with pytest.raises(DistributedError, match="no GPU is visible: set train.num_processes"):
            launcher_command(TrainConfig(launcher="torchrun"), [])
    with pytest.raises(DistributedError, match="does not exist"):
        launcher_command(TrainConfig(launcher="accelerate", accelerate_config=str(tmp_path / "x.yaml")), [], num_processes=2)
    with pytest.raises(DistributedError, match="phase"):
        stage_args("s", "r", 1, "judge")  # type: ignore[arg-type]


def test_qwen_preset_launches_accelerate_over_all_gpus() -> None:
    cfg = load_config(preset="qwen2.5-7b")
    assert cfg.train.launcher == "accelerate" and cfg.train.num_processes is None
    cmd = launcher_command(cfg.train, [], num_processes=8, python="py")
    assert cmd[cmd.index("--config_file") + 1] == "infra/accelerate/fsdp.yaml"


def test_failed_launch_reports_the_output_tail() -> None:
    cmd = [sys.executable, "-c", "import sys; print('rank 1 exploded: CUDA error'); sys.exit(7)"]
    with pytest.raises(DistributedError, match="exit 7") as err:
        launch.run_launcher(cmd, "torchrun")
    assert "rank 1 exploded" in str(err.value)
    with pytest.raises(DistributedError, match="cannot start"):
        launch.run_launcher(["/no/such/python"], "torchrun")


def test_single_process_helpers_are_no_ops() -> None:
    ctx = distributed.DistContext()
    model = torch.nn.Linear(2, 2)
    assert distributed.prepare_for_training(model, None, ctx) == (model, None)
    assert distributed.shard([1, 2, 3], ctx) == [1, 2, 3]
    assert distributed.all_reduce_sum({"a": 2.0}, ctx) == {"a": 2.0}
    assert distributed.unwrap(model, ctx) is model
    assert distributed.full_state_dict(model, ctx).keys() == model.state_dict().keys()
    assert distributed.shard(list(range(5)), distributed.DistContext(rank=1, world_size=2)) == [1, 3]


def test_entry_point_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        launch.main(["--store", "s", "--run-id", "r", "--iteration", "1", "--phase", "judge"])
    assert launch.main(["--store", "s", "--run-id", "r", "--iteration", "0", "--phase", "policy"]) == 2
    assert "iteration must be >= 1" in capsys.readouterr().err


RUN = "dist"


def _files(root: Path) -> dict[str, int]:
    """Relative path -> size of every file under a stage folder (manifests excluded: they hold times)."""
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "_SUCCESS.json"}


@pytest.mark.slow  # two ranks each import torch + transformers and load two models: 15-50 s on 2 shared cores
def test_two_gloo_ranks_run_the_train_stage_like_one_process(
    tiny_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real multi-process path: the train task launches torchrun with 2 CPU ranks (gloo), each runs
    `stages.train_policy` (DDP via the Trainer, sharded mini-batches, fillers for short shards, old
    log-probs exchanged between ranks), and rank 0 alone writes. Same store contents as one process:
    the same checkpoint weights (within float tolerance), trainer state, TRAIN rows and file set."""
    from pipeline_engine import ArithmeticEngine

    from spark_core import stages as S
    from spark_core.store import Store
    from spark_core.distributed.launch import run_train_stage

    cfg = tiny_cfg.model_copy(deep=True)
    cfg.eval.every = 0
    # 32 rollouts in mini-batches of 13, 13, 6 (so old log-probs are recomputed and exchanged); shards of
    # 7 and 6 in micro-batches of 3 give rank 1 a filler micro-batch; kl_coef > 0 loads the reference.
    cfg.train = cfg.train.model_copy(update={"launcher": "torchrun", "num_processes": 2, "mini_batch_size": 13,
                                             "micro_batch_size": 3, "kl_coef": 0.01})
    one, two = tmp_path / "one", tmp_path / "two"
    store = Store(str(one))
    ws = S.Workspace()
    ws.engine_factory = lambda c, w: ArithmeticEngine(w.get_tokenizer(c))
    S.init_run(cfg, store, RUN, ws)
    S.sample_policy(cfg, store, RUN, 1, ws)
    S.verify_policy(cfg, store, RUN, 1)
    S.build_reward_data(cfg, store, RUN, 1, ws)
    shutil.copytree(one, two)

    # Ranks run full forwards (lockstep); so does the one-process reference here. Running each prompt once
    # gives the same gradients up to float rounding (test_trainer), which Adam's first steps can amplify
    # past this test's tolerance on a few near-zero-gradient weights.
    from spark_core.trainer import Trainer

    monkeypatch.setattr(Trainer, "train_prompts_once", False)
    single = S.train_policy(cfg, store, RUN, 1, S.Workspace())
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    start = time.time()
    launched = run_train_stage(cfg, str(two), RUN, 1, "policy")
    print(f"2-rank gloo train stage took {time.time() - start:.1f}s")
    assert launched["skipped"] is False and launched["rows"] == single["rows"] == 3
    assert launched["reward_phase"] == single["reward_phase"]

    from spark_core.checkpoint_schedule import snapshot_store

    # Launched ranks end after the phase: the after-policy weights go to a node-local store, not the store.
    assert not store.exists(store.stage_uri(RUN, 1, "policy_checkpoint"))
    at = (lambda st: snapshot_store(cfg, st)) if single["reward_phase"] else (lambda st: st)
    stage = "policy_checkpoint" if single["reward_phase"] else "checkpoint"
    for name in ("train/phase=policy", stage):
        where = at if name == stage else (lambda st: st)
        a, b = Path(where(store).stage_uri(RUN, 1, name)), Path(where(Store(str(two))).stage_uri(RUN, 1, name))
        assert _files(a).keys() == _files(b).keys(), name  # one set of files, nothing from a second rank
    rows_1 = store.read_table(store.stage_uri(RUN, 1, "train/phase=policy")).to_pylist()
    rows_2 = Store(str(two)).read_table(Store(str(two)).stage_uri(RUN, 1, "train/phase=policy")).to_pylist()
    for r1, r2 in zip(rows_1, rows_2, strict=True):
        assert (r1["step"], r1["num_sequences"], r1["num_tokens"]) == (r2["step"], r2["num_sequences"], r2["num_tokens"])
        for key in ("loss", "pg_loss", "kl", "grad_norm", "lr", "mean_reward", "clip_frac"):
            assert r2[key] == pytest.approx(r1[key], rel=1e-4, abs=1e-6), key

    ck_1, ck_2 = Path(at(store).stage_uri(RUN, 1, stage)), Path(at(Store(str(two))).stage_uri(RUN, 1, stage))
    w1, w2 = load_file(str(ck_1 / "model.safetensors")), load_file(str(ck_2 / "model.safetensors"))
    w0 = load_file(str(Path(store.stage_uri(RUN, 0, "checkpoint")) / "model.safetensors"))
    assert w1.keys() == w2.keys() and any(not torch.equal(w0[k], w1[k]) for k in w1)
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], rtol=1e-4, atol=1e-5, msg=key)
    s1 = torch.load(ck_1 / "trainer_state" / "trainer_state.pt", weights_only=True)
    s2 = torch.load(ck_2 / "trainer_state" / "trainer_state.pt", weights_only=True)
    assert s1["global_step"] == s2["global_step"] == 3
    assert s1["optimizer"]["param_groups"] == s2["optimizer"]["param_groups"]
    for i, entry in s1["optimizer"]["state"].items():
        torch.testing.assert_close(s2["optimizer"]["state"][i]["exp_avg_sq"], entry["exp_avg_sq"], rtol=1e-3, atol=1e-12)


def test_the_train_task_launches_ranks_only_when_configured(
    tiny_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """inprocess runs the stage here; a launcher frees this process's model first and hands the stage to
    `launch_train_stage`; a finished stage is never launched again."""
    from spark_core import stages as S

    calls: list[tuple] = []
    monkeypatch.setattr(S, "train_policy", lambda cfg, store, run_id, it, step=1: calls.append(("inprocess", it)) or {"x": 1})
    monkeypatch.setattr(launch, "launch_train_stage",
                        lambda cfg, store, run_id, it, phase, step=1: calls.append(("launch", phase)) or {"y": 2})
    ws = S.workspace()
    ws.model = object()  # stands for a loaded model that the ranks would otherwise compete with
    cfg = tiny_cfg.model_copy(deep=True)
    assert launch.run_train_stage(cfg, str(tmp_path), "r", 1, "policy") == {"x": 1}
    assert ws.model is not None
    cfg.train.launcher = "torchrun"
    assert launch.run_train_stage(cfg, str(tmp_path), "r", 1, "reward") == {"y": 2}
    assert ws.model is None and calls == [("inprocess", 1), ("launch", "reward")]

    import pyarrow as pa

    from spark_core.schemas import TRAIN
    from spark_core.store import Store

    store = Store(str(tmp_path))
    store.write_table(store.stage_uri("r", 2, layout.TRAIN_POLICY), pa.Table.from_pylist([], schema=TRAIN))
    assert launch.run_train_stage(cfg, str(tmp_path), "r", 2, "policy") == {"x": 1}  # done: no ranks started
    assert calls[-1] == ("inprocess", 2)


def test_entry_point_names_a_missing_run(tmp_path: Path) -> None:
    from spark_core.stages import StageError

    with pytest.raises(StageError, match="run 'nope' does not exist"):
        launch.main(["--store", str(tmp_path), "--run-id", "nope", "--iteration", "1", "--phase", "policy"])
    assert not distributed.current().enabled
