"""Sampling stages of both phases: K rollouts per question (policy) or per popped pool item (reward)."""

from __future__ import annotations

import time
from typing import Any

import pyarrow as pa

from .. import schemas
from ..chat import question_messages
from ..config import SparkConfig
from ..engines.base import SamplingParams
from ..images import ImageCache, put_images
from ..layout import REWARD_POOL, REWARD_SAMPLES, SAMPLES, step_stage
from ..store import Store
from .common import StageError, manifest_extra, mean, recorded, require_done, stage_seed, stage_summary
from .lifecycle import Workspace, workspace
from .replay import reach, step_uri


def _sample(cfg: SparkConfig, ws: Workspace, prompts: list[str], n: int, max_new_tokens: int,
            seed: int, images: list[list[bytes]] | None = None) -> list[list[Any]]:
    params = SamplingParams(
        n=n, temperature=cfg.sampling.temperature, top_p=cfg.sampling.top_p,
        max_new_tokens=max_new_tokens, seed=seed,
    )
    if not prompts:
        return []
    if images and any(images):  # vision-language: each prompt's images (text runs call as before)
        return ws.get_engine(cfg).generate(prompts, params, images=images)
    return ws.get_engine(cfg).generate(prompts, params)


def _sample_per_budget(cfg: SparkConfig, ws: Workspace, prompts: list[str], n: int, budgets: list[int],
                       seed: int, images: list[list[bytes]] | None = None) -> list[list[Any]]:
    """:func:`_sample` with a token budget per prompt (one generate call per distinct budget, order kept)."""
    outs: list[list[Any]] = [[] for _ in prompts]
    for budget in sorted(set(budgets)):
        idx = [i for i, b in enumerate(budgets) if b == budget]
        extra = {"images": [images[i] for i in idx]} if images else {}  # text runs: called as before
        for i, out in zip(idx, _sample(cfg, ws, [prompts[i] for i in idx], n, budget, seed, **extra)):
            outs[i] = out
    return outs


def sample_policy(cfg: SparkConfig, store: Store, run_id: str, iteration: int, ws: Workspace | None = None,
                  *, step: int = 1) -> dict[str, Any]:
    """Policy phase of RL step `step`: K rollouts for each question of the step's batch -> `samples`,
    from the weights after the iteration's earlier steps (the previous checkpoint at step 1)."""
    out = step_uri(cfg, store, run_id, iteration, SAMPLES, step)
    if (done := recorded(store, out)) is not None:
        return done
    from ..data import batch_for_iteration

    started = time.time()
    ws = ws or workspace()
    inputs = reach(cfg, store, run_id, iteration, step, "policy", ws)
    # RL steps walk through the data in order: global step (i-1)*N + s (= the iteration with one step).
    global_step = (iteration - 1) * cfg.steps_per_iteration + step
    questions = batch_for_iteration(
        ws.training_questions(cfg), global_step, cfg.sampling.questions_per_iteration, cfg.seed
    )
    fmt = ws.format_prompt(cfg)
    prompts = [fmt(question_messages(cfg.data, q.question, len(q.images))) for q in questions]
    refs = [put_images(store, run_id, q.images) for q in questions]  # each image stored once per run
    images = [list(q.images) for q in questions] if any(q.images for q in questions) else None
    stage = step_stage(SAMPLES, step, cfg.steps_per_iteration)
    outs = _sample(cfg, ws, prompts, cfg.sampling.n, cfg.sampling.max_new_tokens,
                   stage_seed(cfg.seed, iteration, stage), images)
    rows = [
        {
            "question_id": q.question_id,
            "sample_idx": j,
            "prompt": prompt,
            "question": q.question,
            "completion": c.text,
            "completion_ids": list(c.token_ids),
            "label": q.answer,
            **({"images": ref} if ref else {}),
        }
        for q, prompt, ref, completions in zip(questions, prompts, refs, outs)
        for j, c in enumerate(completions)
    ]
    table = pa.Table.from_pylist(rows, schema=schemas.with_images(schemas.SAMPLES, rows))
    lengths = [len(c.token_ids) for cs in outs for c in cs]
    truncated = [c.finish_reason == "length" for cs in outs for c in cs]
    metrics = {
        "questions": len(questions),
        "mean_completion_tokens": mean(lengths),
        "truncated_frac": mean(truncated),
    }
    m = store.write_table(out, table, manifest_extra(cfg, run_id, iteration, stage, started, inputs, metrics,
                                                     step=step))
    return stage_summary(m, skipped=False)


def sample_reward(cfg: SparkConfig, store: Store, run_id: str, iteration: int, ws: Workspace | None = None,
                  *, step: int = 1) -> dict[str, Any]:
    """Reward phase of RL step `step`: K samples for each popped pool item, from the after-policy model
    -> `reward_samples`."""
    out = step_uri(cfg, store, run_id, iteration, REWARD_SAMPLES, step)
    if (done := recorded(store, out)) is not None:
        return done
    started = time.time()
    pool_uri = step_uri(cfg, store, run_id, iteration, REWARD_POOL, step)
    require_done(store, pool_uri, "reward pool")
    pool = store.read_table(pool_uri)
    items = pool.filter(pool.column("popped")).to_pylist()
    if not items:
        raise StageError(f"iteration {iteration}: the pool popped no items; there is no reward phase to sample")
    ws = ws or workspace()
    model_inputs = reach(cfg, store, run_id, iteration, step, "reward", ws)
    load = ImageCache(store, run_id)  # judgment and reflection items show their question's image(s)
    images = [[load(r) for r in it.get("images") or []] for it in items]
    stage = step_stage(REWARD_SAMPLES, step, cfg.steps_per_iteration)
    outs = _sample_per_budget(cfg, ws, [it["prompt"] for it in items], cfg.reward_n,
                              [cfg.reward_kind_max_new_tokens(it["kind"]) for it in items],
                              stage_seed(cfg.seed, iteration, stage), images if any(images) else None)
    rows = [
        {
            "question_id": it["item_id"],
            "sample_idx": j,
            "prompt": it["prompt"],
            "completion": c.text,
            "completion_ids": list(c.token_ids),
            "label": it["label"],
            "kind": it["kind"],
            **({"images": it["images"]} if it.get("images") else {}),
        }
        for it, completions in zip(items, outs)
        for j, c in enumerate(completions)
    ]
    table = pa.Table.from_pylist(rows, schema=schemas.with_images(schemas.REWARD_SAMPLES, rows))
    metrics = {"items": len(items), "mean_completion_tokens": mean([len(r["completion_ids"]) for r in rows])}
    m = store.write_table(out, table, manifest_extra(
        cfg, run_id, iteration, stage, started, [pool_uri, *model_inputs], metrics, step=step))
    return stage_summary(m, skipped=False)
