"""Recycling verified policy rollouts into judgment and reflection items, and the FIFO pool step."""

from __future__ import annotations

import time
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from .. import schemas
from ..config import SparkConfig
from ..layout import REWARD_ITEMS, REWARD_POOL, VERIFIED, step_stage
from ..store import Store
from .common import StageError, manifest_extra, recorded, stage_input, stage_seed, stage_summary
from .lifecycle import Workspace, workspace
from .replay import reach, reward_phase_follows, step_uri

__all__ = ["build_reward_data", "reward_phase_follows"]


def _previous_pool_uri(cfg: SparkConfig, store: Store, run_id: str, iteration: int, step: int) -> str | None:
    """The pool of the RL step before (step - 1 of this iteration, or the last step of the previous one)."""
    if step > 1:
        return step_uri(cfg, store, run_id, iteration, REWARD_POOL, step - 1)
    if iteration <= 1:
        return None
    return step_uri(cfg, store, run_id, iteration - 1, REWARD_POOL, cfg.steps_per_iteration)


def _previous_pool(store: Store, uri: str | None, iteration: int) -> pa.Table | None:
    """Items the previous RL step's pool kept (not popped), in FIFO order."""
    if uri is None:
        return None
    if not store.is_done(uri):
        raise StageError(f"iteration {iteration} needs the previous reward pool, but {uri} is not complete")
    pool = store.read_table(uri)
    return schemas.conform(pool.filter(pc.invert(pool.column("popped"))), schemas.REWARD_ITEMS)


def build_reward_data(cfg: SparkConfig, store: Store, run_id: str, iteration: int, ws: Workspace | None = None,
                      *, step: int = 1) -> dict[str, Any]:
    """Judgment + reflection items from the verified groups (`reward_items`) and the FIFO pool step.

    `reward_pool` holds the pool after this RL step's items were appended, with a `popped` column:
    the popped rows are the reward phase's batch for this step, the others carry over.
    """
    from ..demonstrations import role_prompts
    from ..reward_data import build_reward_items, update_pool

    items_stage, pool_stage = (step_stage(s, step, cfg.steps_per_iteration) for s in (REWARD_ITEMS, REWARD_POOL))
    items_uri = store.stage_uri(run_id, iteration, items_stage)
    pool_uri = store.stage_uri(run_id, iteration, pool_stage)
    if (done := recorded(store, pool_uri)) is not None:
        return done
    started = time.time()
    src = stage_input(store, run_id, iteration, step_stage(VERIFIED, step, cfg.steps_per_iteration),
                      "verified rollouts")
    if store.is_done(items_uri):
        items = store.read_table(items_uri)
    else:
        # Prompts are rendered with the policy's tokenizer (the chat template of the model that answers);
        # the workspace goes where the policy update of this step starts anyway.
        ws = ws or workspace()
        reach(cfg, store, run_id, iteration, step, "policy", ws)
        verified = store.read_table(src).to_pandas()
        items = build_reward_items(
            verified, cfg.reward_data, ws.format_prompt(cfg), iteration,
            stage_seed(cfg.seed, iteration, items_stage), roles=role_prompts(cfg),
        )
        if cfg.steps_per_iteration > 1:  # item ids stay unique across the steps of one iteration
            ids = [f"{i.split('-', 1)[0]}s{step:02d}-{i.split('-', 1)[1]}" for i in items.column("item_id").to_pylist()]
            items = items.set_column(items.schema.get_field_index("item_id"), "item_id", pa.array(ids, pa.string()))
        kinds = pd.Series(items.column("kind").to_pylist(), dtype="object").value_counts().to_dict()
        store.write_table(items_uri, items, manifest_extra(
            cfg, run_id, iteration, items_stage, started, [src], {"items": items.num_rows, "kinds": kinds},
            step=step,
        ))
    rd = cfg.reward_data
    prev = _previous_pool_uri(cfg, store, run_id, iteration, step)
    popped, remaining = update_pool(
        _previous_pool(store, prev, iteration), items, rd.reward_batch_size, rd.max_pool_size
    )
    pool = pa.concat_tables([
        popped.append_column("popped", pa.array([True] * popped.num_rows, pa.bool_())),
        remaining.append_column("popped", pa.array([False] * remaining.num_rows, pa.bool_())),
    ])
    metrics = {"new_items": items.num_rows, "pool_size": remaining.num_rows, "popped": popped.num_rows}
    m = store.write_table(pool_uri, pool, manifest_extra(
        cfg, run_id, iteration, pool_stage, started, [items_uri] + ([prev] if prev else []), metrics,
        popped=popped.num_rows, popped_item_ids=popped.column("item_id").to_pylist(), step=step,
    ))
    return stage_summary(m, skipped=False)
