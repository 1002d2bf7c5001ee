"""What every stage shares: its error type, seeds, the manifest extras it records and the summary it returns."""

from __future__ import annotations

import hashlib
import time
from datetime import datetime, timezone
from typing import Any

import pandas as pd

from ..config import SparkConfig
from ..store import Store


class StageError(RuntimeError):
    """A stage cannot run as asked (missing input, config mismatch); the message says what to do."""


def stage_seed(seed: int, iteration: int, stage: str) -> int:
    """A seed for one stage of one iteration, stable across processes and machines."""
    digest = hashlib.sha256(f"{seed}:{iteration}:{stage}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def eval_due(cfg: SparkConfig, iteration: int) -> bool:
    """Evaluate iteration 0 (baseline), every `eval.every`-th iteration, and the run's last one."""
    every = cfg.eval.every
    return every > 0 and (iteration % every == 0 or iteration == cfg.iterations)


def stage_summary(manifest: dict[str, Any], skipped: bool) -> dict[str, Any]:
    keys = ("stage", "uri", "rows", "seconds", "metrics", "reward_phase", "popped")
    out = {k: manifest[k] for k in keys if k in manifest}
    out["skipped"] = skipped
    return out


def manifest_extra(cfg: SparkConfig, run_id: str, iteration: int, stage: str, started: float,
           inputs: list[str], metrics: dict[str, Any] | None = None, **more: Any) -> dict[str, Any]:
    return {
        "stage": stage,
        "run_id": run_id,
        "iteration": iteration,
        "inputs": inputs,
        "config_hash": cfg.config_hash(),
        "seed": stage_seed(cfg.seed, iteration, stage),
        "started_at": datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.time() - started, 3),
        "metrics": metrics or {},
        **more,
    }


def require_done(store: Store, uri: str, what: str) -> None:
    if not store.is_done(uri):
        raise StageError(f"{what} is missing: {uri} has no _SUCCESS.json (run the earlier stage first)")


def mean(values: Any) -> float | None:
    s = pd.Series(values, dtype="float64").dropna()
    return float(s.mean()) if len(s) else None


def recorded(store: Store, uri: str) -> dict[str, Any] | None:
    """The summary a complete stage recorded (running it again does nothing), or None when it has not run."""
    m = store.manifest_or_none(uri)
    return None if m is None else stage_summary(m, skipped=True)


def stage_input(store: Store, run_id: str, iteration: int, stage: str, what: str) -> str:
    """The URI of an earlier stage's output that a stage reads; StageError naming `what` when incomplete."""
    uri = store.stage_uri(run_id, iteration, stage)
    require_done(store, uri, what)
    return uri
