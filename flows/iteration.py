"""One SPARK iteration as a Prefect flow: the paper's loop, read top to bottom.

The policy and the generative reward model are ONE model. Each iteration:

1. policy phase: sample K answers per question, verify them against the labels, recycle the verified
   groups into judgment and reflection items (FIFO pool), then a GRPO step on the answers;
2. reward phase (once the pool holds a batch): sample K judgments/reflections per popped item from the
   just-updated model, verify them against their known labels, then a second GRPO step;
3. evaluate every `eval.every` iterations, publish artifacts, and advance LATEST.

Every step is a task that reads its inputs from the store and writes its outputs there; a step whose
output already exists is skipped, so re-triggering a crashed iteration resumes it.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from spark_core.config import SparkConfig
from spark_core.stages import eval_due, iteration_summary
from spark_core.store import RunLock
from tasks.build_reward_data import build_reward_data_task
from tasks.evaluate import evaluate_task
from tasks.finish import finish_iteration_task
from tasks.init_run import init_run_task
from tasks.publish import publish_task
from tasks.sample import sample_policy_task, sample_reward_task
from tasks.train import train_policy_task, train_reward_task
from tasks.verify import verify_policy_task, verify_reward_task

from flows.common import resolve
from flows.guard import DEFAULT_WAIT_S, run_guard


def _evaluate(cfg: SparkConfig, store: str, run_id: str, iteration: int) -> None:
    if eval_due(cfg, iteration):
        for benchmark in cfg.eval.benchmarks:
            evaluate_task(cfg, store, run_id, iteration, benchmark.name)


def start_run(cfg: SparkConfig, store: str, run_id: str, lock: RunLock) -> None:
    """Iteration 0: the initial model (also the frozen KL reference) and its baseline evaluation."""
    init_run_task(cfg, store, run_id)
    _evaluate(cfg, store, run_id, 0)
    lock.check()  # still ours? only then make the iteration visible
    publish_task(cfg, store, run_id, 0)
    finish_iteration_task(cfg, store, run_id, 0)


def run_iteration(cfg: SparkConfig, store: str, run_id: str, i: int, lock: RunLock) -> None:
    """Iteration i >= 1: the checkpoint of i-1 samples; the result is the checkpoint of i."""
    # Policy phase: answer, check, recycle the checked answers into reward data, learn.
    sample_policy_task(cfg, store, run_id, i)
    verify_policy_task(cfg, store, run_id, i)
    if cfg.reward_data.enabled:
        build_reward_data_task(cfg, store, run_id, i)
    trained = train_policy_task(cfg, store, run_id, i)

    # Reward phase: the same model judges/reflects on popped pool items; rewarded by known labels.
    if trained["reward_phase"]:
        sample_reward_task(cfg, store, run_id, i)
        verify_reward_task(cfg, store, run_id, i)
        train_reward_task(cfg, store, run_id, i)

    _evaluate(cfg, store, run_id, i)
    lock.check()  # still ours? only then make the iteration visible
    publish_task(cfg, store, run_id, i)
    finish_iteration_task(cfg, store, run_id, i)


@flow(name="spark-iteration", flow_run_name="spark-{run_id}", validate_parameters=True)
def spark_iteration(
    run_id: str,
    config: SparkConfig | None = None,
    store: str | None = None,
    lock_wait_s: float = DEFAULT_WAIT_S,
) -> dict[str, Any]:
    """Run the next iteration of a run (after its LATEST), creating the run first if needed.

    `config` is required to create a run; to continue one it may be omitted (run.json is used).
    `store` defaults to the config's `store.uri`. Nothing happens once LATEST reaches the config's
    `iterations`. Returns the iteration's metrics.
    """
    cfg, st, run_id = resolve(config, store, run_id)
    logger = get_run_logger()
    with run_guard(st, run_id, lock_wait_s) as lock:
        if st.latest(run_id) is None:
            st.cleanup_tmp(run_id)
            start_run(cfg, st.uri, run_id, lock)
        latest = st.latest(run_id) or 0
        if latest >= cfg.iterations:
            logger.info("run %s already has %d of %d iterations; nothing to do", run_id, latest, cfg.iterations)
            return {"run_id": run_id, "iteration": latest, "status": "complete"}
        i = latest + 1
        st.cleanup_tmp(run_id)  # leftovers of a crashed writer; we hold the lock, nobody else writes
        run_iteration(cfg, st.uri, run_id, i, lock)
    summary = iteration_summary(cfg, st, run_id, i)
    logger.info("run %s iteration %d: %s", run_id, i, summary)
    return {"run_id": run_id, "status": "ran", **summary}
