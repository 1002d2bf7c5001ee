"""One GRPO policy step (sample K per prompt, score, update): ours vs TRL's GRPOTrainer on the CPU.

Both sides, each in a fresh process (so peak RSS is its own), get the same model files, the same B
prompts per step (the same questions in the same order, rendered by the same chat template), K
completions, max completion length, learning rate, clip epsilon, fp32 on the CPU, micro-batch size and
one optimizer step per generation batch. Settings matched on purpose:

* KL: TRL defaults to ``beta=0.0`` (no reference model); here both sides run the paper's k3 penalty with
  coefficient 0.001 (``beta=0.001`` / ``train.kl_coef=0.001``), so both load and score a frozen reference.
  ``--beta 0`` compares the reference-free setting instead.
* Loss: TRL ``loss_type="dapo"`` (token-level mean over the whole accumulated batch) = ours.
* Advantages: group-normalised on both (TRL ``scale_rewards="group"``).
* Reward: both call ``spark_core.verify.verify_batch`` on the completion text.
* Optimizer: AdamW betas (0.9, 0.95), no weight decay, grad clip 1.0, constant LR (no warm-up).
* Gradient checkpointing: the same on both sides, off by default (``--gradient-checkpointing`` turns it
  on for both). TRL's GRPOConfig turns it on unless told otherwise, so it is always set explicitly.

Timed: every step after the first (warm-up). Tokens/s = generated tokens / step seconds. A phase
breakdown (generate, reward, no-grad scoring, forward+backward+optimizer) comes from timers wrapped
around each side's own methods; ``--profile`` adds a cProfile listing of our step.

Roofline: our worker also measures the machine's dense matmul throughput (``torch.matmul`` of square
float32 matrices, the same thread count, best of several runs) and reports each phase's achieved FLOP/s
as a share of it. FLOPs counted (attention-score and softmax FLOPs left out, as small at these lengths):
forward = 2 x N_body x tokens through the layers + 2 x N_head x positions that reach the LM head, where
N_body = the parameters of the transformer layers (no embeddings) and N_head = vocab x hidden;
backward = 2 x forward; so a training pass (forward + backward) = 3 x forward. Per phase:

* sampling: the tokens the engine's forwards actually process (each distinct prompt prefilled once where
  HFEngine shares the prefill, every copy otherwise, then one token per decode step and sequence, the
  finished ones included); one head position per generated token;
* reference (no grad): the tokens its forward actually processes (each shared prompt once plus the
  completions with the prompt KV cache; every prompt+completion token without it), head on completions;
* training: the tokens its forward actually processes (each shared prompt once plus the completions
  on its KV cache; every prompt+completion token with ``--train-full-forward``), forward + backward,
  head on the completion positions (``logits_to_keep``); the time is the phase "other" (it also holds
  the optimizer step).

It also times the reference pass both ways on the same sequences (each shared prompt once, and a full
forward per sequence) outside the step clock, and checks they agree.

    python bench/step.py                 # tiny and smollm2-arith, ~8 min on 2 idle cores
    python bench/step.py --quick         # smoke run (tiny only, 2 steps)
    python bench/step.py --models tiny --no-trl   # our side only (roofline, reference A/B)
Target: ours <= 0.5x TRL's time per step; training phase >= 40% of the matmul throughput (smollm2-arith).
"""

from __future__ import annotations

import cProfile
import io
import json
import pstats
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

SCRIPT = Path(__file__).resolve()
SEED = 0


# ---------------------------------------------------------------------------------- shared setup


class PhaseTimer:
    """Wall seconds per named phase, per step (wrapping methods without changing what they do)."""

    def __init__(self) -> None:
        self.current: dict[str, float] = defaultdict(float)
        self.steps: list[dict[str, float]] = []

    def wrap(self, name: str | Callable[..., str], fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                key = name(*args, **kwargs) if callable(name) else name
                self.current[key] += time.perf_counter() - start

        return timed

    def close_step(self, total: float) -> None:
        phases = dict(self.current)
        phases["other"] = max(0.0, total - sum(phases.values()))
        self.steps.append(phases)
        self.current = defaultdict(float)


def setup(spec: dict[str, Any]) -> tuple[Any, Any, Any, list[list[Any]]]:
    """Config, model, tokenizer and the questions of every step (the same on both sides)."""
    from spark_core.config import load_config
    from spark_core.data import batch_for_iteration, load_training_questions
    from spark_core.initial_model import load_initial_model

    common.quiet_libraries()
    common.set_threads()
    import torch

    torch.manual_seed(SEED)
    cfg = load_config(preset=spec["preset"], overrides={"device": "cpu", "model": {"dtype": "float32"}})
    model, tokenizer = load_initial_model(cfg, device="cpu")
    questions = load_training_questions(cfg.data)
    # Start the verifier's process pool now (it starts lazily on the first answer that needs
    # Math-Verify): a run pays that once per process, not inside some random step.
    rewards_for(["\\boxed{x = 1}"], ["1"])
    batches = [batch_for_iteration(questions, s + 1, spec["B"], SEED) for s in range(spec["steps"])]
    return cfg, model, tokenizer, batches


def rewards_for(texts: list[str], golds: list[str]) -> list[float]:
    from spark_core.verify_pool import verify_batch

    return [r.reward for r in verify_batch(texts, golds)]


# ---------------------------------------------------------------------------------- roofline


def matmul_flops_per_s(n: int = 1024, seconds: float = 1.0, rounds: int = 5) -> float:
    """Dense float32 ``torch.matmul`` throughput of this process (its thread count): best of `rounds`."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)  # warm-up
    best = 0.0
    for _ in range(rounds):
        count, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds / rounds or count == 0:
            torch.matmul(a, b)
            count += 1
        best = max(best, 2 * n**3 * count / elapsed)
    return best


def param_counts(model: Any) -> tuple[int, int]:
    """(N_body, N_head): parameters of the transformer layers (no embeddings), and the LM head's."""
    head = model.get_output_embeddings().weight
    embed = model.get_input_embeddings().weight
    total = sum(p.numel() for p in model.parameters())
    tied = head.data_ptr() == embed.data_ptr()
    return total - embed.numel() - (0 if tied else head.numel()), head.numel()


def step_flops(n_body: int, n_head: int, prompt_lens: list[int], comp_lens: list[int], ref_tokens: int | None,
               train_tokens: int, gen_tokens: int) -> dict[str, float]:
    """FLOPs of each phase of one step (see the module docstring for the formula)."""
    seq_tokens = sum(p + c for p, c in zip(prompt_lens, comp_lens))
    completions = sum(comp_lens)
    forward = 2 * n_body * train_tokens + 2 * n_head * (completions + len(comp_lens))
    ref_body = ref_tokens if ref_tokens is not None else seq_tokens
    return {
        "generate": 2 * n_body * gen_tokens + 2 * n_head * completions,
        "score ref (no grad)": 2 * n_body * ref_body + 2 * n_head * completions,
        "other": 3 * forward,
    }


# -------------------------------------------------------------------------------------- ours


def worker_ours(spec: dict[str, Any]) -> dict[str, Any]:
    import pandas as pd
    import torch

    from spark_core.chat import formatter, question_messages
    from spark_core.engines.base import SamplingParams
    from spark_core.engines.hf import HFEngine
    from spark_core.initial_model import load_initial_model
    from spark_core.trainer import Trainer

    cfg, model, tokenizer, batches = setup(spec)
    B, K = spec["B"], spec["K"]
    train_cfg = cfg.train.model_copy(update={
        "lr": spec["lr"], "kl_coef": spec["beta"], "warmup_ratio": 0.0, "min_lr_ratio": 1.0,
        "micro_batch_size": spec["micro"], "mini_batch_size": None, "epochs": 1, "clip_eps": 0.2,
        "betas": (0.9, 0.95), "weight_decay": 0.0, "grad_clip": 1.0,
        "gradient_checkpointing": spec["gradient_checkpointing"],
    })
    ref = None
    if spec["beta"] > 0:
        ref, _ = load_initial_model(cfg, device="cpu")  # the frozen initial model
    engine = HFEngine(model, tokenizer, device="cpu", batch_size=B * K)  # one generate call, like TRL
    trainer = Trainer(model, tokenizer, train_cfg, "cpu", total_steps=len(batches), ref_model=ref)
    fmt = formatter(tokenizer, cfg.data.use_chat_template)

    timer = PhaseTimer()
    generate = timer.wrap("generate", engine.generate)

    def counted_generate(*args: Any, **kwargs: Any) -> Any:
        sampling[0] = True
        try:
            return generate(*args, **kwargs)
        finally:
            sampling[0] = False

    engine.generate = counted_generate  # type: ignore[method-assign]

    def score_phase(model: Any, *_: Any, **__: Any) -> str:
        return "score ref (no grad)" if model is trainer.ref_model else "score old (no grad)"

    trainer.train_prompts_once = not spec.get("train_full_forward", False)
    train_tokens: list[int] = []  # tokens through the policy's layers with gradients (the training forward)
    gen_tokens: list[int] = []  # tokens through the policy's layers while sampling (prefill + decode)
    sampling = [False]

    def count_tokens(m: Any, a: Any, kw: dict[str, Any], o: Any) -> None:
        if sampling[0]:
            gen_tokens.append(kw["input_ids"].numel())
        elif torch.is_grad_enabled():
            train_tokens.append(kw["input_ids"].numel())

    model.register_forward_hook(count_tokens, with_kwargs=True)
    ref_tokens: list[int] = []  # tokens through the reference's layers, per step
    if ref is not None:
        ref.register_forward_hook(lambda m, a, kw, o: ref_tokens.append(kw["input_ids"].numel()), with_kwargs=True)
    score = trainer._score
    trainer._score = timer.wrap(score_phase, trainer._score)  # type: ignore[method-assign]
    score_fn = timer.wrap("reward (verify)", rewards_for)
    peak = matmul_flops_per_s()
    n_body, n_head = param_counts(model)
    flops: list[dict[str, float]] = []
    ref_ab: list[dict[str, float]] = []

    step_s: list[float] = []
    tokens: list[int] = []
    profiler = cProfile.Profile() if spec.get("profile") else None
    for s, questions in enumerate(batches):
        if profiler is not None and s == 1:
            profiler.enable()  # profile the timed steps only
        start = time.perf_counter()
        prompts = [fmt(question_messages(cfg.data, q.question)) for q in questions]
        outs = engine.generate(prompts, SamplingParams(
            n=K, temperature=1.0, top_p=1.0, max_new_tokens=spec["max_new"], seed=SEED + s))
        flat = [(q, p, c) for q, p, group in zip(questions, prompts, outs) for c in group]
        rewards = score_fn([c.text for _, _, c in flat], [q.answer for q, _, _ in flat])
        rows = pd.DataFrame({
            "question_id": [q.question_id for q, _, _ in flat],
            "prompt": [p for _, p, _ in flat],
            "completion_ids": [list(c.token_ids) for _, _, c in flat],
            "reward": rewards,
        })
        ref_tokens.clear()
        train_tokens.clear()
        trainer.train_phase(rows, "policy")
        elapsed = time.perf_counter() - start
        step_s.append(elapsed)
        tokens.append(sum(len(c.token_ids) for _, _, c in flat))
        timer.close_step(elapsed)
        seqs = trainer._prepare(rows)
        flops.append(step_flops(n_body, n_head, [s_.prompt_len for s_ in seqs], [s_.num_tokens for s_ in seqs],
                                sum(ref_tokens) if ref is not None else None, sum(train_tokens), sum(gen_tokens)))
        gen_tokens.clear()
        if ref is not None and s > 0:  # the reference pass both ways on these sequences, off the step clock
            ab: dict[str, float] = {}
            lps: dict[str, list[Any]] = {}
            for once in ((True, False) if s % 2 else (False, True)):
                key = "once" if once else "full"
                trainer.score_prompts_once = once
                t0 = time.perf_counter()
                lps[key] = score(ref, seqs)
                ab[key] = time.perf_counter() - t0
            trainer.score_prompts_once = True
            ab["max_abs_diff"] = max((a - b).abs().max().item() for a, b in zip(lps["once"], lps["full"]) if a.numel())
            ref_ab.append(ab)
        print(f"[step] ours {spec['preset']} step {s}: {elapsed:.2f} s, {tokens[-1]} tokens", file=sys.stderr)
    out = {"step_s": step_s, "tokens": tokens, "phases": timer.steps, "flops": flops, "matmul_flops_per_s": peak,
           "ref_ab": ref_ab, "params": [n_body, n_head], "prompt_tokens": _prompt_tokens(tokenizer, cfg, batches[0])}
    if profiler is not None:
        profiler.disable()
        buf = io.StringIO()
        pstats.Stats(profiler, stream=buf).sort_stats("cumulative").print_stats(30)
        out["profile"] = buf.getvalue()
    return out


def _prompt_tokens(tokenizer: Any, cfg: Any, questions: list[Any]) -> list[list[int]]:
    """Token ids of the first step's prompts as we feed them (to compare with TRL's)."""
    from spark_core.chat import format_prompt, question_messages

    return [tokenizer(format_prompt(tokenizer, question_messages(cfg.data, q.question),
                                    cfg.data.use_chat_template), add_special_tokens=False).input_ids
            for q in questions]


# --------------------------------------------------------------------------------------- TRL


def worker_trl(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from spark_core.chat import question_messages

    cfg, model, tokenizer, batches = setup(spec)
    B, K, micro = spec["B"], spec["K"], spec["micro"]
    rows = [{"prompt": question_messages(cfg.data, q.question), "label": q.answer}
            for questions in batches for q in questions]
    dataset = Dataset.from_list(rows)
    tokens: list[int] = []
    timer = PhaseTimer()

    def reward(completions: list[Any], label: list[str], completion_ids: list[list[int]], **_: Any) -> list[float]:
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        tokens.append(sum(len(ids) for ids in completion_ids))
        return rewards_for(texts, label)

    step_s: list[float] = []

    class StepClock(TrainerCallback):
        start = 0.0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.start = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            elapsed = time.perf_counter() - self.start
            step_s.append(elapsed)
            timer.close_step(elapsed)
            print(f"[step] trl {spec['preset']} step {len(step_s) - 1}: {elapsed:.2f} s, "
                  f"{tokens[-1] if tokens else 0} tokens", file=sys.stderr)

    with tempfile.TemporaryDirectory(prefix="spark-bench-trl-") as tmp:
        args = GRPOConfig(
            output_dir=tmp, use_cpu=True, report_to="none", use_vllm=False, seed=SEED,
            per_device_train_batch_size=micro, gradient_accumulation_steps=B * K // micro,
            num_generations=K, max_completion_length=spec["max_new"], temperature=1.0, top_p=1.0, top_k=0,
            learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0,
            adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0,
            beta=spec["beta"], epsilon=0.2, loss_type="dapo", scale_rewards="group", num_iterations=1,
            max_steps=len(batches), shuffle_dataset=False, save_strategy="no", logging_steps=10_000,
            disable_tqdm=True, bf16=False, fp16=False, dataloader_num_workers=0, log_completions=False,
            gradient_checkpointing=spec["gradient_checkpointing"],
        )
        trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=args, train_dataset=dataset,
                              processing_class=tokenizer, callbacks=[StepClock()])
        # Phase timers around TRL's own methods (same names as ours).
        trainer._generate_single_turn = timer.wrap("generate", trainer._generate_single_turn)
        trainer._calculate_rewards = timer.wrap("reward (verify)", trainer._calculate_rewards)
        logps = trainer._get_per_token_logps_and_entropies

        def logps_phase(*_: Any, **__: Any) -> str:
            return "forward (grad, in fwd+bwd)" if torch.is_grad_enabled() else "score ref (no grad)"

        trainer._get_per_token_logps_and_entropies = timer.wrap(logps_phase, logps)
        trainer.train()
    prompt_ids = [tokenizer.apply_chat_template(question_messages(cfg.data, q.question), tokenize=True,
                                                add_generation_prompt=True, return_dict=True)["input_ids"]
                  for q in batches[0]]
    # `forward (grad)` is part of the training pass: fold it into "other" like ours does.
    phases = []
    for p in timer.steps:
        p = dict(p)
        p["other"] = p.get("other", 0.0) + p.pop("forward (grad, in fwd+bwd)", 0.0)
        phases.append(p)
    return {"step_s": step_s, "tokens": tokens, "phases": phases, "prompt_tokens": prompt_ids}


# -------------------------------------------------------------------------------------- main


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median over every timed step (the first step of each process is the warm-up)."""
    steps = [s for r in runs for s in r["step_s"][1:]]
    toks = [t for r in runs for t in r["tokens"][1:]]
    tps = [t / s for r in runs for t, s in zip(r["tokens"][1:], r["step_s"][1:])]
    phase_names = sorted({k for r in runs for p in r["phases"][1:] for k in p})
    phases = {k: common.median([p.get(k, 0.0) for r in runs for p in r["phases"][1:]]) for k in phase_names}
    return {"step_s": common.median(steps), "tokens": common.median(toks), "tokens_per_s": common.median(tps),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "phases": phases, "steps": len(steps)}


def roofline_rows(preset: str, runs: list[dict[str, Any]]) -> list[list[Any]]:
    """Per phase: median seconds and FLOPs per timed step, achieved FLOP/s and its share of matmul."""
    peak = max(r["matmul_flops_per_s"] for r in runs)
    out = []
    for phase in ("generate", "score ref (no grad)", "other"):
        secs = common.median([p.get(phase, 0.0) for r in runs for p in r["phases"][1:]])
        flops = common.median([f[phase] for r in runs for f in r["flops"][1:]])
        if not secs:
            continue
        label = {"other": "training (fwd+bwd+optimizer)", "generate": "sampling"}.get(phase, "reference (no grad)")
        out.append([preset, label, secs, flops / 1e9, flops / secs / 1e9, peak / 1e9,
                    f"{100 * flops / secs / peak:.0f}%"])
    return out


def reference_ab_rows(preset: str, runs: list[dict[str, Any]]) -> list[list[Any]]:
    ab = [a for r in runs for a in r.get("ref_ab", [])]
    if not ab:
        return []
    once, full = common.median([a["once"] for a in ab]), common.median([a["full"] for a in ab])
    return [[preset, len(ab), once, full, common.ratio(once, full), f"{max(a['max_abs_diff'] for a in ab):.1e}"]]


def main() -> int:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--beta", type=float, default=0.001, help="KL coefficient on both sides (default 0.001)")
    parser.add_argument("--rounds", type=int, default=None, help="ours/TRL process pairs per model")
    parser.add_argument("--profile", action="store_true", help="cProfile our timed steps and print the top")
    parser.add_argument("--models", default=None, help="comma list of presets (default: tiny,smollm2-arith)")
    parser.add_argument("--no-trl", action="store_true", help="our side only (roofline and reference A/B)")
    parser.add_argument("--train-full-forward", action="store_true",
                        help="our training forward over every prompt+completion token (the path before each "
                             "shared prompt ran once); for a before/after figure")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="turn gradient checkpointing on for both sides (default: off on both)")
    args = parser.parse_args()
    common.apply_threads(args)
    if args.worker:
        spec = json.loads(args.worker)
        fn = worker_ours if spec["side"] == "ours" else worker_trl
        common.write_worker_result(args.out, fn(spec))
        return 0

    info = common.machine_info()
    # preset: B prompts, K samples, max completion tokens, micro-batch, lr, steps (1 warm-up + timed), rounds
    sizes = {
        "tiny": dict(B=8, K=4, max_new=32, micro=16, lr=1e-3,
                     steps=2 if args.quick else 4, rounds=1 if args.quick else 2),
        # ~150-token few-shot prompts: one step is ~0.7 TFLOP of forward passes per side on 2 cores.
        "smollm2-arith": dict(B=2, K=4, max_new=32, micro=8, lr=2e-6, steps=4, rounds=1),
    }
    presets = args.models.split(",") if args.models else (["tiny"] if args.quick else list(sizes))
    results: dict[str, Any] = {}
    rows, phase_rows, roof_rows, ab_rows, notes = [], [], [], [], []
    for preset in presets:
        size = dict(sizes[preset])
        rounds = args.rounds or size.pop("rounds")
        size.pop("rounds", None)
        spec = {"preset": preset, "beta": args.beta, "gradient_checkpointing": args.gradient_checkpointing,
                "train_full_forward": args.train_full_forward, **size}
        runs: dict[str, list[dict[str, Any]]] = {"ours": [], "trl": []}
        for r in range(rounds):
            for side in (("ours",) if args.no_trl else ("ours", "trl") if r % 2 == 0 else ("trl", "ours")):
                print(f"[step] {preset}: {side} (round {r + 1}/{rounds})", file=sys.stderr)
                runs[side].append(common.run_worker(
                    SCRIPT, {**spec, "side": side, "profile": args.profile and side == "ours"}, timeout_s=1200))
        roof_rows += roofline_rows(preset, runs["ours"])
        ab_rows += reference_ab_rows(preset, runs["ours"])
        if args.no_trl:
            results[preset] = {"spec": spec, "ours": summarise(runs["ours"]), "runs": runs}
            continue
        ours, trl = summarise(runs["ours"]), summarise(runs["trl"])
        same_prompts = runs["ours"][0]["prompt_tokens"] == runs["trl"][0]["prompt_tokens"]
        results[preset] = {"spec": spec, "ours": ours, "trl": trl, "runs": runs, "same_prompt_tokens": same_prompts}
        prompt_len = sum(map(len, runs["ours"][0]["prompt_tokens"])) / len(runs["ours"][0]["prompt_tokens"])
        rows.append([preset, f"{spec['B']}x{spec['K']}x{spec['max_new']}", prompt_len, ours["steps"],
                     ours["step_s"], trl["step_s"], common.ratio(ours["step_s"], trl["step_s"]),
                     ours["tokens_per_s"], trl["tokens_per_s"], ours["tokens"], trl["tokens"],
                     ours["peak_rss_mb"], trl["peak_rss_mb"], same_prompts])
        for name in sorted(set(ours["phases"]) | set(trl["phases"])):
            phase_rows.append([preset, name, ours["phases"].get(name, 0.0), trl["phases"].get(name, 0.0)])
        if args.profile and runs["ours"][0].get("profile"):
            notes.append(f"cProfile of our {preset} steps:\n```\n{runs['ours'][0]['profile']}\n```")
    table = common.markdown_table(
        ["model", "B x K x max_new", "prompt tokens", "timed steps", "ours s/step", "TRL s/step", "ratio ours/TRL",
         "ours tok/s", "TRL tok/s", "ours tokens/step", "TRL tokens/step", "ours peak RSS MiB",
         "TRL peak RSS MiB", "same prompt ids"], rows)
    phases = common.markdown_table(["model", "phase (median s/step)", "ours", "TRL"], phase_rows)
    notes = [
        f"fp32 on CPU; KL coefficient {args.beta} on both sides "
        f"({'k3 vs frozen reference' if args.beta else 'no reference model'}); "
        "TRL loss_type=dapo (token-level mean) = ours; one optimizer step per generation batch; same micro-batch; "
        f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'} on both sides; our training "
        f"forward {'over every token' if args.train_full_forward else 'runs each shared prompt once'}.",
        "Each side runs in its own process (peak RSS is its own); medians over all timed steps (first step of "
        "each process excluded); rounds alternate which side goes first.",
        "tokens/step differ because sampling differs (different RNG use): compare tok/s as well as s/step.",
        "Phase 'other' = forward+backward+optimizer and bookkeeping. A 'score old (no grad)' row appears only "
        "for a side that runs a separate pass for the old log-probs; with one optimizer step per generation "
        "batch both sides use the training forward's detached log-probs instead.",
    ] + notes
    roof = common.markdown_table(
        ["model", "phase", "median s/step", "GFLOP/step", "achieved GFLOP/s", "matmul GFLOP/s", "share of matmul"],
        roof_rows)
    ab = common.markdown_table(
        ["model", "steps", "reference: each prompt once, s", "reference: full forward, s", "time once/full",
         "max |log-prob diff|"], ab_rows)
    notes.append("Roofline FLOPs: forward = 2 x N_body x tokens + 2 x N_head x head positions; backward = 2 x "
                 "forward; the training phase ('other', forward + backward + optimizer) counts 3 x forward. "
                 "Attention-score FLOPs are not counted. Matmul throughput: square float32 torch.matmul (n=1024), "
                 "same process and threads, best of 5.")
    sections = [("", table), ("**where the time goes**", phases)] if rows else []
    sections += [("**roofline** (ours; achieved FLOP/s per phase vs dense matmul in the same process)", roof),
                 ("**reference pass both ways** (same sequences, off the step clock)", ab)]
    title = "One GRPO policy step: ours" + ("" if args.no_trl else " vs TRL GRPOTrainer")
    print(common.report(title, info, sections, notes))
    common.write_json(args.json, {"benchmark": "step", "machine": info, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
