"""GPU smoke check and throughput numbers: hf-engine sampling and one training step of a ~0.5B Qwen2.

``python -m spark_core.gpu_check`` (or ``infra/gpu-check.sh``) builds a Qwen2ForCausalLM with the shape of
Qwen2.5-0.5B (24 layers, width 896, vocab 151936; ~494M parameters) from a config written here, with
RANDOM weights (nothing is downloaded), then

1. samples with the project's hf engine (``HFEngine``) and prints generated tokens/s;
2. runs training steps (causal-LM loss, AdamW, bf16) on random token batches and prints the training
   MFU = 6 * N * tokens / step time / peak bf16 FLOP/s. N counts every parameter once (the tied
   embedding is the LM head's matmul); attention-score FLOPs are left out, as usual for this estimate.
   The peak comes from a table of known GPUs (``--peak-tflops`` or ``$SPARK_PEAK_TFLOPS`` overrides it).

The prompts are tokenized with the tiny model's locally built tokenizer; token ids beyond its vocabulary
decode to nothing, which does not matter for speed. Without CUDA the check stops with a clear message
(``--allow-cpu`` with ``--shape tiny`` runs the same code path on a CPU, for tests).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

EXIT_NO_CUDA = 3

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from the vendors' data sheets. Matched in order
# against torch.cuda.get_device_name(); the first matching key wins, so specific names come first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM / HBM3
    ("H200", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10", 125.0),
)


@dataclass(frozen=True)
class Shape:
    """The Qwen2 hyper-parameters that decide parameter count and FLOPs."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    tie_word_embeddings: bool = True


# Qwen2.5-0.5B's published configuration (config.json of the hub model), written out here.
QWEN25_05B = Shape(151936, 896, 4864, 24, 14, 2, True)
TINY = Shape(512, 64, 128, 2, 4, 2, True)
SHAPES = {"qwen2.5-0.5b": QWEN25_05B, "tiny": TINY}


def qwen2_param_count(shape: Shape) -> int:
    """Parameters of a Qwen2ForCausalLM (q/k/v projections carry biases, o_proj and the MLP do not)."""
    d, head_dim = shape.hidden_size, shape.hidden_size // shape.num_attention_heads
    kv = shape.num_key_value_heads * head_dim
    attn = (d * d + d) + 2 * (d * kv + kv) + d * d
    mlp = 3 * d * shape.intermediate_size
    per_layer = attn + mlp + 2 * d  # two RMSNorms
    embed = shape.vocab_size * d * (1 if shape.tie_word_embeddings else 2)
    return shape.num_hidden_layers * per_layer + embed + d  # + final norm


def train_flops(params: int, tokens: int) -> float:
    """Forward + backward FLOPs of a training step: 6 per parameter per token."""
    return 6.0 * params * tokens


def mfu(params: int, tokens: int, seconds: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation of a step that processed ``tokens`` tokens in ``seconds``."""
    if seconds <= 0 or peak_tflops <= 0:
        raise ValueError("seconds and peak_tflops must be positive")
    return train_flops(params, tokens) / seconds / (peak_tflops * 1e12)


def peak_tflops_for(device_name: str, override: float | None = None) -> float | None:
    """Peak dense bf16 TFLOP/s: the override, else $SPARK_PEAK_TFLOPS, else the table, else None."""
    if override is not None:
        return override
    env = os.environ.get("SPARK_PEAK_TFLOPS")
    if env:
        return float(env)
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return value
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m spark_core.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b", help="model shape (random weights)")
    p.add_argument("--prompts", type=int, default=16, help="prompts per generate call")
    p.add_argument("--n", type=int, default=4, help="samples per prompt")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per sample")
    p.add_argument("--train-batch", type=int, default=8, help="sequences per training step")
    p.add_argument("--train-seq", type=int, default=1024, help="tokens per training sequence")
    p.add_argument("--train-steps", type=int, default=3, help="timed training steps (after one warm-up step)")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak bf16 TFLOP/s (default: GPU table)")
    p.add_argument("--allow-cpu", action="store_true", help="run on the CPU when no GPU is present (tests)")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    args = p.parse_args(argv)
    for name in ("prompts", "n", "new_tokens", "train_batch", "train_seq", "train_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def _build(shape: Shape, device: Any, dtype: Any) -> Any:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**asdict(shape), max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg)
    return model.to(dtype)


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from .config import TinyModelConfig
    from .engines.base import SamplingParams
    from .engines.hf import HFEngine
    from .models import load_tokenizer, tiny_folder

    if torch.cuda.is_available():
        device, dtype = torch.device("cuda", torch.cuda.current_device()), torch.bfloat16
        name = torch.cuda.get_device_name(device)
    elif args.allow_cpu:
        device, dtype, name = torch.device("cpu"), torch.float32, "cpu"
    else:
        raise SystemExit(EXIT_NO_CUDA)
    shape = SHAPES[args.shape]
    tokenizer = load_tokenizer(tiny_folder(TinyModelConfig()))
    tokenizer.padding_side = "left"
    model = _build(shape, device, dtype)
    params = sum(p.numel() for p in model.parameters())
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    # 1. sampling through the hf engine (one warm-up call, then a timed one)
    engine = HFEngine(model, tokenizer, device=device, batch_size=args.prompts * args.n)
    prompts = [f"What is {i} + {i + 1}? Put the answer in \\boxed{{}}." for i in range(args.prompts)]
    sp = SamplingParams(n=args.n, temperature=1.0, top_p=1.0, max_new_tokens=args.new_tokens, seed=0)
    engine.generate(prompts[:1], SamplingParams(n=1, max_new_tokens=4))
    _sync(device)
    start = time.perf_counter()
    out = engine.generate(prompts, sp)
    _sync(device)
    gen_s = time.perf_counter() - start
    gen_tokens = sum(len(c.token_ids) for cs in out for c in cs)

    # 2. training steps on random tokens
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0)
    gen = torch.Generator(device="cpu").manual_seed(0)
    batch = torch.randint(0, shape.vocab_size, (args.train_batch, args.train_seq), generator=gen).to(device)

    def step() -> None:
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: kernels, allocator, optimizer state
    _sync(device)
    start = time.perf_counter()
    for _ in range(args.train_steps):
        step()
    _sync(device)
    step_s = (time.perf_counter() - start) / args.train_steps
    step_tokens = args.train_batch * args.train_seq
    peak = peak_tflops_for(name, args.peak_tflops)
    result = {
        "device": name,
        "shape": args.shape,
        "params": params,
        "dtype": str(dtype).replace("torch.", ""),
        "generate_tokens": gen_tokens,
        "generate_seconds": round(gen_s, 3),
        "generate_tokens_per_s": round(gen_tokens / gen_s, 1),
        "train_tokens_per_step": step_tokens,
        "train_step_seconds": step_s,
        "train_tokens_per_s": round(step_tokens / step_s, 1),
        "train_tflops": train_flops(params, step_tokens) / step_s / 1e12,
        "peak_bf16_tflops": peak,
        "mfu": mfu(params, step_tokens, step_s, peak) if peak else None,
    }
    if device.type == "cuda":
        result["max_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except SystemExit as err:
        if err.code == EXIT_NO_CUDA:
            print(
                "gpu_check: no CUDA device is visible (torch.cuda.is_available() is False): run it on a GPU "
                "machine with a CUDA build of torch (pass --allow-cpu --shape tiny to exercise it on a CPU)",
                file=sys.stderr,
            )
        raise
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>24}: {value:.4g}" if isinstance(value, float) else f"{key:>24}: {value}")
        if result["mfu"] is None:
            print(f"{'':>24}  (unknown GPU: pass --peak-tflops to get the MFU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
