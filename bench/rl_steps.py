"""Store bytes and checkpoint seconds per RL step, for steps_per_iteration = 1, 2, 4 side by side.

Every variant runs the SAME number of RL steps (same batches, same seeds: RL step g is batch g whatever N)
in a fresh process on a fresh local store, through the flow's own loop (``flows.iteration.run_iteration``
with ``Steps.direct()``): N=1 for R iterations, N=2 for R/2, N=4 for R/4. Plus "before", N=1 with
``store.intermediate_checkpoints`` on: the layout before RL steps existed (the after-policy checkpoint of
every iteration written to the store too, deleted again once the iteration completes).

Counted (iteration 0, the initial checkpoint and run.json, is created first and not counted):

* bytes written to the store: every table part, manifest and small object (``Store._write_bytes``) plus
  every checkpoint folder (``checkpoint_io.folder_bytes`` of each checkpoint write) -- written, not kept;
* checkpoint seconds: wall time inside ``Workspace.save_checkpoint`` (weights + optimizer state + RNG
  state to the store, and the manifest);
* wall seconds of the timed iterations. Evaluation is off (it is per iteration and the same work in
  every variant; it would only blur the storage figures).

    python bench/rl_steps.py                    # tiny, 4 RL steps per variant (~4 min on 2 busy cores)
    python bench/rl_steps.py --preset smollm2-arith --variants before,4   # ~2-3 min per RL step and variant
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

SCRIPT = Path(__file__).resolve()
VARIANTS = [  # (name, steps_per_iteration, intermediate_checkpoints)
    ("before (N=1, after-policy checkpoint stored)", 1, True),
    ("N=1", 1, False),
    ("N=2", 2, False),
    ("N=4", 4, False),
]


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    os.environ["SPARK_CACHE_DIR"] = str(Path(spec["tmp_dir"]) / "ckpt-cache")
    common.quiet_libraries()
    common.set_threads()
    from spark_core import checkpoint_io
    from spark_core.config import load_config
    from spark_core.stages import lifecycle
    from spark_core.store import Store

    from flows.iteration import Steps, run_iteration, start_run

    counts = {"table_and_meta_bytes": 0, "checkpoint_bytes": 0, "checkpoints": 0, "checkpoint_s": 0.0}
    write_bytes, folder_bytes, save = Store._write_bytes, checkpoint_io.folder_bytes, lifecycle.Workspace.save_checkpoint

    def counted_write(self: Store, uri: str, data: bytes) -> None:
        counts["table_and_meta_bytes"] += len(data)
        write_bytes(self, uri, data)

    def counted_folder(folder: Path) -> int:
        total = folder_bytes(folder)
        counts["checkpoint_bytes"] += total
        counts["checkpoints"] += 1
        return total

    def timed_save(self: Any, *args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return save(self, *args, **kwargs)
        finally:
            counts["checkpoint_s"] += time.perf_counter() - t

    Store._write_bytes = counted_write  # type: ignore[method-assign]
    checkpoint_io.folder_bytes = counted_folder
    lifecycle.Workspace.save_checkpoint = timed_save  # type: ignore[method-assign]

    n, rl_steps = spec["steps"], spec["rl_steps"]
    store_uri = str(Path(spec["tmp_dir"]) / "store")
    cfg = load_config(preset=spec["preset"], overrides={
        "device": "cpu", "iterations": rl_steps // n, "steps_per_iteration": n,
        "store": {"uri": store_uri, "intermediate_checkpoints": spec["intermediate"]}, "eval": {"every": 0},
    })
    if spec.get("model_cache"):
        cfg.model.cache_dir = spec["model_cache"]
    steps, run_id = Steps.direct(), "rl-steps"
    start_run(cfg, store_uri, run_id, lambda: None, steps)
    for key in counts:
        counts[key] = 0 if key != "checkpoint_s" else 0.0
    t = time.perf_counter()
    for i in range(1, cfg.iterations + 1):
        run_iteration(cfg, store_uri, run_id, i, lambda: None, steps)
    wall = time.perf_counter() - t
    store = Store(store_uri)
    kept = sum(p.stat().st_size for p in Path(store_uri).rglob("*") if p.is_file() and "iter=0000" not in str(p))
    return {**counts, "wall_s": wall, "rl_steps": rl_steps, "iterations": cfg.iterations,
            "kept_bytes": kept, "latest": store.latest(run_id)}


def main() -> int:
    parser = common.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--rl-steps", type=int, default=4, help="RL steps per variant (a multiple of 4)")
    parser.add_argument("--variants", default="before,1,2,4", help="comma list of: before, 1, 2, 4")
    args = parser.parse_args()
    if args.worker:
        import json

        common.write_worker_result(args.out, worker(json.loads(args.worker)))
        return 0
    common.apply_threads(args)
    if args.rl_steps % 4:
        parser.error("--rl-steps must be a multiple of 4 (N=4 runs whole iterations)")
    info = common.machine_info()
    results = []
    with tempfile.TemporaryDirectory(prefix="spark-rl-steps-") as tmp:
        models = str(Path(tmp) / "models")  # one model cache: the warm start is built once, not per variant
        wanted = set(args.variants.split(","))
        for name, n, intermediate in VARIANTS:
            if ("before" if intermediate else str(n)) not in wanted:
                continue
            spec = {"preset": args.preset, "steps": n, "intermediate": intermediate, "rl_steps": args.rl_steps,
                    "tmp_dir": str(Path(tmp) / f"v{n}{int(intermediate)}"),
                    "model_cache": models if args.preset == "tiny" else None}  # tiny: its warm start once
            Path(spec["tmp_dir"]).mkdir()
            print(f"running {name} ...", file=sys.stderr, flush=True)
            results.append({"variant": name, **common.run_worker(SCRIPT, spec, timeout_s=7200)})
    nan = {"bytes_per_rl_step": float("nan"), "checkpoint_s_per_rl_step": float("nan")}
    base = next((r for r in results if r["variant"] == "N=1"), nan)
    before = next((r for r in results if r["variant"].startswith("before")), nan)
    rows = []
    for r in results:
        total = r["table_and_meta_bytes"] + r["checkpoint_bytes"]
        per_step, ck_s = total / r["rl_steps"], r["checkpoint_s"] / r["rl_steps"]
        r.update(bytes_per_rl_step=per_step, checkpoint_s_per_rl_step=ck_s)
    for r in results:
        rows.append([r["variant"], r["rl_steps"], r["checkpoints"], r["bytes_per_rl_step"],
                     common.ratio(r["bytes_per_rl_step"], before["bytes_per_rl_step"]),
                     common.ratio(r["bytes_per_rl_step"], base["bytes_per_rl_step"]),
                     r["checkpoint_s_per_rl_step"],
                     common.ratio(r["checkpoint_s_per_rl_step"], base["checkpoint_s_per_rl_step"]),
                     r["wall_s"] / r["rl_steps"], 100 * r["checkpoint_s"] / r["wall_s"]])
    table = common.markdown_table(
        ["variant", "RL steps", "checkpoints written", "bytes written / RL step", "vs before", "vs N=1",
         "checkpoint s / RL step", "vs N=1", "wall s / RL step", "checkpoint % of wall"], rows)
    notes = [f"preset {args.preset}, {args.rl_steps} RL steps per variant, evaluation off, local store.",
             "bytes written = table parts + manifests + small objects + every checkpoint folder written "
             "(counted at write time, so deleted intermediate checkpoints count too)."]
    print(common.report("Store writes per RL step: steps_per_iteration = 1, 2, 4", info, [("", table)], notes))
    common.write_json(args.json, {"benchmark": "rl_steps", "machine": info, "preset": args.preset,
                                  "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
