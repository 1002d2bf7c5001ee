"""RL steps inside an iteration: which updates come before a point of the loop, and snapshot + replay.

An iteration holds ``steps_per_iteration`` RL steps and writes ONE checkpoint, at its end. Inside it the
live workspace carries the weights from update to update; the store holds every step's tables, among
them the rows each update trained on (``verified`` / ``reward_verified``) and its TRAIN table, which is
the update's commit. A process that starts inside an iteration (a resume after a crash, or any stage
run in a fresh process) reaches the weights a stage needs by *snapshot + replay*: it loads the newest
stored snapshot (the iteration's start checkpoint, or an intermediate checkpoint where
``store.intermediate_checkpoints`` wrote one) and re-applies the committed updates after it, from their
stored rows with their own seeds. Nothing is sampled again; on a deterministic backend (CPU, fixed seeds)
the replayed weights equal the uninterrupted run's bit for bit (tests/unit/test_steps_replay.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from ..checkpoint_schedule import snapshot_store
from ..config import SparkConfig
from ..layout import (
    CHECKPOINT, PHASES, POLICY_CHECKPOINT, REWARD_POOL, REWARD_VERIFIED, STEP_CHECKPOINT, TRAIN_POLICY, TRAIN_REWARD,
    VERIFIED, step_stage,
)
from ..store import Store
from .common import StageError, require_done, stage_seed
from .lifecycle import Workspace

log = logging.getLogger(__name__)


def step_uri(cfg: SparkConfig, store: Store, run_id: str, iteration: int, stage: str, step: int) -> str:
    """Where RL step `step` of `iteration` keeps a per-step stage (``layout.step_stage``)."""
    return store.stage_uri(run_id, iteration, step_stage(stage, step, cfg.steps_per_iteration))


def reward_phase_follows(cfg: SparkConfig, store: Store, run_id: str, iteration: int, step: int = 1) -> bool:
    """True when RL step `step` has a reward phase: enabled and its pool popped a batch."""
    if not cfg.reward_data.enabled:
        return False
    m = store.manifest_or_none(step_uri(cfg, store, run_id, iteration, REWARD_POOL, step))
    if m is None:
        raise StageError(f"iteration {iteration} step {step}: build_reward_data has not run (no reward_pool)")
    return int(m.get("popped", 0)) > 0


@dataclass(frozen=True)
class Update:
    """One training phase of one RL step: what it trains on, where it commits, where its weights go."""

    step: int
    phase: str
    table: str  # the TRAIN table: its manifest commits the update
    rows: str  # the verified rollouts it trains on
    seed_stage: str  # stage name its torch seed derives from
    snapshot: str | None  # a checkpoint of the weights after it, or None (they stay live)
    snapshot_store: Store | None = None  # where `snapshot` lives (the object store or a node-local one)


def update(cfg: SparkConfig, store: Store, run_id: str, iteration: int, step: int, phase: str) -> Update:
    """The update `phase` of RL step `step`; its snapshot is the iteration's checkpoint when it is the
    last update of the iteration, an intermediate checkpoint where ``snapshot_store`` says, else None."""
    last_step = step == cfg.steps_per_iteration
    if phase == "policy":
        final = last_step and not reward_phase_follows(cfg, store, run_id, iteration, step)
        table, rows = TRAIN_POLICY, VERIFIED
        between = POLICY_CHECKPOINT if reward_phase_follows(cfg, store, run_id, iteration, step) else STEP_CHECKPOINT
    else:
        final, table, rows, between = last_step, TRAIN_REWARD, REWARD_VERIFIED, STEP_CHECKPOINT
    where = store if final else snapshot_store(cfg, store)
    if final:
        snapshot = store.stage_uri(run_id, iteration, CHECKPOINT)
    else:
        snapshot = step_uri(cfg, where, run_id, iteration, between, step) if where is not None else None
    return Update(step, phase, step_uri(cfg, store, run_id, iteration, table, step),
                  step_uri(cfg, store, run_id, iteration, rows, step),
                  step_stage(table, step, cfg.steps_per_iteration), snapshot, where)


def updates_before(cfg: SparkConfig, store: Store, run_id: str, iteration: int, step: int,
                   phase: str) -> list[Update]:
    """Every update of the iteration that precedes `phase` of RL step `step`, in order."""
    out = []
    for s in range(1, step + 1):
        for ph in PHASES:
            if (s, ph) == (step, phase):
                return out
            if ph == "reward" and not reward_phase_follows(cfg, store, run_id, iteration, s):
                continue
            out.append(update(cfg, store, run_id, iteration, s, ph))
    return out


def apply_update(cfg: SparkConfig, store: Store, run_id: str, iteration: int, ws: Workspace,
                 u: Update) -> list[dict[str, Any]]:
    """Train update `u` on the live weights (seeded by its stage); return its TRAIN rows.

    Under several ranks every rank calls this (the trainer's steps are collective)."""
    import torch

    require_done(store, u.rows, f"{u.phase}-phase verified rollouts of step {u.step}")
    ws.before_training(cfg)  # an out-of-process engine sleeps (kept) or stops while the trainer runs
    trainer = ws.get_trainer(cfg, store, run_id)
    df = store.read_table(u.rows).to_pandas()
    torch.manual_seed(stage_seed(cfg.seed, iteration, u.seed_stage))
    with ws.lock:
        key, ws.key = ws.key, None  # the weights are changing: they match nothing until the update is done
        try:
            rows = trainer.train_phase(df, u.phase)  # type: ignore[arg-type]
        except BaseException:
            ws.reset()
            raise
        ws.key, ws.applied = key, (*ws.applied, u.table)
        ws.weights_changed(cfg)
    return rows


def reach(cfg: SparkConfig, store: Store, run_id: str, iteration: int, step: int, phase: str,
          ws: Workspace) -> list[str]:
    """Make the live weights those before `phase` of RL step `step`; return what they came from (the
    snapshot loaded and the TRAIN tables of the updates replayed on it), for the manifests' inputs.

    Free when the workspace is already there (the usual case: one process runs the whole loop)."""
    from .run import checkpoint_before

    todo = updates_before(cfg, store, run_id, iteration, step, phase)
    base, base_store, start = checkpoint_before(store, run_id, iteration), store, 0
    for k, u in enumerate(todo):
        if u.snapshot is not None and u.snapshot_store is not None and u.snapshot_store.is_done(u.snapshot):
            base, base_store, start = u.snapshot, u.snapshot_store, k + 1
    todo = todo[start:]
    wanted = tuple(u.table for u in todo)
    with ws.lock:
        if not (ws.holds(cfg, base_store, base) and wanted[: len(ws.applied)] == ws.applied):
            ws.reset()
            ws.use(cfg, base_store, base)
        for u in todo[len(ws.applied):]:
            # Only committed updates are replayed: a step whose update is not stored has not happened.
            require_done(store, u.table, f"the committed update {u.phase} of step {u.step} (to replay it)")
            log.info("replaying %s on %s", u.table, base)
            rows = apply_update(cfg, store, run_id, iteration, ws, u)
            stored = store.read_table(u.table).to_pylist()
            if [r["loss"] for r in rows] != [r["loss"] for r in stored]:
                # Not an error: a GPU kernel need not be bit-deterministic; CPU runs replay exactly.
                log.warning("replayed %s: losses differ from the stored ones (non-deterministic backend?)", u.table)
    return [base, *wanted]
