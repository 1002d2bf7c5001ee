"""Orchestration and storage overhead of one SPARK iteration: the Prefect flow vs its stages called directly.

Modes, each in a fresh process with a fresh store and the same config and seed:

* ``direct``: the flow's loop (``flows.iteration.run_iteration``) with ``Steps.direct()``: the stage
  functions of ``spark_core.stages`` called in one process, no Prefect task or flow;
* ``flow``: ``flows.iteration.spark_iteration`` on Prefect's ephemeral API (no server to start by hand);
* ``direct-s3`` / ``flow-s3``: the same against a SeaweedFS S3 server started through
  ``infra/local/stack.py`` (skipped when the stack or the ``weed`` binary is missing; ``--no-s3``);
* ``flow-limit``: ``flow`` with a tag concurrency limit ``gpu`` (1 slot) on the server and
  ``gpu_concurrency_tag="gpu"``: what a configured limit costs;
* ``flow-before``: ``flow`` as it was before issue 15 (main at 7347ca5), rebuilt here: every task tagged
  ``spark`` (GPU-bound ones also ``gpu``, no limit defined), the run guard doubled by a one-slot Prefect
  global concurrency limit, flow heartbeats on.
* ``flow-publish-before``: ``flow`` with publish as before 2026-12-01 22:30 UTC (b728f34): artifacts
  created one by one in the task's thread, every earlier iteration re-read, the plot's tight_layout.

Iteration 0 (initial checkpoint and baseline evaluation) is created first, the same way in every mode,
and is not timed; iterations 1..N are. Every interesting function is wrapped with a timer that records
inclusive and exclusive (minus nested timed calls) wall time: the compute (generate, verify, reward
items, GRPO, evaluation), the store (Parquet reads/writes, manifests, checkpoint save/fetch, opening a
store), model loads, and Prefect (flow and task calls, the run guard, publishing artifacts). So the
overhead is not only measured but attributed.

    python bench/iteration.py            # tiny (3 iterations, 4 modes) + smollm2-arith (1 iteration, flow)
    python bench/iteration.py --quick    # tiny only, 1 iteration, local store
    python bench/iteration.py --models smollm2-arith --modes direct,flow   # side by side (~15 min)
    python bench/iteration.py --models tiny --modes direct,flow,flow-limit,flow-before --iterations 11 --no-s3
Targets (issue 15): flow overhead (flow wall - compute) <= 0.5 s per iteration on tiny, every iteration;
<= 3% on smollm2-arith.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

SCRIPT = Path(__file__).resolve()
PROCESS_T0 = time.time()

# Exclusive-time categories for the breakdown table (component name -> category).
CATEGORY = {
    "generate": "compute", "verify_batch": "compute", "build_reward_items": "compute",
    "train_phase": "compute", "evaluate_benchmark": "compute", "evaluate_preference": "compute",
    "model load": "model load",
    "write_table": "store: Parquet", "read_table": "store: Parquet",
    "checkpoint save": "store: checkpoint", "download_checkpoint": "store: checkpoint",
    "manifest/exists": "store: metadata", "Store()": "store: metadata", "write_bytes": "store: metadata",
    "flow": "prefect", "run_guard": "prefect", "publish": "prefect",
}


def category(name: str) -> str:
    """Column of the breakdown table for a timed component."""
    if name.startswith("stage:"):
        return "in-stage other"  # a stage's own code outside every timed call inside it
    if name.startswith("publish:"):
        return "prefect"  # parts of publish (their time is also publish's own time there)
    if name.startswith("task:"):
        return "prefect"  # a task call minus the stage it runs: Prefect's task engine
    return CATEGORY.get(name, "other")


# ------------------------------------------------------------------------------------- timers


class Timers:
    """Inclusive and exclusive wall time per component, with nesting tracked per thread."""

    def __init__(self) -> None:
        self.inclusive: dict[str, float] = defaultdict(float)
        self.exclusive: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self._local = threading.local()
        # Threads whose calls make up the iteration: the main thread, plus any thread Prefect runs a
        # task in (a thread that runs a stage joins the set). Others (the store lease heartbeat) overlap
        # the main work.
        self.threads = {threading.main_thread().ident}
        # Python's cyclic GC pauses, measured apart: they land inside whichever span allocates.
        self.gc_s: dict[int, float] = defaultdict(float)
        self.gc_n: dict[int, int] = defaultdict(int)
        self._gc_start = 0.0
        gc.callbacks.append(self._on_gc)

    def _stack(self) -> list[list[float]]:
        if not hasattr(self._local, "stack"):
            self._local.stack = []
        return self._local.stack

    @contextlib.contextmanager
    def span(self, name: str) -> Iterator[None]:
        if name.startswith(("stage:", "task:")) or name in ("flow", "publish"):
            self.threads.add(threading.get_ident())
        stack = self._stack()
        frame = [0.0]  # time spent in nested spans
        stack.append(frame)
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            stack.pop()
            if stack:
                stack[-1][0] += elapsed
            # Background threads (the store lease heartbeat) overlap the main work: count them apart.
            key = name if threading.get_ident() in self.threads else f"{name} (background)"
            self.inclusive[key] += elapsed
            self.exclusive[key] += elapsed - frame[0]
            self.counts[key] += 1

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.span(name):
                return fn(*args, **kwargs)

        timed.__wrapped__ = fn  # type: ignore[attr-defined]
        return timed

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        else:
            self.gc_s[info["generation"]] += time.perf_counter() - self._gc_start
            self.gc_n[info["generation"]] += 1

    def snapshot(self) -> dict[str, Any]:
        return {"inclusive": dict(self.inclusive), "exclusive": dict(self.exclusive), "counts": dict(self.counts),
                "gc_s": {str(k): v for k, v in self.gc_s.items()}, "gc_n": {str(k): v for k, v in self.gc_n.items()}}

    def reset(self) -> None:
        for d in (self.inclusive, self.exclusive, self.counts, self.gc_s, self.gc_n):
            d.clear()


STAGES = ("init_run", "sample_policy", "verify_policy", "build_reward_data", "train_policy", "sample_reward",
          "verify_reward", "train_reward", "evaluate", "finish_iteration")


def instrument(timers: Timers, flow_mode: bool) -> None:
    """Wrap the functions whose time we attribute (class attributes, so every instance is covered)."""
    from spark_core import evaluation, models, reward_data, stages, verify_pool
    from spark_core.engines.hf import HFEngine
    from spark_core.stages import Workspace
    from spark_core.store import Store
    from spark_core.trainer import Trainer

    for name in STAGES:
        setattr(stages, name, timers.wrap(f"stage:{name}", getattr(stages, name)))
    # Stages import these lazily (`from .x import f` inside the function), so module attributes work.
    models.load_model_and_tokenizer = timers.wrap("model load", models.load_model_and_tokenizer)
    verify_pool.verify_batch = timers.wrap("verify_batch", verify_pool.verify_batch)
    reward_data.build_reward_items = timers.wrap("build_reward_items", reward_data.build_reward_items)
    evaluation.evaluate_benchmark = timers.wrap("evaluate_benchmark", evaluation.evaluate_benchmark)
    evaluation.evaluate_preference = timers.wrap("evaluate_preference", evaluation.evaluate_preference)
    HFEngine.generate = timers.wrap("generate", HFEngine.generate)  # type: ignore[method-assign]
    Trainer.train_phase = timers.wrap("train_phase", Trainer.train_phase)  # type: ignore[method-assign]
    Workspace.save_checkpoint = timers.wrap("checkpoint save", Workspace.save_checkpoint)  # type: ignore[method-assign]
    Store.__init__ = timers.wrap("Store()", Store.__init__)  # type: ignore[method-assign]
    Store.write_table = timers.wrap("write_table", Store.write_table)  # type: ignore[method-assign]
    Store.read_table = timers.wrap("read_table", Store.read_table)  # type: ignore[method-assign]
    Store.download_checkpoint = timers.wrap(  # type: ignore[method-assign]
        "download_checkpoint", Store.download_checkpoint)
    for name in ("manifest", "manifest_or_none", "is_done", "exists", "read_run", "latest"):
        setattr(Store, name, timers.wrap("manifest/exists", getattr(Store, name)))
    Store.write_bytes = timers.wrap("write_bytes", Store.write_bytes)  # type: ignore[method-assign]
    if flow_mode:
        import tasks.publish as tp
        from spark_core import lineage
        from spark_core.stages import report

        # Inside publish: what each part costs (its artifacts, the asset declarations, the plot, reads).
        for name in ("create_table_artifact", "create_markdown_artifact", "record_assets"):
            setattr(tp, name, timers.wrap(f"publish:{name}", getattr(tp, name)))
        report.metrics_rows = timers.wrap("publish:metrics_rows", report.metrics_rows)
        report.write_plot = timers.wrap("publish:write_plot", report.write_plot)
        lineage.iteration_lineage = timers.wrap("publish:iteration_lineage", lineage.iteration_lineage)
        import flows.iteration as fi

        fi.TASKS = fi.TASKS.wrapped(  # the steps spark_iteration runs
            lambda name, step: timers.wrap("publish" if name == "publish_task" else f"task:{name[:-5]}", step))
        guard = fi.run_guard

        @contextlib.contextmanager
        def timed_guard(*args: Any, **kwargs: Any) -> Iterator[Any]:
            # Only acquiring and releasing count; the body (the iteration) is timed elsewhere.
            cm = guard(*args, **kwargs)
            with timers.span("run_guard"):
                value = cm.__enter__()
            try:
                yield value
            except BaseException:
                with timers.span("run_guard"):
                    if not cm.__exit__(*sys.exc_info()):
                        raise
            else:
                with timers.span("run_guard"):
                    cm.__exit__(None, None, None)

        fi.run_guard = timed_guard


def as_before_issue_15() -> None:
    """Put back what issue 15 removed, for the ``flow-before`` mode: task tags ``spark`` (+ ``gpu`` on
    the GPU-bound steps, no limit defined) on every task and asset task, and the Prefect global
    concurrency limit ``spark-run-{run}`` around the store lease. Flow heartbeats stay on (the worker
    skips ``embedded_prefect``)."""
    from dataclasses import fields

    from prefect.client.orchestration import get_client
    from prefect.concurrency.sync import concurrency

    import flows.iteration as fi
    import tasks.assets as ta
    from flows.steps import GPU_STEPS
    from tasks.common import prefect_slug

    fi.TASKS = fi.Steps(**{f.name: getattr(fi.TASKS, f.name).with_options(
        tags=["spark", "gpu"] if f.name in GPU_STEPS else ["spark"]) for f in fields(fi.Steps)})
    materialize = ta.materialize
    ta.materialize = lambda *a, **k: materialize(*a, **{**k, "tags": ["spark"]})  # type: ignore[assignment]
    store_guard = fi.run_guard

    @contextlib.contextmanager
    def old_guard(store: Any, run_id: str, wait_s: float) -> Iterator[Any]:
        name = f"spark-run-{prefect_slug(run_id)}"
        with get_client(sync_client=True) as client:
            client.upsert_global_concurrency_limit_by_name(name, limit=1)
        with concurrency(name, occupy=1, timeout_seconds=max(wait_s, 1.0), lease_duration=120, strict=False):
            with store_guard(store, run_id, wait_s) as lock:
                yield lock

    fi.run_guard = old_guard


def as_before_publish() -> None:
    """Put back publish as it was before 2026-12-01 22:30 UTC, for the ``flow-publish-before`` mode: every
    artifact created in the task's own thread, one after the other; the metrics table, plot and run index
    rebuilt from every earlier iteration's manifests (no stored records); the plot laid out with
    ``tight_layout`` (an extra draw)."""
    from matplotlib.figure import Figure

    import tasks.publish as tp
    from spark_core.stages import report

    class AtOnce:
        def __call__(self, create: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
            create(*args, **kwargs)

        def wait(self) -> None:
            pass

        def close(self, *, raise_errors: bool = True) -> None:
            pass

    def rebuilt(cfg: Any, store: Any, run_id: str, current: dict[str, Any], up_to: int) -> dict[int, Any]:
        out = {it: report.iteration_record(cfg, store, run_id, it) for it in store.list_iterations(run_id)
               if it < up_to}
        return {**out, up_to: current}

    adjust = Figure.subplots_adjust

    def tight(self: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(self, "_bench_tight", False):  # tight_layout's own call
            return adjust(self, *args, **kwargs)
        self._bench_tight = True
        try:
            return self.tight_layout()
        finally:
            self._bench_tight = False

    tp._InOrder = AtOnce  # type: ignore[assignment,misc]
    report.run_records = rebuilt
    Figure.subplots_adjust = tight  # type: ignore[method-assign]


# ------------------------------------------------------------------------------------- worker


def bench_config(preset: str, iterations: int, store_uri: str) -> Any:
    from spark_core.config import load_config

    overrides: dict[str, Any] = {"device": "cpu", "iterations": iterations, "store": {"uri": store_uri}}
    if preset == "smollm2-arith":
        # Keep the evaluation short (it is ordinary compute here, same in every mode).
        overrides["eval"] = {"benchmarks": [{"name": "arithmetic", "source": "arithmetic", "limit": 4}]}
    return load_config(preset=preset, overrides=overrides)


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    started = time.time()
    mode, preset = spec["mode"], spec["preset"]
    tmp = spec["tmp_dir"]
    os.environ["SPARK_CACHE_DIR"] = str(Path(tmp) / "ckpt-cache")
    flow_mode = mode.startswith("flow")
    if flow_mode:
        # Prefect's ephemeral API with its own fresh database; never a server someone else runs.
        os.environ.pop("PREFECT_API_URL", None)
        os.environ["PREFECT_HOME"] = str(Path(tmp) / "prefect")
        os.environ["PREFECT_SERVER_ALLOW_EPHEMERAL_MODE"] = "true"
        # A fresh database migrates on first start; on a loaded 2-core machine that exceeds the 20 s default.
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "240")
    common.quiet_libraries()
    common.set_threads()
    out: dict[str, Any] = {"mode": mode, "preset": preset}

    t = time.perf_counter()
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from spark_core.store import Store

    from flows.iteration import Steps, run_iteration, start_run  # the flow's loop (imports prefect)
    out["imports_s"] = time.perf_counter() - t
    out["process_start_s"] = started - spec["spawned_at"]  # interpreter start until our code runs

    if mode == "flow-before":
        as_before_issue_15()
    if mode == "flow-publish-before":
        as_before_publish()
    if mode == "flow-limit":
        import flows.iteration as fi

        # What `gpu_concurrency_tag="gpu"` does in the flow, applied before the timers wrap the tasks.
        fi.TASKS = fi.TASKS.with_concurrency_tag("gpu")
    timers = Timers()
    instrument(timers, flow_mode)
    store_uri = spec.get("store_uri") or str(Path(tmp) / "store")
    cfg = bench_config(preset, spec["iterations"], store_uri)
    store = Store(store_uri)
    run_id = f"bench-{mode}"

    direct = Steps.direct()  # the flow's loop with the stages called in this process

    def no_lease() -> None:
        """Direct mode holds no run lease (nothing else writes this store)."""

    # Iteration 0, the same in every mode: run.json, initial checkpoint, baseline evaluation.
    t = time.perf_counter()
    start_run(cfg, store_uri, run_id, no_lease, direct)
    out["iteration0_s"] = time.perf_counter() - t
    out["iteration0_timers"] = timers.snapshot()

    stack = contextlib.ExitStack()
    if flow_mode:
        from prefect import flow

        from flows.common import embedded_prefect
        from flows.iteration import spark_iteration

        @flow(name="bench-ping")
        def ping() -> Any:
            from prefect.settings import get_current_settings

            return get_current_settings().flows.heartbeat_frequency

        # As `spark run` does: no flow heartbeats on the temporary API (not in the "before" mode).
        embedded = contextlib.nullcontext() if mode == "flow-before" else embedded_prefect()
        stack.enter_context(embedded)
        t = time.perf_counter()
        ping()  # the first flow of a process starts the ephemeral API server
        out["prefect_first_flow_s"] = time.perf_counter() - t
        t = time.perf_counter()
        out["flow_heartbeat_s"] = ping()
        out["prefect_empty_flow_s"] = time.perf_counter() - t
        if mode == "flow-limit":
            from prefect.client.orchestration import get_client

            with get_client(sync_client=True) as client:  # = `prefect concurrency-limit create gpu 1`
                client.create_concurrency_limit(tag="gpu", concurrency_limit=1)

    iterations = []
    profiler = None
    if spec.get("profile"):
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    for i in range(1, spec["iterations"] + 1):
        timers.reset()
        t = time.perf_counter()
        if flow_mode:
            with timers.span("flow"):
                spark_iteration(run_id=run_id, config=cfg, store=store_uri)
        else:
            run_iteration(cfg, store_uri, run_id, i, no_lease, direct)
        wall = time.perf_counter() - t
        assert store.latest(run_id) == i, f"iteration {i} did not complete (LATEST={store.latest(run_id)})"
        iterations.append({"iteration": i, "wall_s": wall, **timers.snapshot()})
        print(f"[iteration] {preset} {mode} iteration {i}: {wall:.2f} s", file=sys.stderr)
    stack.close()
    out["iterations"] = iterations
    if profiler is not None:
        import io
        import pstats

        profiler.disable()
        buf = io.StringIO()
        stats = pstats.Stats(profiler, stream=buf)
        stats.sort_stats("cumulative").print_stats(r"prefect|flows|tasks|s3fs|aiobotocore|fsspec", 40)
        stats.sort_stats("tottime").print_stats(20)
        out["profile"] = buf.getvalue()
    with contextlib.suppress(Exception):
        from spark_core.verify_pool import shutdown_pool

        shutdown_pool()
    return out


# --------------------------------------------------------------------------------------- S3


@contextlib.contextmanager
def s3_stack() -> Iterator[dict[str, str] | None]:
    """A SeaweedFS S3 server on free loopback ports for the duration; None when it cannot start."""
    try:
        sys.path.insert(0, str(common.REPO))
        from infra.local.stack import Stack, StackSettings, free_port
    except ImportError as err:
        print(f"[iteration] no S3 stack ({err}); S3 modes skipped", file=sys.stderr)
        yield None
        return
    state = tempfile.mkdtemp(prefix="spark-bench-s3-")
    stack = Stack(state, StackSettings(s3_port=free_port(), prefect_port=free_port(), bucket="bench"))
    try:
        seconds = stack.start_s3()
    except Exception as err:  # noqa: BLE001 - no binary, no ports: report and go on without S3
        print(f"[iteration] S3 server did not start ({err}); S3 modes skipped", file=sys.stderr)
        shutil.rmtree(state, ignore_errors=True)
        yield None
        return
    try:
        env = {k: v for k, v in stack.env().items() if k != "PREFECT_API_URL"}
        env["SPARK_BENCH_S3_START_S"] = f"{seconds:.2f}"
        env["SPARK_BENCH_STORE"] = stack.store_uri("bench")
        yield env
    finally:
        stack.stop_s3()
        shutil.rmtree(state, ignore_errors=True)



# ---------------------------------------------------------------------------------------- main


def _median_of(iters: list[dict[str, Any]], kind: str) -> dict[str, float]:
    names = {k for it in iters for k in it[kind]}
    return {k: common.median([it[kind].get(k, 0.0) for it in iters]) for k in names}


def summarise(res: dict[str, Any], skip_first: bool) -> dict[str, Any]:
    """Medians over iterations (the first is dropped when there are several: it warms caches)."""
    iters = res["iterations"][1:] if skip_first and len(res["iterations"]) > 1 else res["iterations"]
    exc = _median_of(iters, "exclusive")
    inc = _median_of(iters, "inclusive")
    wall = common.median([it["wall_s"] for it in iters])
    by_cat: dict[str, float] = defaultdict(float)
    for name, seconds in exc.items():
        if name.endswith("(background)"):
            continue
        by_cat[category(name)] += seconds
    by_cat["unattributed"] = max(0.0, wall - sum(by_cat.values()))
    stage_sum = sum(v for k, v in inc.items() if k.startswith("stage:"))
    # Per iteration: wall - compute (every iteration, not only the median one).
    overheads = [it["wall_s"] - sum(v for k, v in it["exclusive"].items()
                                    if category(k) == "compute" and not k.endswith("(background)")) for it in iters]
    return {"wall_s": wall, "compute_s": by_cat.get("compute", 0.0), "stage_sum_s": stage_sum,
            "by_category": dict(by_cat), "exclusive": exc, "inclusive": inc, "n": len(iters),
            "overhead_min_s": min(overheads), "overhead_max_s": max(overheads),
            "wall_min_s": min(it["wall_s"] for it in iters), "wall_max_s": max(it["wall_s"] for it in iters)}


def main() -> int:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--no-s3", action="store_true", help="skip the S3 modes")
    parser.add_argument("--models", default=None, help="comma list of presets (default: tiny,smollm2-arith)")
    parser.add_argument("--modes", default=None,
                        help="comma list of modes (direct, flow, direct-s3, flow-s3) for every preset")
    parser.add_argument("--profile", action="store_true", help="cProfile the timed iterations of each mode")
    parser.add_argument("--iterations", type=int, default=None,
                        help="iterations per mode (default: 3 for tiny, 1 for smollm2-arith; the first is untimed "
                             "when there are several)")
    args = parser.parse_args()
    common.apply_threads(args)
    if args.worker:
        spec = json.loads(args.worker)
        common.write_worker_result(args.out, worker(spec))
        return 0

    info = common.machine_info()
    presets = args.models.split(",") if args.models else (["tiny"] if args.quick else ["tiny", "smollm2-arith"])
    # preset: (iterations, modes). One smollm2-arith iteration of the preset takes minutes on 2 cores, so
    # by default only the flow runs there; its overhead is attributed inside the run (wall - compute).
    # `--modes direct,flow` adds the side-by-side direct run.
    plan = {
        "tiny": (1, ["direct", "flow"]) if args.quick else (3, ["direct", "flow", "direct-s3", "flow-s3"]),
        "smollm2-arith": (1, ["flow"]),
    }
    if args.modes:
        plan = {p: (n, args.modes.split(",")) for p, (n, _) in plan.items()}
    if args.iterations:
        plan = {p: (args.iterations, modes) for p, (_, modes) in plan.items()}
    want_s3 = not args.no_s3 and any(m.endswith("s3") for p in presets for m in plan[p][1])
    results: dict[str, dict[str, Any]] = defaultdict(dict)
    s3_start = None
    with (s3_stack() if want_s3 else contextlib.nullcontext(None)) as s3_env:
        saved = dict(os.environ)
        if s3_env:
            s3_start = float(s3_env.pop("SPARK_BENCH_S3_START_S"))
        for preset in presets:
            iterations, modes = plan[preset]
            for mode in modes:
                spec: dict[str, Any] = {"mode": mode, "preset": preset, "iterations": iterations,
                                        "profile": args.profile}
                if mode.endswith("s3"):
                    if not s3_env:
                        continue
                    os.environ.update({k: v for k, v in s3_env.items() if k != "SPARK_BENCH_STORE"})
                    spec["store_uri"] = s3_env["SPARK_BENCH_STORE"] + f"/{preset}-{mode}"
                print(f"[iteration] {preset}: {mode}", file=sys.stderr)
                spec["spawned_at"] = time.time()
                # The worker keeps its stores, checkpoints (~2 GB for smollm2) and Prefect database here.
                spec["tmp_dir"] = tempfile.mkdtemp(prefix="spark-bench-iter-")
                try:
                    results[preset][mode] = common.run_worker(SCRIPT, spec, timeout_s=1500)
                finally:
                    shutil.rmtree(spec["tmp_dir"], ignore_errors=True)
                os.environ.clear()
                os.environ.update(saved)

    rows, breakdown_rows, notes = [], [], []
    cats = ["compute", "in-stage other", "model load", "store: Parquet", "store: checkpoint", "store: metadata",
            "prefect", "unattributed"]
    for preset, modes in results.items():
        summaries = {m: summarise(r, skip_first=True) for m, r in modes.items()}
        for mode, s in summaries.items():
            base = summaries.get("direct-s3" if mode.endswith("s3") else "direct")
            overhead = s["wall_s"] - s["compute_s"]
            rows.append([preset, mode, s["n"], s["wall_s"], f"{s['wall_min_s']:.2f} / {s['wall_max_s']:.2f}",
                         s["compute_s"], overhead, f"{s['overhead_min_s']:.2f} / {s['overhead_max_s']:.2f}",
                         100 * overhead / s["wall_s"] if s["wall_s"] else float("nan"),
                         (s["wall_s"] - base["wall_s"]) if base and mode.startswith("flow") else None])
            breakdown_rows.append([preset, mode] + [s["by_category"].get(c, 0.0) for c in cats])
        for mode, r in modes.items():
            facts = [f"process start {r['process_start_s']:.1f} s", f"imports {r['imports_s']:.1f} s",
                     f"iteration 0 (model build/load, checkpoint, baseline eval) {r['iteration0_s']:.1f} s"]
            if "prefect_first_flow_s" in r:
                facts.append(f"first flow of the process (ephemeral API start) {r['prefect_first_flow_s']:.1f} s, "
                             f"an empty flow after that {r['prefect_empty_flow_s']:.2f} s "
                             f"(flow heartbeat every {r.get('flow_heartbeat_s')} s)")
            notes.append(f"{preset} {mode}, once per process (not in the table): " + "; ".join(facts) + ".")
        top = []
        for mode, s in summaries.items():
            if not mode.startswith("flow"):
                continue
            items = sorted(((v, k) for k, v in s["exclusive"].items()
                            if category(k) not in ("compute", "in-stage other")), reverse=True)[:8]
            top.append(f"{preset} {mode}: largest non-compute components (exclusive s/iteration): " +
                       ", ".join(f"{k} {v:.2f}" for v, k in items))
        notes += top
        for mode, r in modes.items():
            if r.get("profile"):
                notes.append(f"cProfile of {preset} {mode} (timed iterations):\n```\n{r['profile']}\n```")
    if s3_start is not None:
        notes.append(f"SeaweedFS S3 server (infra/local/stack.py) started in {s3_start:.1f} s "
                     "(once, not in the table).")
    table = common.markdown_table(
        ["model", "mode", "iterations timed", "wall s/iteration (median)", "wall min / max", "compute s",
         "overhead s (wall - compute, median)", "overhead min / max", "overhead %", "flow - direct s"], rows)
    breakdown = common.markdown_table(["model", "mode"] + cats, breakdown_rows)
    notes = [
        "Medians over timed iterations (the first timed iteration is dropped when there are several). "
        "Compute = generate + verify_batch + build_reward_items + train_phase + evaluation (exclusive times).",
        "Targets: flow overhead <= 0.5 s/iteration on tiny (every iteration), <= 3% on smollm2-arith.",
    ] + notes
    print(common.report("One SPARK iteration: Prefect flow vs stages called directly", info,
                        [("", table), ("**where the wall time goes** (exclusive seconds per iteration)", breakdown)],
                        notes))
    common.write_json(args.json, {"benchmark": "iteration", "machine": info, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
