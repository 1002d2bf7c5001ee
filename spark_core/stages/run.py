"""The run record (run.json and its config), iteration 0 and closing an iteration (LATEST)."""

from __future__ import annotations

import logging
import time
from typing import Any

from ..config import SparkConfig, build_config
from ..layout import CHECKPOINT, eval_stage
from ..store import Store
from .common import StageError, eval_due, manifest_extra, require_done, stage_summary
from .lifecycle import Workspace, workspace
from .report import forget_record

log = logging.getLogger(__name__)


def run_config(store: Store, run_id: str) -> SparkConfig:
    """The config a run was created with (run.json), pointed at `store`."""
    record = store.read_run(run_id)
    if record is None:
        raise StageError(
            f"run {run_id!r} does not exist in {store.uri} (no {store.run_uri(run_id)}/run.json): give a preset "
            "or a config to create it, or the store it lives in"
        )
    cfg = build_config(record["config"], origin=f"run {run_id} run.json")
    cfg.store.uri = store.uri
    return cfg


def check_run_config(store: Store, run_id: str, cfg: SparkConfig) -> None:
    """Refuse to continue a run with a config that would change its results."""
    record = store.read_run(run_id)
    if record is not None and record.get("config_hash") != cfg.config_hash():
        _check_same_schedule(run_id, record, cfg)
        raise StageError(
            f"run {run_id!r} was created with a different config (hash {record.get('config_hash')} != "
            f"{cfg.config_hash()}). To continue it, leave out preset/config/overrides (its run.json is used; "
            f"only results-neutral fields such as `iterations` may change); to try this config, use a new run "
            f"id, or delete the old run first with `spark rm {store.run_uri(run_id)}`"
        )


def _check_same_schedule(run_id: str, record: dict[str, Any], cfg: SparkConfig) -> None:
    """A clearer refusal when what differs is the LR schedule length (e.g. another --iterations)."""
    try:
        stored = build_config(record["config"], origin=f"run {run_id} run.json").planned_optimizer_steps()
    except Exception:  # noqa: BLE001 - an unreadable record gets the generic message
        return
    if stored != cfg.planned_optimizer_steps():
        raise StageError(
            f"run {run_id!r} was created with an LR schedule of {stored} optimizer steps; this config plans "
            f"{cfg.planned_optimizer_steps()} (iterations={cfg.iterations}). Resuming must not change the "
            f"schedule: resume with the run id alone (its run.json keeps the schedule, --iterations may "
            f"extend it), set train.total_steps={stored}, or start a new run id"
        )


def init_run(cfg: SparkConfig, store: Store, run_id: str, ws: Workspace | None = None) -> dict[str, Any]:
    """Iteration 0: write run.json and the initial model as `iter=0000/checkpoint` (the KL reference)."""
    ws = ws or workspace()
    check_run_config(store, run_id, cfg)
    if store.read_run(run_id) is None:
        if (problem := cfg.pool_balance_problem()) is not None:
            log.warning("run %s: %s", run_id, problem)
        store.write_run(run_id, cfg)
    uri = store.stage_uri(run_id, 0, CHECKPOINT)
    if (m := store.manifest_or_none(uri)) is not None:
        return stage_summary(m, skipped=True)
    started = time.time()
    from ..initial_model import load_initial_model
    from ..models import resolve_device

    ws.reset()
    ws.model, ws.tokenizer = load_initial_model(cfg, device=resolve_device(cfg.device))
    if cfg.model.lora is not None:
        from ..lora import apply_lora

        ws.model = apply_lora(ws.model, cfg.model.lora)  # adapters start as an exact no-op
    n_params = sum(p.numel() for p in ws.model.parameters())
    extra = manifest_extra(cfg, run_id, 0, CHECKPOINT, started, inputs=[f"model.source={cfg.model.source}"],
                   metrics={"parameters": n_params})
    return stage_summary(ws.save_checkpoint(cfg, store, uri, extra), skipped=False)


def checkpoint_before(store: Store, run_id: str, iteration: int) -> str:
    if iteration < 1:
        raise StageError(f"training iterations start at 1, got {iteration}")
    return store.stage_uri(run_id, iteration - 1, CHECKPOINT)


def finish_iteration(cfg: SparkConfig, store: Store, run_id: str, iteration: int) -> dict[str, Any]:
    """Check the iteration is complete, drop its intermediate checkpoints and the checkpoints retention
    lets go (``checkpoint_schedule``), and advance LATEST."""
    from ..checkpoint_schedule import intermediate_checkpoints, retired_checkpoints

    ckpt = store.stage_uri(run_id, iteration, CHECKPOINT)
    require_done(store, ckpt, f"iteration {iteration}'s checkpoint")
    if eval_due(cfg, iteration):
        for b in cfg.eval.benchmarks:
            require_done(store, store.stage_uri(run_id, iteration, eval_stage(b.name)), f"evaluation {b.name}")
    if not cfg.store.keep_policy_checkpoints:  # the iteration's checkpoint holds everything they did
        intermediate = intermediate_checkpoints(cfg, store, run_id, iteration)
        for where, uri in intermediate:
            where.delete(uri)
        if any(where is store for where, _ in intermediate):
            forget_record(store, run_id, iteration)  # its published stage list named them
    latest = store.latest(run_id)
    if latest is None or iteration > latest:
        store.set_latest(run_id, iteration)
    retired = retired_checkpoints(cfg, store, run_id, max(iteration, latest or 0))
    for it, uri in retired:
        store.delete(uri)
        forget_record(store, run_id, it)  # the next publish rebuilds it without the checkpoint
    return {"iteration": iteration, "latest": max(iteration, latest or 0), "checkpoint": ckpt,
            "checkpoints_deleted": len(retired)}
