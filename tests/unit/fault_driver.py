"""Runs a tiny SPARK run to its last iteration in this process, the way the spark-iteration flow does
(run lease, temporary-key cleanup, the same stage functions through ``Steps.direct()``), on a local
store. The fault-matrix test starts it as a subprocess, holds it at a stage write (spark_core.faults),
SIGKILLs it there and starts it again to resume.

    python tests/unit/fault_driver.py STORE RUN_ID MODEL_CACHE [STEPS_PER_ITERATION]

With SPARK_FAULT_DRIVER_FLOW=1 it runs the real ``spark-iteration`` Prefect flow instead (tasks,
publish and its artifacts included) against the Prefect API in $PREFECT_API_URL.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # pipeline_engine (this folder)
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository

from pipeline_engine import ArithmeticEngine  # noqa: E402
from spark_core import stages  # noqa: E402
from spark_core.config import SparkConfig, load_config  # noqa: E402
from spark_core.store import Store  # noqa: E402


def config(store: str, model_cache: str, steps: int = 1) -> SparkConfig:
    """The tiny preset, one training iteration (of `steps` RL steps), a short evaluation (what the matrix runs)."""
    cfg = load_config(preset="tiny", overrides={
        "store": {"uri": store}, "model": {"cache_dir": model_cache}, "iterations": 1, "steps_per_iteration": steps,
    })
    cfg.eval.benchmarks[0].limit = 2
    cfg.eval.max_rounds = 0
    cfg.eval.pairwise = False
    return cfg


def main(store_uri: str, run_id: str, model_cache: str, steps: str = "1") -> None:
    from flows.iteration import run_iteration, start_run
    from flows.steps import Steps

    cfg = config(store_uri, model_cache, int(steps))
    ws = stages.workspace()
    ws.engine_factory = lambda c, w: ArithmeticEngine(w.get_tokenizer(c))  # so the reward phase runs
    steps = Steps.direct()
    store = Store(store_uri)
    with store.run_lock(run_id, ttl_s=60) as lock:  # a killed holder on this machine frees it at once
        if store.latest(run_id) is None:
            store.cleanup_tmp(run_id)
            start_run(cfg, store.uri, run_id, lock.check, steps)
        while (latest := store.latest(run_id) or 0) < cfg.iterations:
            store.cleanup_tmp(run_id)  # leftovers of a killed writer; we hold the lease
            run_iteration(cfg, store.uri, run_id, latest + 1, lock.check, steps)


def main_flow(store_uri: str, run_id: str, model_cache: str) -> None:
    """One call of the deployed flow's function: creates the run (iteration 0) and runs iteration 1."""
    from flows.iteration import spark_iteration

    ws = stages.workspace()
    ws.engine_factory = lambda c, w: ArithmeticEngine(w.get_tokenizer(c))  # tasks run in this process
    cfg = config(store_uri, model_cache)
    spark_iteration(run_id=run_id, config=cfg.model_dump(mode="json"), store=store_uri, lock_wait_s=0)


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")  # replay lines
    if os.environ.get("SPARK_FAULT_DRIVER_FLOW") == "1":
        main_flow(*sys.argv[1:4])
    else:
        main(*sys.argv[1:5])
