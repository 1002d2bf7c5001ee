"""The evaluation stage: solver and self-judge quality of an iteration's checkpoint on one benchmark."""

from __future__ import annotations

import time
from typing import Any, Callable

import pyarrow as pa

from ..chat import question_messages
from ..config import BenchmarkConfig, SparkConfig
from ..images import put_images
from ..layout import CHECKPOINT, eval_stage
from ..store import Store
from .common import StageError, manifest_extra, recorded, stage_seed, stage_summary
from .lifecycle import Workspace, workspace


def benchmark_config(cfg: SparkConfig, name: str) -> BenchmarkConfig:
    for b in cfg.eval.benchmarks:
        if b.name == name:
            return b
    known = ", ".join(b.name for b in cfg.eval.benchmarks) or "none"
    raise StageError(f"no benchmark named {name!r} in eval.benchmarks (configured: {known})")


def run_benchmark(cfg: SparkConfig, ws: Workspace, bcfg: BenchmarkConfig, seed: int,
                  keep_images: Callable[[tuple[bytes, ...]], Any] | None = None) -> tuple[pa.Table, dict[str, Any]]:
    """Evaluate the workspace's current checkpoint on one benchmark (no store involved; ``keep_images``
    is given each question's images, e.g. to store them once under the run)."""
    from ..benchmarks import load_benchmark, load_preference_set
    from ..demonstrations import role_prompts
    from ..evaluation import evaluate_benchmark, evaluate_preference

    fmt = ws.format_prompt(cfg)
    engine = ws.get_engine(cfg)
    if bcfg.source == "preference":
        return evaluate_preference(engine, fmt, load_preference_set(bcfg),
                                   max_new_tokens=cfg.eval_judge_max_new_tokens, seed=seed, roles=role_prompts(cfg))
    questions = load_benchmark(bcfg, cfg)
    if keep_images is not None:
        for q in questions:
            if q.images:
                keep_images(q.images)
    return evaluate_benchmark(
        engine, fmt, questions,
        question_messages=lambda q: question_messages(cfg.data, q),
        eval_cfg=cfg.eval, max_new_tokens=cfg.eval_max_new_tokens, seed=seed, roles=role_prompts(cfg),
        judge_max_new_tokens=cfg.eval_judge_max_new_tokens, revision_max_new_tokens=cfg.eval_revision_max_new_tokens,
    )


def evaluate(cfg: SparkConfig, store: Store, run_id: str, iteration: int, benchmark: str,
             ws: Workspace | None = None) -> dict[str, Any]:
    """Solver and self-judge quality of the iteration's checkpoint -> `eval/benchmark={name}`."""
    out = store.stage_uri(run_id, iteration, eval_stage(benchmark))
    if (done := recorded(store, out)) is not None:
        return done
    started = time.time()
    bcfg = benchmark_config(cfg, benchmark)
    ckpt = store.stage_uri(run_id, iteration, CHECKPOINT)
    ws = (ws or workspace()).use(cfg, store, ckpt)
    table, summary = run_benchmark(cfg, ws, bcfg, stage_seed(cfg.seed, iteration, eval_stage(benchmark)),
                                   keep_images=lambda images: put_images(store, run_id, images))
    m = store.write_table(out, table, manifest_extra(
        cfg, run_id, iteration, eval_stage(benchmark), started, [ckpt], summary, benchmark=benchmark,
        benchmark_source=bcfg.source,
    ))
    return stage_summary(m, skipped=False)
