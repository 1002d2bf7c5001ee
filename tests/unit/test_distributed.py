"""Multi-process training helpers: launcher command lines, errors, and a real 2-rank gloo run on the CPU."""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

import pytest
import torch

from spark_core import distributed
from spark_core.config import TrainConfig, load_config
from spark_core.distributed import DistributedError, launcher_command, stage_args

HERE = Path(__file__).parent


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
    if distributed.visible_gpu_count() == 0:
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
        distributed.run_launcher(cmd, "torchrun")
    assert "rank 1 exploded" in str(err.value)
    with pytest.raises(DistributedError, match="cannot start"):
        distributed.run_launcher(["/no/such/python"], "torchrun")


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
        distributed.main(["--store", "s", "--run-id", "r", "--iteration", "1", "--phase", "judge"])
    assert distributed.main(["--store", "s", "--run-id", "r", "--iteration", "0", "--phase", "policy"]) == 2
    assert "iteration must be >= 1" in capsys.readouterr().err


def _rank_module():
    spec = importlib.util.spec_from_file_location("_ddp_rank", HERE / "_ddp_rank.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow  # two ranks each import torch + transformers: ~60 s on 2 shared cores
def test_two_gloo_ranks_train_like_one_process(tmp_path: Path) -> None:
    """torchrun, 2 CPU ranks (gloo), DDP via prepare_for_training, the real Trainer on half the groups each.

    With equal token counts per rank, DDP's gradient average equals the single-process token-mean
    gradient, so the weights after the step must match an in-process step on all rows."""
    rank = _rank_module()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    cmd = launcher_command(TrainConfig(launcher="torchrun"), [str(tmp_path)], module="_ddp_rank", num_processes=2)
    start = time.time()
    distributed.run_launcher(cmd, "torchrun", env=env, timeout_s=300)
    result = torch.load(tmp_path / "rank0.pt", weights_only=False)
    assert result["world_size"] == 2 and result["backend"] == "gloo" and result["local_sequences"] == 4
    assert result["global_tokens"] == 8 * rank.COMPLETION_LEN

    from spark_core.config import TinyModelConfig
    from spark_core.models import build_tiny
    from spark_core.trainer import Trainer

    model, tok = build_tiny(TinyModelConfig())
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    Trainer(model, tok, rank.TRAIN, "cpu", total_steps=4).train_phase(rank.make_rows(len(tok)), "policy")
    expected = model.state_dict()
    assert result["state"].keys() == expected.keys()
    assert any(not torch.equal(initial[k], expected[k]) for k in expected)  # the step did change weights
    for key, value in expected.items():
        torch.testing.assert_close(result["state"][key], value, atol=2e-6, rtol=1e-5, msg=key)
    print(f"2-rank gloo run took {time.time() - start:.1f}s")


def test_entry_point_names_a_missing_run(tmp_path: Path) -> None:
    from spark_core.stages import StageError

    with pytest.raises(StageError, match="run 'nope' does not exist"):
        distributed.main(["--store", str(tmp_path), "--run-id", "nope", "--iteration", "1", "--phase", "policy"])
    assert not distributed.current().enabled


def test_entry_point_refuses_ranks_until_the_stages_are_rank_aware(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from spark_core import stages

    if getattr(stages, "DISTRIBUTED_READY", False):
        pytest.skip("the stages declare themselves rank-aware")
    monkeypatch.setattr(distributed, "init_distributed", lambda: distributed.DistContext(rank=0, world_size=2))
    with pytest.raises(DistributedError, match="DISTRIBUTED_READY"):
        distributed.main(["--store", str(tmp_path), "--run-id", "r", "--iteration", "1", "--phase", "reward"])
