"""The GPU check: FLOP arithmetic and argument parsing on the CPU; the real run only with CUDA."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spark_core import gpu_check
from spark_core.gpu_check import QWEN25_05B, TINY, mfu, peak_tflops_for, qwen2_param_count, train_flops

ROOT = Path(__file__).parents[2]


def test_param_count_matches_a_built_model() -> None:
    model = gpu_check._build(TINY, torch.device("cpu"), torch.float32)  # noqa: SLF001
    assert qwen2_param_count(TINY) == sum(p.numel() for p in model.parameters())


def test_qwen25_05b_shape_has_the_published_size() -> None:
    # Qwen2.5-0.5B: 0.49B parameters (0.36B without embeddings)
    assert qwen2_param_count(QWEN25_05B) == 494_032_768


def test_mfu_arithmetic() -> None:
    assert train_flops(1_000, 10) == 60_000
    # 6 * 0.5e9 * 8192 FLOPs in 0.1 s on a 989 TFLOP/s part
    assert mfu(500_000_000, 8192, 0.1, 989.0) == pytest.approx(6 * 0.5e9 * 8192 / 0.1 / 989e12)
    with pytest.raises(ValueError):
        mfu(1, 1, 0.0, 989.0)


def test_peak_table_and_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPARK_PEAK_TFLOPS", raising=False)
    assert peak_tflops_for("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops_for("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops_for("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops_for("Some Future GPU") is None
    assert peak_tflops_for("NVIDIA H100 80GB HBM3", override=500.0) == 500.0
    monkeypatch.setenv("SPARK_PEAK_TFLOPS", "123")
    assert peak_tflops_for("Some Future GPU") == 123.0


def test_argument_parsing() -> None:
    args = gpu_check.parse_args([])
    assert (args.shape, args.prompts, args.n, args.new_tokens, args.train_batch, args.train_seq) == (
        "qwen2.5-0.5b", 16, 4, 128, 8, 1024)
    args = gpu_check.parse_args(["--shape", "tiny", "--peak-tflops", "10", "--train-steps", "2"])
    assert args.shape == "tiny" and args.peak_tflops == 10.0 and args.train_steps == 2
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--train-seq", "0"])
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--shape", "llama"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_fails_clearly_without_cuda() -> None:
    proc = subprocess.run([str(ROOT / "infra" / "gpu-check.sh"), "--shape", "tiny"], capture_output=True,
                          text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert proc.returncode == gpu_check.EXIT_NO_CUDA
    assert "no CUDA device is visible" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path is for machines without a GPU")
def test_tiny_shape_runs_the_whole_path_on_cpu() -> None:
    args = gpu_check.parse_args(["--shape", "tiny", "--allow-cpu", "--prompts", "2", "--n", "2",
                                 "--new-tokens", "4", "--train-batch", "2", "--train-seq", "16",
                                 "--train-steps", "1", "--peak-tflops", "1"])
    result = gpu_check.run(args)
    assert result["params"] == qwen2_param_count(TINY)
    assert 0 < result["generate_tokens"] <= 2 * 2 * 4
    assert result["train_tokens_per_step"] == 32
    assert result["mfu"] == pytest.approx(
        mfu(result["params"], 32, result["train_step_seconds"], 1.0), rel=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_check_on_a_gpu() -> None:
    proc = subprocess.run([str(ROOT / "infra" / "gpu-check.sh"), "--json"], capture_output=True, text=True,
                          timeout=600, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["params"] == qwen2_param_count(QWEN25_05B)
    assert result["generate_tokens_per_s"] > 0 and result["train_tokens_per_s"] > 0
    if result["mfu"] is not None:
        assert 0.01 < result["mfu"] < 1.0
    print(result)
