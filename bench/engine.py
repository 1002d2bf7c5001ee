"""HFEngine vs raw `model.generate`: throughput (generated tokens/s) and identical outputs.

Both sides get the same model object, the same chat-formatted prompts, one generate call for the whole
batch, the same stop tokens and the same seed. Greedy outputs must be token-for-token identical (the
script exits 1 otherwise); sampled outputs are compared too (same seed, same expansion order).

With n > 1 samples per prompt HFEngine prefills each distinct prompt once and repeats its KV cache rows
(where that saves enough compute: not on the tiny model), while raw `generate(num_return_sequences=n)`
prefills every copy; that prefill is model time, so it is counted with `generate` in "engine's own
time". `--no-prefill-once` measures the engine without it.

    python bench/engine.py            # tiny and smollm2, ~3 min on 2 cores
    python bench/engine.py --quick    # smoke run
Target: ours/raw tokens/s >= 0.95.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def load(preset: str) -> tuple[Any, Any, list[str]]:
    """Model, tokenizer and the preset's chat-formatted test prompts (fp32 on CPU)."""
    from spark_core.chat import formatter, question_messages
    from spark_core.config import load_config
    from spark_core.data import make_arithmetic
    from spark_core.initial_model import load_initial_model

    cfg = load_config(preset=preset, overrides={"device": "cpu", "model": {"dtype": "float32"}})
    model, tokenizer = load_initial_model(cfg, device="cpu")
    fmt = formatter(tokenizer, cfg.data.use_chat_template)
    questions = make_arithmetic(cfg.data.arithmetic, "test")
    prompts = [fmt(question_messages(cfg.data, q.question)) for q in questions]
    return model, tokenizer, prompts


def cut_at_stop(row: list[int], stops: set[int]) -> list[int]:
    """The tokens up to and including the first stop token (what a caller of generate would keep)."""
    for k, tok in enumerate(row):
        if tok in stops:
            return row[: k + 1]
    return row


def raw_generate(model: Any, tokenizer: Any, prompts: list[str], n: int, max_new: int, temperature: float,
                 seed: int, stops: list[int], pad: int) -> list[list[int]]:
    """The baseline: tokenize, seed, `model.generate` with plain keyword arguments, cut at stop."""
    import torch

    enc = tokenizer(prompts, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")
    sampling: dict[str, Any] = (
        {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0}
        if temperature > 0
        else {"do_sample": False}
    )
    with torch.inference_mode(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = model.generate(
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
            max_new_tokens=max_new,
            min_new_tokens=0,
            num_return_sequences=n,
            eos_token_id=stops,
            pad_token_id=pad,
            **sampling,
        )
    rows = out[:, enc["input_ids"].shape[1]:].tolist()
    return [cut_at_stop(row, set(stops)) for row in rows]


def bench_model(preset: str, n_prompts: int, k: int, max_new: int, rounds: int, prefill_once: bool = True
                ) -> dict[str, Any]:
    from spark_core.engines.base import SamplingParams
    from spark_core.engines.hf import HFEngine, _batch_seed

    model, tokenizer, all_prompts = load(preset)
    prompts = all_prompts[:n_prompts]
    results: dict[str, Any] = {"preset": preset, "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1)}
    for mode, n, temperature in (("greedy", 1, 0.0), ("sample", k, 1.0)):
        # One generate call for the whole batch on both sides.
        engine = HFEngine(model, tokenizer, device="cpu", batch_size=len(prompts) * n)
        engine.prefill_prompts_once = prefill_once
        params = SamplingParams(n=n, temperature=temperature, top_p=1.0, max_new_tokens=max_new, seed=7)
        seed = _batch_seed(params.seed, 0)  # the seed HFEngine gives its first (only) batch
        outputs: dict[str, list[list[int]]] = {}
        own_share: list[float] = []  # share of our call spent outside model.generate

        def ours() -> float:
            inner = [0.0]
            original = model.generate

            def timed_generate(*args: Any, **kwargs: Any) -> Any:
                with common.stopwatch() as g:
                    out = original(*args, **kwargs)
                inner[0] += g[0]
                return out

            original_prefill = engine._shared_prefill

            def timed_prefill(*args: Any, **kwargs: Any) -> Any:
                with common.stopwatch() as g:
                    out = original_prefill(*args, **kwargs)
                inner[0] += g[0]
                return out

            model.generate = timed_generate
            engine._shared_prefill = timed_prefill  # type: ignore[method-assign]
            try:
                with common.stopwatch() as t:
                    res = engine.generate(prompts, params)
            finally:
                del model.generate  # back to the class method
                del engine._shared_prefill
            own_share.append((t[0] - inner[0]) / t[0])
            outputs["ours"] = [c.token_ids for group in res for c in group]
            return t[0]

        def raw() -> float:
            with common.stopwatch() as t:
                outputs["raw"] = raw_generate(model, tokenizer, prompts, n, max_new, temperature, seed,
                                              engine.stop_token_ids, engine.pad_token_id)
            return t[0]

        ours()  # warm-up: first calls pay lazy initialisation on both sides
        raw()
        times = common.alternate(rounds, {"ours": ours, "raw": raw})
        tokens = {name: sum(len(r) for r in outputs[name]) for name in ("ours", "raw")}
        tps = {name: tokens[name] / common.median(times[name]) for name in times}
        results[mode] = {
            "sequences": len(prompts) * n,
            "max_new_tokens": max_new,
            "tokens": tokens,
            "seconds": times,
            "tokens_per_s": tps,
            "ratio": common.ratio(tps["ours"], tps["raw"]),
            "identical": outputs["ours"] == outputs["raw"],
            # Tokenising, building the generation config and decoding: the engine's own cost, measured
            # inside the same call, so it does not depend on how busy the machine is.
            "engine_own_share": common.median(own_share),
        }
        print(f"[engine] {preset} {mode}: ours {tps['ours']:.1f} tok/s, raw {tps['raw']:.1f} tok/s, "
              f"identical={results[mode]['identical']}", file=sys.stderr)
    return results


def main() -> int:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--no-prefill-once", action="store_true",
                        help="HFEngine prefills every copy of a prompt, like raw generate")
    args = parser.parse_args()
    common.apply_threads(args)
    common.quiet_libraries()
    common.set_threads()
    info = common.machine_info()
    sizes = {
        # preset: (prompts, K for sampling, max_new_tokens, rounds)
        "tiny": (4, 2, 8, 1) if args.quick else (32, 4, 32, 5),
        "smollm2-arith": (2, 2, 8, 1) if args.quick else (8, 4, 32, 3),
    }
    runs = [bench_model(preset, *size, prefill_once=not args.no_prefill_once) for preset, size in sizes.items()]
    rows = []
    for r in runs:
        for mode in ("greedy", "sample"):
            m = r[mode]
            rows.append([
                r["preset"], f"{m['sequences']}x{m['max_new_tokens']}", mode,
                m["tokens"]["ours"], m["tokens_per_s"]["ours"], m["tokens_per_s"]["raw"], m["ratio"],
                100 * m["engine_own_share"], m["identical"],
            ])
    table = common.markdown_table(
        ["model", "seqs x max_new", "decoding", "tokens (ours)", "ours tok/s", "raw generate tok/s",
         "ratio ours/raw", "engine's own time %", "identical tokens"],
        rows,
    )
    notes = [
        "Median of alternated repeats after one warm-up call each; same model object, prompts, stop tokens, seed.",
        "Engine's own time = the share of our call spent outside model.generate and the shared prefill "
        "(tokenising, generation config, decoding), measured inside each call: unlike the ratio, it does not "
        "move with the machine's load.",
        f"Repeated prompts prefilled once: {'no' if args.no_prefill_once else 'yes, where worth it (not on tiny)'}.",
        "Target: ratio >= 0.95. Greedy outputs must be identical (exit 1 otherwise); sampled ones are "
        "expected identical too because both sides seed the same generator and expand prompts the same way.",
    ]
    print(common.report("HFEngine vs raw model.generate", info, [("", table)], notes))
    common.write_json(args.json, {"benchmark": "engine", "machine": info, "results": runs})
    greedy_ok = all(r["greedy"]["identical"] for r in runs)
    if not greedy_ok:
        print("FAIL: greedy outputs of HFEngine differ from model.generate", file=sys.stderr)
    return 0 if greedy_ok else 1


if __name__ == "__main__":
    sys.exit(main())
