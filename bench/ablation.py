"""The paper's ablation in miniature: RLVR only (reward phase off) vs full SPARK, with paired bootstrap CIs.

Both arms start from the same weights (the config's model; by default `bench/miniature.yaml`, a tiny
Qwen2 warm-started on the output formats with RANDOM judge verdicts, so its judge starts at chance),
see the same policy questions in the same order (same seed), take the same number of iterations and
run the same LR schedule (`train.total_steps` is set to the same number in both arms; the miniature
uses a constant LR, so every optimizer step of either arm gets the same LR). They differ only in
`reward_data.enabled`. Several seeds; every seed is run in both arms.

Evaluation: iteration 0 and every `--eval-every` iterations (and the last), always on the SAME held-out
questions (the arithmetic test split: never trained on, never used by the warm start or the
demonstrations) for both arms, greedy, with the paper's test-time self-reflection.

Statistics: the per-question eval rows of the store (`eval/benchmark=arithmetic`) are read back and
every metric is recomputed from them. The difference SPARK minus RLVR at the final iteration comes with
a paired bootstrap 95% CI over seeds and questions: each replicate draws seeds with replacement and,
within each drawn seed, the test questions with replacement (the SAME questions for both arms, which
is the pairing), recomputes each metric for both arms on those rows, averages over the drawn seeds
and takes the difference; the CI is the 2.5/97.5 percentiles. Ratio metrics (judge precision, balanced
accuracy, ...) are recomputed on each resample, not averaged per question.

Iteration 0 is the same model for both arms of a seed: it is evaluated once and the evaluation folder
copied into the other arm's run.

Driven without Prefect, to save time: the flow's own loop (`flows.iteration.run_iteration`) runs with
`flows.steps.Steps.direct()`, the stage functions of `spark_core.stages` called in this process (as
`bench/iteration.py` does in its `direct` mode). Each run
has its own run id in one store, so an interrupted ablation resumes where it stopped (completed
stages are skipped by their `_SUCCESS.json`); `--workers N` runs N (arm, seed) runs at once, each in
its own process with one torch thread.

    python bench/ablation.py --out bench/results                     # the committed result
    python bench/ablation.py --seeds 0 --iterations 2 --eval-every 1 --limit 16 --out /tmp/abl   # smoke

Writes OUT/ablation.json (the issue-10 contract), OUT/ablation.md (tables), OUT/ablation.png (each
metric per iteration and arm) and OUT/ablation_curves.json (per seed, arm and evaluated iteration).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARMS = ("rlvr", "spark")
ARM_NAMES = {"rlvr": "RLVR only (reward phase off)", "spark": "SPARK (policy + reward phase)"}
BENCHMARK = "arithmetic"
# (key, label): every metric of the contract, recomputed from the per-question rows.
METRICS = [
    ("accuracy", "solver accuracy (greedy a0)"),
    ("accuracy_reflect", "accuracy after self-reflection"),
    ("right_to_wrong", "right->wrong flips (share of questions)"),
    ("wrong_to_right", "wrong->right flips (share of questions)"),
    ("judge_accuracy", "judge accuracy (own a0)"),
    ("judge_balanced_accuracy", "judge balanced accuracy (own a0)"),
    ("judge_precision", "judge precision"),
    ("judge_recall", "judge recall"),
    ("judge_f1", "judge F1"),
    ("judge_yes_share", "judge Yes-share"),
    ("pairwise_accuracy", "pairwise judge accuracy (own answers)"),
    ("verdict_parse_rate", "verdict parse rate (self-judgment)"),
]


# ------------------------------------------------------------------------------------------ configs


def arm_config(args: argparse.Namespace, arm: str, seed: int) -> Any:
    """The run config of one arm and seed: `reward_data.enabled` differs between arms (and, with
    --balance-pointwise-labels, the SPARK arm balances its pointwise labels)."""
    from spark_core.config import load_config
    from spark_core.trainer import planned_optimizer_steps

    base = load_config(args.config, overrides={"iterations": args.iterations, "seed": seed})
    # The schedule spans the SPARK arm's optimizer steps in BOTH arms (same LR at every step).
    spark = base.model_copy(deep=True)
    spark.reward_data.enabled = True
    total = base.train.total_steps or planned_optimizer_steps(spark)
    overrides: dict[str, Any] = {
        "seed": seed,
        "iterations": args.iterations,
        "reward_data": {"enabled": arm == "spark",
                        # the SPARK arm only: the RLVR arm builds no items, so its runs (ids) stay shared
                        **({"balance_pointwise_labels": True} if arm == "spark" and args.balance_pointwise_labels else {})},
        "train": {"total_steps": total},
        "eval": {"every": args.eval_every},
        "store": {"uri": args.store},
    }
    if args.limit:
        overrides["eval"]["benchmarks"] = [{"name": BENCHMARK, "source": "arithmetic", "limit": args.limit}]
    return load_config(args.config, overrides=overrides)


def run_id(args: argparse.Namespace, arm: str, seed: int) -> str:
    cfg = arm_config(args, arm, seed)
    return f"abl-{arm}-s{seed}-{cfg.config_hash()[:8]}"


# -------------------------------------------------------------------------------------------- runs


def run_iteration0(args: argparse.Namespace, seed: int) -> None:
    """Iteration 0 of both arms of one seed: the initial checkpoint of each, ONE baseline evaluation.

    At iteration 0 both arms are the same weights evaluated with the same seed and settings (the arms'
    configs differ only in ``reward_data.enabled``), so the RLVR arm's evaluation folder is copied into
    the SPARK run instead of being computed twice."""
    import shutil

    import torch

    from spark_core import stages as S
    from spark_core.layout import eval_stage
    from spark_core.store import Store

    torch.set_num_threads(args.threads)
    started = time.time()
    rids = {arm: run_id(args, arm, seed) for arm in ARMS}
    for arm in ARMS:
        cfg = arm_config(args, arm, seed)
        store = Store(cfg.store.uri)
        S.init_run(cfg, store, rids[arm])
        if store.latest(rids[arm]) is not None:
            continue
        for b in cfg.eval.benchmarks:
            uri = store.stage_uri(rids[arm], 0, eval_stage(b.name))
            src = store.stage_uri(rids["rlvr"], 0, eval_stage(b.name))
            if arm == "spark" and store.is_done(src) and not store.is_done(uri) and "://" not in src:
                shutil.copytree(src, uri, dirs_exist_ok=True)
            S.evaluate(cfg, store, rids[arm], 0, b.name)  # no-op when copied
        S.finish_iteration(cfg, store, rids[arm], 0)
    S.workspace().close()
    _log(f"seed {seed}: iteration 0 of both arms ({time.time() - started:.0f} s)")


def run_one(args: argparse.Namespace, arm: str, seed: int) -> None:
    """One (arm, seed) run, stage by stage, resuming after its LATEST iteration."""
    import torch

    from flows.iteration import run_iteration
    from flows.steps import Steps
    from spark_core import stages as S
    from spark_core.layout import TRAIN_REWARD
    from spark_core.store import Store

    torch.set_num_threads(args.threads)
    cfg = arm_config(args, arm, seed)
    store, rid = Store(cfg.store.uri), run_id(args, arm, seed)
    if store.latest(rid) is None:
        run_iteration0(args, seed)
    latest = store.latest(rid)
    steps = Steps.direct()  # the flow's own loop (flows/iteration.py), its stages called without Prefect
    for i in range(latest + 1, cfg.iterations + 1):
        t0 = time.time()
        run_iteration(cfg, cfg.store.uri, rid, i, lambda: None, steps=steps)
        reward_phase = store.is_done(store.stage_uri(rid, i, TRAIN_REWARD))
        _log(f"{rid}: iteration {i} done in {time.time() - t0:.0f} s (reward phase: {reward_phase})")
    S.workspace().close()


def _log(msg: str) -> None:
    print(f"[{datetime.now(timezone.utc).strftime('%H:%M:%S')}] {msg}", flush=True)


def run_all(args: argparse.Namespace) -> None:
    """Every (arm, seed) run, `--workers` at a time, each in a child process (one torch thread)."""
    # Iteration 0 of every seed first (both arms share it), then the arms; SPARK runs first as they
    # take longest.
    phases = [[("init", seed) for seed in args.seeds],
              [(arm, seed) for arm in ("spark", "rlvr") for seed in args.seeds]]
    if args.workers <= 1:
        for jobs in phases:
            for arm, seed in jobs:
                run_iteration0(args, seed) if arm == "init" else run_one(args, arm, seed)
        return
    base = [sys.executable, str(Path(__file__).resolve())] + _passthrough(args)
    for jobs in phases:
        jobs = list(jobs)
        running: list[tuple[subprocess.Popen, str]] = []
        while jobs or running:
            while jobs and len(running) < args.workers:
                arm, seed = jobs.pop(0)
                proc = subprocess.Popen(base + ["--only", f"{arm}:{seed}"])
                running.append((proc, f"{arm}:{seed}"))
            time.sleep(2)
            for proc, name in list(running):
                if proc.poll() is not None:
                    running.remove((proc, name))
                    if proc.returncode != 0:
                        raise SystemExit(f"run {name} failed with exit code {proc.returncode}")


def _passthrough(args: argparse.Namespace) -> list[str]:
    out = ["--config", args.config, "--store", args.store, "--iterations", str(args.iterations),
           "--eval-every", str(args.eval_every), "--threads", str(args.threads), "--seeds", *map(str, args.seeds),
           "--out", args.out, "--no-report"]
    if args.limit:
        out += ["--limit", str(args.limit)]
    if args.balance_pointwise_labels:
        out.append("--balance-pointwise-labels")
    return out


# ------------------------------------------------------------------------------------------ metrics


def row_metrics(rows: Any) -> dict[str, float | None]:
    """Every metric of the table from per-question eval rows (a pandas frame of one run and iteration)."""
    from spark_core.evaluation import binary_judge_metrics

    n = len(rows)
    correct = rows["correct"].astype(bool).to_numpy()
    final = rows["final_correct"].astype(bool).to_numpy()
    judged = rows["judgment_correct"].notna().to_numpy()
    verdicts = [None if v is None or v != v else v == "Yes" for v in rows["judged"].to_numpy()[judged]]
    jm = binary_judge_metrics(verdicts, list(correct[judged]))
    pair = rows["pairwise_correct"].dropna() if "pairwise_correct" in rows else []
    return {
        "accuracy": float(correct.mean()) if n else 0.0,
        "accuracy_reflect": float(final.mean()) if n else 0.0,
        "right_to_wrong": float((correct & ~final).mean()) if n else 0.0,
        "wrong_to_right": float((~correct & final).mean()) if n else 0.0,
        "judge_accuracy": jm["accuracy"],
        "judge_balanced_accuracy": jm["balanced_accuracy"],
        "judge_precision": jm["precision"],
        "judge_recall": jm["recall"],
        "judge_f1": jm["f1"],
        "judge_yes_share": jm["yes_share"],
        "pairwise_accuracy": float(pair.astype(bool).mean()) if len(pair) else None,
        "verdict_parse_rate": jm["parse_rate"],
    }


def load_rows(args: argparse.Namespace) -> dict[tuple[str, int, int], Any]:
    """(arm, seed, iteration) -> per-question eval rows, sorted by item id, for every evaluated iteration."""
    from spark_core.layout import eval_stage
    from spark_core.store import Store

    out = {}
    for seed in args.seeds:
        for arm in ARMS:
            cfg = arm_config(args, arm, seed)
            store, rid = Store(cfg.store.uri), run_id(args, arm, seed)
            for it in range(cfg.iterations + 1):
                uri = store.stage_uri(rid, it, eval_stage(BENCHMARK))
                if store.is_done(uri):
                    out[(arm, seed, it)] = store.read_table(uri).to_pandas().sort_values("item_id").reset_index(drop=True)
    return out


def paired_bootstrap(rows: dict, seeds: list[int], iteration: int, reps: int, rng_seed: int = 12345) -> dict:
    """SPARK minus RLVR at `iteration`: point estimate and 95% CI per metric (see the module docstring)."""
    import numpy as np

    rng = np.random.default_rng(rng_seed)
    for seed in seeds:  # the pairing needs the same questions in the same order in both arms
        a, b = rows[("rlvr", seed, iteration)], rows[("spark", seed, iteration)]
        assert list(a["item_id"]) == list(b["item_id"]), f"seed {seed}: arms evaluated different questions"

    def seed_mean(arm: str, picks: list[tuple[int, Any]]) -> dict[str, float | None]:
        per = [row_metrics(rows[(arm, s, iteration)].iloc[idx]) for s, idx in picks]
        out = {}
        for key, _ in METRICS:
            vals = [m[key] for m in per if m[key] is not None]
            out[key] = float(np.mean(vals)) if vals else None
        return out

    full = [(s, np.arange(len(rows[("rlvr", s, iteration)]))) for s in seeds]
    point_r, point_s = seed_mean("rlvr", full), seed_mean("spark", full)
    samples: dict[str, list[float]] = {k: [] for k, _ in METRICS}
    for _ in range(reps):
        drawn = rng.choice(seeds, size=len(seeds), replace=True)
        picks = [(int(s), rng.integers(0, len(rows[("rlvr", int(s), iteration)]), len(rows[("rlvr", int(s), iteration)])))
                 for s in drawn]
        r, s = seed_mean("rlvr", picks), seed_mean("spark", picks)
        for key, _ in METRICS:
            if r[key] is not None and s[key] is not None:
                samples[key].append(s[key] - r[key])
    diff = {}
    for key, _ in METRICS:
        if point_r[key] is None or point_s[key] is None or not samples[key]:
            diff[key] = {"mean": None, "ci95": [None, None]}
            continue
        lo, hi = np.percentile(samples[key], [2.5, 97.5])
        diff[key] = {"mean": point_s[key] - point_r[key], "ci95": [float(lo), float(hi)]}
    return diff


def arm_means(rows: dict, seeds: list[int], arm: str, iteration: int) -> dict[str, float | None]:
    import numpy as np

    per = [row_metrics(rows[(arm, s, iteration)]) for s in seeds]
    out = {}
    for key, _ in METRICS:
        vals = [m[key] for m in per if m[key] is not None]
        out[key] = float(np.mean(vals)) if vals else None
    return out


# ------------------------------------------------------------------------------------------- report


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _signed(v: Any) -> str:
    return "n/a" if v is None else f"{v:+.3f}"


def report(args: argparse.Namespace, command: str, seconds: float | None) -> dict[str, Any]:
    from spark_core.store import Store

    rows = load_rows(args)
    cfg = arm_config(args, "spark", args.seeds[0])
    final = cfg.iterations
    missing = [(a, s) for s in args.seeds for a in ARMS if (a, s, final) not in rows or (a, s, 0) not in rows]
    if missing:
        raise SystemExit(f"runs not finished (no final or iteration-0 evaluation): {missing}")
    iters = sorted({it for (_, _, it) in rows})
    curves = {arm: {str(it): {str(s): row_metrics(rows[(arm, s, it)]) for s in args.seeds if (arm, s, it) in rows}
                    for it in iters} for arm in ARMS}
    diff = paired_bootstrap(rows, args.seeds, final, args.bootstrap)
    t = cfg.model.tiny
    model = (f"tiny Qwen2 ({t.num_hidden_layers} layers, hidden {t.hidden_size}) warm-started on the output formats "
             f"(random judge verdicts), {Path(args.config).name}") if cfg.model.source == "tiny" else str(
                 cfg.model.name_or_path or cfg.model.source)
    result = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()} {platform.processor() or ''} x{os.cpu_count()} CPU (shared), "
                   f"{platform.system()} {platform.release()}".replace("  ", " "),
        "command": command,
        "model": model,
        "seeds": list(args.seeds),
        "iterations": final,
        "test_questions": int(len(rows[("rlvr", args.seeds[0], 0)])),
        "arms": {arm: {"iteration_0": arm_means(rows, args.seeds, arm, 0),
                       "final": arm_means(rows, args.seeds, arm, final)} for arm in ARMS},
        "diff": diff,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "ablation_curves.json").write_text(json.dumps(
        {"note": "per arm, evaluated iteration and seed: metrics recomputed from the store's eval rows",
         "run_ids": {arm: {str(s): run_id(args, arm, s) for s in args.seeds} for arm in ARMS},
         "curves": curves, "wall_seconds": seconds}, indent=2) + "\n")
    store = Store(cfg.store.uri)
    phase = {arm: _phase_stats(store, [run_id(args, arm, s) for s in args.seeds], final) for arm in ARMS}
    (out / "ablation.md").write_text(markdown(result, curves, iters, phase, cfg))
    plot(curves, iters, out / "ablation.png", result)
    return result


def _phase_stats(store: Any, rids: list[str], final: int) -> dict[str, Any]:
    """Reward-phase facts read from the manifests: iterations with a reward phase, mean reward."""
    from spark_core.layout import REWARD_VERIFIED

    phases, rewards = 0, []
    for rid in rids:
        for it in range(1, final + 1):
            m = store.manifest_or_none(store.stage_uri(rid, it, REWARD_VERIFIED))
            if m is not None:
                phases += 1
                if (m.get("metrics") or {}).get("mean_reward") is not None:
                    rewards.append(m["metrics"]["mean_reward"])
    return {"reward_phases": phases, "runs": len(rids),
            "mean_reward_phase_reward": sum(rewards) / len(rewards) if rewards else None}


def markdown(result: dict, curves: dict, iters: list[int], phase: dict, cfg: Any) -> str:
    a, d, final = result["arms"], result["diff"], result["iterations"]
    lines = [
        f"# Miniature ablation: RLVR only vs SPARK ({result['date']})",
        "",
        f"- model: {result['model']}",
        f"- task: two-digit additions, {result['test_questions']} held-out test questions (same for both arms), "
        f"seeds {result['seeds']}, {final} iterations of {cfg.sampling.questions_per_iteration} questions x "
        f"{cfg.sampling.n} samples; SPARK pops {cfg.reward_data.reward_batch_size} reward items x {cfg.reward_n} "
        f"samples per iteration; lr {cfg.train.lr:g} (schedule over {cfg.train.total_steps} steps in both arms)",
        f"- machine: {result['machine']}",
        f"- command: `{result['command']}`",
        f"- SPARK arm's pointwise labels balanced per iteration (not in the paper): "
        f"{'yes' if cfg.reward_data.balance_pointwise_labels else 'no (the paper rule)'}",
        f"- reward phases run: RLVR {phase['rlvr']['reward_phases']}, SPARK {phase['spark']['reward_phases']} "
        f"(mean reward-phase reward {_fmt(phase['spark']['mean_reward_phase_reward'])})",
        "",
        "Means over seeds. Diff = SPARK minus RLVR at the final iteration, with a paired bootstrap 95% CI over "
        "seeds and questions. Flips are shares of questions. Judge metrics are on the model's own greedy "
        "answers; balanced accuracy is 0.5 for any judge that ignores its input.",
        "",
        "| metric | RLVR iter 0 | RLVR final | SPARK iter 0 | SPARK final | diff (95% CI) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, label in METRICS:
        dd = d[key]
        ci = "n/a" if dd["mean"] is None else f"{_signed(dd['mean'])} [{_signed(dd['ci95'][0])}, {_signed(dd['ci95'][1])}]"
        lines.append(f"| {label} | {_fmt(a['rlvr']['iteration_0'][key])} | {_fmt(a['rlvr']['final'][key])} | "
                     f"{_fmt(a['spark']['iteration_0'][key])} | {_fmt(a['spark']['final'][key])} | {ci} |")
    lines += ["", "## Per iteration (mean over seeds)", "",
              "| metric | arm | " + " | ".join(f"it {i}" for i in iters) + " |",
              "|---|---|" + "---:|" * len(iters)]
    for key, label in METRICS:
        for arm in ARMS:
            cells = []
            for it in iters:
                vals = [m[key] for m in curves[arm][str(it)].values() if m[key] is not None]
                cells.append(_fmt(sum(vals) / len(vals)) if vals else "n/a")
            lines.append(f"| {label} | {arm} | " + " | ".join(cells) + " |")
    lines += ["", "## Targets (issue 10)", ""]
    lines += targets(result)
    return "\n".join(lines) + "\n"


def targets(result: dict) -> list[str]:
    d, s = result["diff"], result["arms"]["spark"]
    checks = []
    ba = d["judge_balanced_accuracy"]
    checks.append(("SPARK judge balanced accuracy minus RLVR's >= +0.10 with CI lower bound > 0",
                   ba["mean"] is not None and ba["mean"] >= 0.10 and ba["ci95"][0] > 0,
                   f"{_signed(ba['mean'])} [{_signed(ba['ci95'][0])}, {_signed(ba['ci95'][1])}]"))
    acc = d["accuracy"]
    checks.append(("SPARK greedy accuracy not below RLVR's (CI upper bound of the difference >= 0)",
                   acc["ci95"][1] is not None and acc["ci95"][1] >= 0,
                   f"{_signed(acc['mean'])} [{_signed(acc['ci95'][0])}, {_signed(acc['ci95'][1])}]"))
    checks.append(("after SPARK training, accuracy with self-reflection >= without",
                   s["final"]["accuracy_reflect"] >= s["final"]["accuracy"],
                   f"{_fmt(s['final']['accuracy_reflect'])} vs {_fmt(s['final']['accuracy'])}"))
    pr = min(result["arms"][a]["iteration_0"]["verdict_parse_rate"] for a in ARMS)
    checks.append(("verdict parse rate >= 0.9 at iteration 0", pr >= 0.9, _fmt(pr)))
    return [f"- {'met' if ok else 'MISSED'}: {name} ({value})" for name, ok, value in checks]


def plot(curves: dict, iters: list[int], path: Path, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 4
    rows_ = (len(METRICS) + cols - 1) // cols
    fig, axes = plt.subplots(rows_, cols, figsize=(4 * cols, 3 * rows_), squeeze=False)
    colors = {"rlvr": "tab:blue", "spark": "tab:red"}
    for ax, (key, label) in zip(axes.flat, METRICS):
        for arm in ARMS:
            seeds = sorted({s for it in iters for s in curves[arm][str(it)]})
            for s in seeds:
                xs = [it for it in iters if s in curves[arm][str(it)] and curves[arm][str(it)][s][key] is not None]
                ax.plot(xs, [curves[arm][str(it)][s][key] for it in xs], color=colors[arm], alpha=0.25, lw=0.8)
            xs, ys = [], []
            for it in iters:
                vals = [m[key] for m in curves[arm][str(it)].values() if m[key] is not None]
                if vals:
                    xs.append(it)
                    ys.append(sum(vals) / len(vals))
            ax.plot(xs, ys, color=colors[arm], lw=2, marker="o", label=arm)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(METRICS):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"Miniature ablation, seeds {result['seeds']}, {result['test_questions']} test questions "
                 "(thin: per seed; thick: mean)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "bench" / "miniature.yaml"), help="run config of both arms")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--iterations", type=int, default=None, help="iterations per run (default: the config's)")
    parser.add_argument("--eval-every", type=int, default=None,
                        help="evaluate every N iterations and the last (default: the config's eval.every)")
    parser.add_argument("--limit", type=int, default=None, help="held-out questions (default: the config's)")
    parser.add_argument("--store", default="./spark-store-ablation", help="store URI of every run")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for ablation.json/.md/.png")
    parser.add_argument("--workers", type=int, default=1, help="runs at once (each in its own process)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap replicates")
    parser.add_argument("--balance-pointwise-labels", action="store_true",
                        help="SPARK arm with reward_data.balance_pointwise_labels (not in the paper); RLVR runs are shared")
    parser.add_argument("--only", help="ARM:SEED: run just this one (used by --workers)")
    parser.add_argument("--no-report", action="store_true", help="run, do not write the report")
    parser.add_argument("--report-only", action="store_true", help="write the report from finished runs")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from spark_core.config import load_config

    base = load_config(args.config)
    args.iterations = args.iterations or base.iterations
    args.eval_every = args.eval_every or base.eval.every
    sys.path.insert(0, str(ROOT / "bench"))
    import common

    common.quiet_libraries()

    if args.only:
        arm, seed = args.only.split(":")
        run_iteration0(args, int(seed)) if arm == "init" else run_one(args, arm, int(seed))
        return 0
    command = "python bench/ablation.py " + " ".join(a for a in sys.argv[1:])
    started = time.time()
    if not args.report_only:
        run_all(args)
    if args.no_report:
        return 0
    result = report(args, command, round(time.time() - started, 1) if not args.report_only else None)
    print((Path(args.out) / "ablation.md").read_text())
    return 0 if result else 1


if __name__ == "__main__":
    raise SystemExit(main())
