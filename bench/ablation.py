"""The paper's ablation in miniature: RLVR only (reward phase off) vs full SPARK, same seed and budget.

Both runs start from the same SmolLM2-135M-Instruct weights (`smollm2-arith` preset), see the same
policy questions in the same order (same seed) and take the same number of iterations; they differ only
in `reward_data.enabled`. Evaluation happens at iteration 0 (identical for both: the base model) and at
the end, on the same held-out arithmetic questions. The table mirrors the paper's Tables 1/5: solver
accuracy without and with test-time self-reflection, the judge's F1 on its own answers, and pairwise
judge accuracy.

    python bench/ablation.py                      # defaults: 4 iterations, 32 eval questions
    python bench/ablation.py --iterations 2 --eval-limit 16 --store /tmp/ablation

Runs go through the real Prefect flow (`spark_run`, ephemeral API) into a local store, so every table
of both runs can be browsed afterwards with `spark ls` / `spark show`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METRICS = [
    ("accuracy", "solver acc (greedy)"),
    ("accuracy_reflect", "solver acc + self-reflection"),
    ("judge_f1", "judge F1 (own answers)"),
    ("judge_accuracy", "judge accuracy"),
    ("pairwise_accuracy", "pairwise judge acc"),
]


def _config(args: argparse.Namespace, spark: bool) -> Any:
    from spark_core.config import load_config

    overrides = {
        "seed": args.seed,
        "iterations": args.iterations,
        "reward_data": {"enabled": spark},
        # evaluate only the base model and the final one (the intermediate ones cost as much as training)
        "eval": {
            "every": args.iterations,
            "benchmarks": [{"name": "arithmetic", "source": "arithmetic", "limit": args.eval_limit}],
            "max_rounds": args.max_rounds,
        },
        "store": {"uri": args.store},
    }
    return load_config(preset="smollm2-arith", overrides=overrides)


def _eval_metrics(store_uri: str, run_id: str, iteration: int) -> dict[str, Any]:
    from spark_core.store import Store, eval_stage

    store = Store(store_uri)
    manifest = store.manifest(store.stage_uri(run_id, iteration, eval_stage("arithmetic")))
    return manifest.get("metrics") or {}


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=4, help="co-evolution iterations per run")
    parser.add_argument("--eval-limit", type=int, default=32, help="held-out questions evaluated")
    parser.add_argument("--max-rounds", type=int, default=1, help="self-reflection rounds at test time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--store", default="./spark-store-ablation", help="store URI for both runs")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from flows.run import spark_run

    tag = f"s{args.seed}-i{args.iterations}-e{args.eval_limit}-r{args.max_rounds}"
    runs = {"RLVR only (GRPO, reward phase off)": (f"ablation-rlvr-{tag}", False),
            "SPARK (policy + reward + reflection data)": (f"ablation-spark-{tag}", True)}
    results: dict[str, dict[str, Any]] = {}
    for label, (run_id, spark) in runs.items():
        started = time.perf_counter()
        spark_run(config=_config(args, spark), run_id=run_id)  # resumes if already (partly) done
        seconds = time.perf_counter() - started
        results[label] = {
            "run_id": run_id,
            "seconds": round(seconds, 1),
            "start": _eval_metrics(args.store, run_id, 0),
            "end": _eval_metrics(args.store, run_id, args.iterations),
        }

    header = f"| metric | base (iter 0) | " + " | ".join(f"{k} (iter {args.iterations})" for k in results) + " |"
    lines = [
        f"Ablation on smollm2-arith, {date.today().isoformat()}, {platform.processor() or platform.machine()} "
        f"x{os.cpu_count()} CPU, seed {args.seed}, {args.iterations} iterations, {args.eval_limit} held-out "
        f"questions, {args.max_rounds} self-reflection round(s)",
        "",
        header,
        "|---|---:|" + "---:|" * len(results),
    ]
    first = next(iter(results.values()))
    for key, name in METRICS:
        cells = [_fmt(first["start"].get(key))] + [_fmt(r["end"].get(key)) for r in results.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| wall time of the run (s) | | " + " | ".join(str(r["seconds"]) for r in results.values()) + " |")
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
