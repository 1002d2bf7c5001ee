"""The pipeline stages: each reads its inputs from the store and writes its outputs there.

Every stage has the signature ``(cfg, store, run_id, iteration, ...) -> summary`` and is idempotent: when
its ``_SUCCESS.json`` manifest exists it does nothing and returns the recorded summary, so a crashed or
re-triggered iteration resumes where it stopped. Seeds derive from ``(cfg.seed, iteration, stage)``, so
re-running a deleted stage reproduces its table. Summaries are small JSON-able dicts (URIs, row counts,
metrics, seconds): they are what the Prefect tasks pass around, never tables.

One SPARK iteration ``i >= 1`` (the checkpoint of ``i-1`` is the policy that samples) is
``steps_per_iteration`` RL steps, then the evaluation; each step's stages take the step (1-based)::

    for step in 1..N:
        sample_policy -> verify_policy -> build_reward_data -> train_policy
            -> [sample_reward -> verify_reward -> train_reward]     (when the pool popped a batch)
    evaluate (per benchmark) -> finish_iteration

The weights move on in the live workspace from update to update; the iteration's one checkpoint is
written by its last update. A stage that finds the workspace elsewhere (a new process, a resume) gets
there by snapshot + replay (``replay``).

Iteration 0 is ``init_run``: run.json and the initial model (also the frozen KL reference) as
``iter=0000/checkpoint``, then the baseline evaluation. LATEST is written by ``finish_iteration`` only,
so LATEST=0 means "initialised and baseline evaluated" and LATEST=i means iteration i is complete.

Where things live: ``lifecycle`` (the process-wide :class:`Workspace`: model, tokenizer, trainer and
engine of the checkpoint the live weights equal, so the stages of one iteration never reload between
phases), ``run`` (run.json, iteration 0, LATEST), one module per stage (``sample``, ``verify``,
``reward_pool``, ``train``, ``evaluation``) and ``report`` (reading a run back for people). The store
layout (stage names, paths, schemas) is ``spark_core.layout``; the training stages run on several ranks
through ``spark_core.distributed.launch``.
"""

from __future__ import annotations

from .common import StageError, eval_due, stage_seed
from .evaluation import benchmark_config, evaluate, run_benchmark
from .lifecycle import Workspace, workspace
from .report import iteration_summary, metrics_frame, published_summary
from .replay import reward_phase_follows
from .reward_pool import build_reward_data
from .run import check_run_config, finish_iteration, init_run, run_config
from .sample import sample_policy, sample_reward
from .train import train_policy, train_reward
from .verify import verify_policy, verify_reward

__all__ = [
    "StageError", "Workspace", "benchmark_config", "build_reward_data", "check_run_config",
    "eval_due", "evaluate", "finish_iteration", "init_run", "iteration_summary", "metrics_frame",
    "published_summary", "reward_phase_follows", "run_benchmark", "run_config", "sample_policy", "sample_reward", "stage_seed",
    "train_policy", "train_reward", "verify_policy", "verify_reward", "workspace",
]
