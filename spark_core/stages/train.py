"""Training stages of both phases: GRPO with the one shared optimizer, then the TRAIN table (and the
iteration's checkpoint after its last update).

Rank-aware: launched on several ranks (``spark_core.distributed.launch``), every rank loads the model on
its own device, builds the trainer and trains its shard of every mini-batch; every rank takes part in
gathering the full weights and optimizer state (collective under FSDP); only rank 0 writes the
checkpoint, the TRAIN table and the manifests.
"""

from __future__ import annotations

import time
from typing import Any

import pandas as pd
import pyarrow as pa

from .. import schemas
from ..config import SparkConfig
from ..layout import iter_name
from ..store import Store
from .common import manifest_extra, mean, require_done, stage_summary
from .lifecycle import Workspace, workspace
from .replay import apply_update, reach, reward_phase_follows, update


def _train_metrics(rows: list[dict[str, Any]]) -> dict[str, Any]:
    df = pd.DataFrame(rows)
    if df.empty:
        return {"steps": 0}
    return {
        "steps": int(len(df)),
        "last_step": int(df["step"].max()),
        "mean_loss": mean(df["loss"]),
        "mean_kl": mean(df["kl"]),
        "mean_reward": mean(df["mean_reward"]),
        "lr": float(df["lr"].iloc[-1]),
    }


def train_phase_stage(cfg: SparkConfig, store: Store, run_id: str, iteration: int, step: int, phase: str,
                      ws: Workspace | None = None) -> dict[str, Any]:
    """Shared body of both training stages: GRPO on the phase's verified rows of RL step `step`, on the
    live weights before it (``replay.reach``), then its snapshot (if any) and its TRAIN table.

    The TRAIN table commits the update. Where the update has a store snapshot (the iteration's checkpoint
    after its last update; intermediate checkpoints under ``store.intermediate_checkpoints``) it is
    written first and carries the TRAIN rows in its manifest, so a crash between the two writes is
    repaired by copying the rows (the weights are never trained twice). Without one the weights stay in
    the live workspace, and a process that lost them replays the committed updates.

    Under several ranks every rank runs this whole function: all train, all take part in saving, rank 0
    alone writes; the barriers keep every rank on the same branch and the same number of collectives.
    """
    from .. import distributed

    ws = ws or workspace()
    ctx = distributed.current()
    u = update(cfg, store, run_id, iteration, step, phase)
    done = store.manifest_or_none(u.table)
    where = u.snapshot_store or store
    ck = where.manifest_or_none(u.snapshot) if u.snapshot is not None else None
    distributed.barrier()  # every rank has read the store before rank 0 changes it
    if done is not None:
        return stage_summary(done, skipped=True)
    started = time.time()
    require_done(store, u.rows, f"{phase}-phase verified rollouts")
    if ck is not None:
        rows, inputs = ck["train_rows"], list(ck.get("inputs") or [])
    else:
        inputs = [*reach(cfg, store, run_id, iteration, step, phase, ws), u.rows]
        rows = apply_update(cfg, store, run_id, iteration, ws, u)
        if u.snapshot is not None:
            ws.save_checkpoint(cfg, where, u.snapshot, manifest_extra(
                cfg, run_id, iteration, u.snapshot.rsplit(f"/{iter_name(iteration)}/", 1)[-1], started, inputs,
                {"global_step": ws.trainer.global_step}, train_rows=rows,
            ))
    if ctx.is_main:
        table = pa.Table.from_pylist(rows, schema=schemas.TRAIN)
        more = {"reward_phase": reward_phase_follows(cfg, store, run_id, iteration, step)} if phase == "policy" else {}
        store.write_table(u.table, table, manifest_extra(
            cfg, run_id, iteration, u.seed_stage, started, inputs, _train_metrics(rows),
            checkpoint=u.snapshot, step=step, **more,
        ))
    distributed.barrier()
    return stage_summary(store.manifest(u.table), skipped=False)


def train_policy(cfg: SparkConfig, store: Store, run_id: str, iteration: int, ws: Workspace | None = None,
                 *, step: int = 1) -> dict[str, Any]:
    """GRPO on the verified policy rollouts of RL step `step` -> `train/phase=policy`.

    Its weights are the iteration's `checkpoint` when it is the iteration's last update (last step, no
    reward phase follows), else they stay live for the reward phase (near on-policy, as in the reference).
    """
    return train_phase_stage(cfg, store, run_id, iteration, step, "policy", ws)


def train_reward(cfg: SparkConfig, store: Store, run_id: str, iteration: int, ws: Workspace | None = None,
                 *, step: int = 1) -> dict[str, Any]:
    """Second GRPO step (same optimizer) on the judged items of RL step `step` -> `train/phase=reward`
    (and the iteration's `checkpoint` after its last step)."""
    return train_phase_stage(cfg, store, run_id, iteration, step, "reward", ws)
