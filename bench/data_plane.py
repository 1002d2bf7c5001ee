"""The data plane: verifying rollouts, building reward items, and reading a whole run's tables.

Three measurements, each against a baseline in the same run:

1. ``verify_batch`` (process pool, per-item wall-clock limit) on 10k synthetic rollouts vs a plain
   in-process loop of ``spark_core.verify.verify`` (no pool, no timeouts) on the same items; both must
   give the same rewards. The pool's first call (forkserver start and warm-up) is reported apart.
2. ``build_reward_items`` on 100k verified rollouts (12.5k groups of 8) vs a vectorised pandas floor
   (group, classify all-right / all-wrong / mixed, pick one row per group, no prompts): items/s and the
   extra peak memory of the call, each in its own process.
3. Reading a run of ~20 iterations written through ``spark_core.store`` (``verified`` and ``train``
   stages): DuckDB SQL over the hive layout vs ``pyarrow.dataset`` + pandas vs the store's own
   manifest-driven reader (``Store.read_stage_across_iterations``) + pandas.

    python bench/data_plane.py            # ~3 min on 2 cores
    python bench/data_plane.py --quick    # smoke run
"""

from __future__ import annotations

import glob
import json
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

SCRIPT = Path(__file__).resolve()

# ------------------------------------------------------------------------------- synthetic data

_FILLER = [
    "Let me add the numbers step by step.",
    "First I line up the digits and carry where needed.",
    "Adding the ones and then the tens gives the total.",
    "I will compute the sum carefully.",
]


def _question(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"What is {a} + {b}?", a + b


def _completion(rng: random.Random, question: str, gold: int) -> str:
    """A rollout shaped like a CPU run's: short reasoning then a boxed answer in one of several forms.

    About 70% plain integers (decided without SymPy), 15% no usable box, 15% notations that need
    Math-Verify (``x = 7``, ``7 \\text{ apples}``, ``\\sqrt{49}``...), right or wrong.
    """
    value = gold if rng.random() < 0.5 else gold + rng.choice([-10, -1, 1, 2, 10])
    reasoning = f"{question[8:-1]} = {value}. {rng.choice(_FILLER)}"
    roll = rng.random()
    if roll < 0.70:
        return f"{reasoning} The answer is \\boxed{{{value}}}."
    if roll < 0.85:
        return rng.choice([f"{reasoning} The answer is {value}.", f"{reasoning} \\boxed{{", "I am not sure."])
    form = rng.choice([f"x = {value}", f"{value} \\text{{ apples}}", f"\\sqrt{{{value * value}}}",
                       f"{value}.0\\%", f"\\frac{{{2 * value}}}{{2}} + 0", f"{value}^{{1}}"])
    return f"{reasoning} The answer is \\boxed{{{form}}}."


def rollouts(n: int, k: int = 8, seed: int = 0) -> list[dict[str, Any]]:
    """`n` verified-looking rollouts in groups of `k` (question_id, completion, label, ...)."""
    from spark_core.verify import extract_boxed

    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    for g in range(n // k):
        question, gold = _question(rng)
        for j in range(k):
            completion = _completion(rng, question, gold)
            rows.append({
                "question_id": f"q{g:06d}", "sample_idx": j, "question": question,
                "completion": completion, "label": str(gold), "answer": extract_boxed(completion),
                # A cheap stand-in for the reward (build_reward_items only needs 0/1 per rollout).
                "reward": float(extract_boxed(completion) == str(gold)), "verify_status": "ok",
            })
    return rows


# --------------------------------------------------------------------------- 1. verify_batch


def worker_verify(spec: dict[str, Any]) -> dict[str, Any]:
    from spark_core.verify import verify
    from spark_core.verify_pool import shutdown_pool, verify_batch

    rows = rollouts(spec["n"], seed=1)
    completions = [r["completion"] for r in rows]
    golds = [r["label"] for r in rows]
    out: dict[str, Any] = {"n": len(rows)}
    with common.stopwatch() as t:
        first = verify_batch(completions, golds, timeout_s=5.0)
    out["pool_first_call_s"] = t[0]
    results: dict[str, list[float]] = {}

    def ours() -> float:
        with common.stopwatch() as t:
            res = verify_batch(completions, golds, timeout_s=5.0)
        results["ours"] = [r.reward for r in res]
        return t[0]

    def loop() -> float:
        with common.stopwatch() as t:
            res = [verify(c, g) for c, g in zip(completions, golds)]
        results["loop"] = [r.reward for r in res]
        return t[0]

    loop()  # warm the in-process Math-Verify/SymPy caches as the pool's workers are warmed
    out["seconds"] = common.alternate(spec["rounds"], {"ours": ours, "loop": loop})
    out["same_rewards"] = results["ours"] == results["loop"] == [r.reward for r in first]
    out["statuses"] = {s: sum(1 for r in first if r.status == s) for s in {r.status for r in first}}
    out["slow_items"] = sum(1 for r in first if r.status == "ok" and r.answer and not r.answer.lstrip("-").isdigit())
    try:
        import psutil

        kids = psutil.Process().children(recursive=True)
        out["pool_rss_mb"] = round(sum(k.memory_info().rss for k in kids) / 2**20, 1)
        out["pool_processes"] = len(kids)
    except Exception:  # noqa: BLE001 - psutil is a bench extra; the figure is then omitted
        pass
    shutdown_pool()
    return out


# ----------------------------------------------------------------------- 2. build_reward_items


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    import resource

    return pages * resource.getpagesize() / 2**20


def _pandas_floor(df: Any, seed: int) -> Any:
    """Lower bound of the same job in vectorised pandas: classify each group, pick one row per group."""
    import numpy as np
    import pandas as pd

    stats = df.groupby("question_id", sort=True)["reward"].agg(["sum", "count"])
    kind = pd.Series(np.where(stats["sum"] == stats["count"], "all_correct",
                              np.where(stats["sum"] == 0, "all_wrong", "mixed")), index=stats.index)
    picked = df[df["answer"].notna()].groupby("question_id").sample(n=1, random_state=seed)
    return picked.assign(kind=picked["question_id"].map(kind))


def worker_reward_items(spec: dict[str, Any]) -> dict[str, Any]:
    import pandas as pd

    from spark_core.chat import formatter
    from spark_core.config import RewardDataConfig, TinyModelConfig
    from spark_core.models import build_tiny
    from spark_core.reward_data import build_reward_items

    df = pd.DataFrame(rollouts(spec["n"], seed=2))
    _, tokenizer = build_tiny(TinyModelConfig())
    fmt = formatter(tokenizer)
    cfg = RewardDataConfig()  # paper caps: 32 judgment + 32 reflection items kept
    before = _current_rss_mb()
    with common.stopwatch() as t:
        if spec["contender"] == "ours":
            produced = build_reward_items(df, cfg, fmt, iteration=1, seed=0).num_rows
        else:
            produced = len(_pandas_floor(df, seed=0))
    peak = common.peak_rss_mb()
    return {"n": len(df), "groups": df["question_id"].nunique(), "seconds": t[0], "produced": produced,
            "rss_before_mb": round(before, 1), "peak_extra_mb": round(max(0.0, peak - before), 1)}


# ------------------------------------------------------------------------------ 3. run tables


def write_synthetic_run(root: str, iterations: int, rows_per_iter: int) -> tuple[str, str]:
    """A run of `iterations` iterations (`verified` + `train/phase=policy`) in a local store."""
    import pyarrow as pa

    from spark_core import layout, schemas
    from spark_core.store import Store

    store = Store(root)
    run_id = "bench-run"
    rng = random.Random(3)
    for it in range(1, iterations + 1):
        rows = rollouts(rows_per_iter, seed=100 + it)
        table = pa.Table.from_pylist([
            {**r, "prompt": "<|im_start|>user\n" + r["question"] + " Put the answer in \\boxed{}.<|im_end|>\n"
             "<|im_start|>assistant\n", "completion_ids": [rng.randint(0, 500) for _ in range(40)],
             "sample_idx": r["sample_idx"], "reward": r["reward"]}
            for r in rows
        ], schema=schemas.VERIFIED)
        store.write_table(store.stage_uri(run_id, it, layout.VERIFIED), table)
        train = pa.Table.from_pylist([
            {"step": it, "phase": "policy", "loss": 0.1, "pg_loss": 0.1, "kl": 0.0, "grad_norm": 1.0,
             "lr": 1e-6, "clip_frac": 0.0, "mean_reward": 0.5, "num_sequences": rows_per_iter,
             "num_tokens": 40 * rows_per_iter}
        ], schema=schemas.TRAIN)
        store.write_table(store.stage_uri(run_id, it, layout.TRAIN_POLICY), train)
    return store.uri, run_id


def bench_read(iterations: int, rows_per_iter: int, rounds: int) -> dict[str, Any]:
    import duckdb
    import pyarrow.dataset as ds

    from spark_core import layout
    from spark_core.store import Store

    with tempfile.TemporaryDirectory(prefix="spark-bench-store-") as tmp:
        with common.stopwatch() as t:
            uri, run_id = write_synthetic_run(tmp, iterations, rows_per_iter)
        write_s = t[0]
        store = Store(uri)
        run_dir = Path(store.run_uri(run_id))
        pattern = layout.stage_glob(str(run_dir), layout.VERIFIED)
        answers: dict[str, Any] = {}

        def duck_agg() -> float:
            with common.stopwatch() as t:
                df = duckdb.sql(
                    f"select iter, avg(reward) as mean_reward, count(*) as n from read_parquet('{pattern}', "
                    "hive_partitioning=true) group by iter order by iter"
                ).df()
            answers["duckdb"] = [round(x, 6) for x in df["mean_reward"]]
            return t[0]

        def arrow_agg() -> float:
            with common.stopwatch() as t:
                files = sorted(glob.glob(pattern))
                dataset = ds.dataset(files, format="parquet", partitioning="hive", partition_base_dir=str(run_dir))
                df = dataset.to_table(columns=["iter", "reward"]).to_pandas()
                agg = df.groupby("iter")["reward"].mean()
            answers["pyarrow"] = [round(x, 6) for x in agg]
            return t[0]

        def store_agg() -> float:
            with common.stopwatch() as t:
                df = store.read_stage_across_iterations(run_id, layout.VERIFIED, columns=["reward"]).to_pandas()
                agg = df.groupby("iteration")["reward"].mean()
            answers["store"] = [round(x, 6) for x in agg]
            return t[0]

        def duck_all() -> float:
            with common.stopwatch() as t:
                duckdb.sql(f"select * from read_parquet('{pattern}', hive_partitioning=true)").df()
            return t[0]

        def arrow_all() -> float:
            with common.stopwatch() as t:
                files = sorted(glob.glob(pattern))
                ds.dataset(files, format="parquet", partitioning="hive",
                           partition_base_dir=str(run_dir)).to_table().to_pandas()
            return t[0]

        def store_all() -> float:
            with common.stopwatch() as t:
                store.read_stage_across_iterations(run_id, layout.VERIFIED).to_pandas()
            return t[0]

        for fn in (duck_agg, arrow_agg, store_agg, duck_all, arrow_all, store_all):
            fn()  # warm-up: imports, DuckDB connection, OS page cache
        agg = common.alternate(rounds, {"duckdb": duck_agg, "pyarrow": arrow_agg, "store": store_agg})
        full = common.alternate(rounds, {"duckdb": duck_all, "pyarrow": arrow_all, "store": store_all})
        bytes_on_disk = sum(p.stat().st_size for p in run_dir.rglob("*.parquet") if f"/{layout.VERIFIED}/" in str(p))
    return {
        "iterations": iterations, "rows": iterations * rows_per_iter, "write_s": write_s,
        "parquet_mb": round(bytes_on_disk / 2**20, 2), "aggregate": agg, "full": full,
        "same_answer": answers["duckdb"] == answers["pyarrow"] == answers["store"],
    }


# ------------------------------------------------------------------------------------------ main


def main() -> int:
    args = common.base_parser(__doc__.splitlines()[0]).parse_args()
    common.apply_threads(args)
    common.quiet_libraries()
    if args.worker:
        spec = json.loads(args.worker)
        fn = {"verify": worker_verify, "reward_items": worker_reward_items}[spec["task"]]
        common.write_worker_result(args.out, fn(spec))
        return 0

    info = common.machine_info()
    n_verify, n_items, iters, rows_per_iter, rounds = (
        (1000, 8000, 4, 256, 1) if args.quick else (10_000, 100_000, 20, 512, 3)
    )
    tables: list[tuple[str, str]] = []
    notes: list[str] = []

    # 1. verify
    print(f"[data_plane] verify_batch on {n_verify} rollouts", file=sys.stderr)
    v = common.run_worker(SCRIPT, {"task": "verify", "n": n_verify, "rounds": rounds})
    ours_s, loop_s = common.median(v["seconds"]["ours"]), common.median(v["seconds"]["loop"])
    tables.append(("**verify** (10k rollouts of arithmetic; median of alternated warm repeats)" if not args.quick
                   else "**verify**", common.markdown_table(
        ["checker", "items", "seconds", "items/s", "ratio vs loop (time)", "same rewards", "memory"],
        [["verify_batch (pool, 5 s limit)", v["n"], ours_s, v["n"] / ours_s, common.ratio(ours_s, loop_s),
          v["same_rewards"], f"parent peak {v['peak_rss_mb']} MiB + pool {v.get('pool_rss_mb', '?')} MiB "
          f"({v.get('pool_processes', '?')} procs)"],
         ["plain loop of verify() (no pool, no timeout)", v["n"], loop_s, v["n"] / loop_s, 1.0, v["same_rewards"],
          "same process"]],
    )))
    notes.append(f"verify_batch's first call (forkserver start + Math-Verify warm-up) took "
                 f"{v['pool_first_call_s']:.2f} s; statuses {v['statuses']}; {v['slow_items']} items "
                 "needed Math-Verify (the rest are decided in the parent without IPC).")

    # 2. reward items, each contender in its own process, alternated
    print(f"[data_plane] build_reward_items on {n_items} rollouts", file=sys.stderr)
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "floor": []}
    for r in range(max(2, rounds)):
        for contender in (("ours", "floor") if r % 2 == 0 else ("floor", "ours")):
            runs[contender].append(common.run_worker(
                SCRIPT, {"task": "reward_items", "n": n_items, "contender": contender}))
    rows = []
    for name, label in (("ours", "build_reward_items (paper rules, prompts for kept items)"),
                        ("floor", "pandas floor: groupby + classify + sample 1 row/group")):
        secs = common.median([x["seconds"] for x in runs[name]])
        rows.append([label, runs[name][0]["n"], runs[name][0]["groups"], secs, runs[name][0]["n"] / secs,
                     max(x["peak_extra_mb"] for x in runs[name]), runs[name][0]["produced"]])
    rows[0].insert(5, common.ratio(rows[0][3], rows[1][3]))
    rows[1].insert(5, 1.0)
    tables.append(("**reward items** (each run in a fresh process; extra peak RSS of the call)",
                   common.markdown_table(["builder", "rollouts", "groups", "seconds", "rollouts/s",
                                          "ratio vs floor (time)", "extra peak MiB", "rows out"], rows)))

    # 3. reading a run
    print(f"[data_plane] reading a run of {iters} iterations", file=sys.stderr)
    rd = bench_read(iters, rows_per_iter, max(3, rounds + 2))
    read_rows = []
    for query, key in (("mean reward per iteration", "aggregate"), ("all columns to pandas", "full")):
        base = common.median(rd[key]["pyarrow"])
        for reader, label in (("duckdb", "DuckDB read_parquet(hive_partitioning)"),
                              ("pyarrow", "pyarrow.dataset + pandas"),
                              ("store", "Store.read_stage_across_iterations + pandas")):
            secs = common.median(rd[key][reader])
            read_rows.append([query, label, secs * 1000, common.ratio(secs, base)])
    tables.append((f"**reading a run** ({rd['iterations']} iterations, {rd['rows']:,} verified rows, "
                   f"{rd['parquet_mb']} MiB Parquet; same answer from all readers: "
                   f"{common.fmt(rd['same_answer'])})",
                   common.markdown_table(["query", "reader", "ms", "ratio vs pyarrow.dataset"], read_rows)))
    notes.append(f"Writing the synthetic run through Store.write_table took {rd['write_s']:.2f} s "
                 f"({2 * rd['iterations']} atomic stage writes with manifests).")
    print(common.report("Data plane", info, tables, notes))
    common.write_json(args.json, {"benchmark": "data_plane", "machine": info, "verify": v,
                                  "reward_items": runs, "read": rd})
    return 0


if __name__ == "__main__":
    sys.exit(main())
