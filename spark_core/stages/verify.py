"""Verification stages of both phases: rule-based rewards against the known labels."""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import pandas as pd
import pyarrow as pa

from .. import schemas
from ..config import SparkConfig
from ..layout import REWARD_SAMPLES, REWARD_VERIFIED, SAMPLES, VERIFIED, step_stage
from ..store import Store
from .common import manifest_extra, mean, recorded, stage_input, stage_summary

log = logging.getLogger(__name__)


def _group_stats(df: pd.DataFrame) -> dict[str, Any]:
    """Share of GRPO groups that carry signal (mixed) vs. all-correct / all-wrong."""
    if df.empty:
        return {"groups": 0, "groups_mixed": 0, "groups_all_correct": 0, "groups_all_wrong": 0}
    per = df.groupby("question_id")["reward"].agg(["min", "max"])
    return {
        "groups": int(len(per)),
        "groups_mixed": int(((per["min"] < 0.5) & (per["max"] > 0.5)).sum()),
        "groups_all_correct": int((per["min"] > 0.5).sum()),
        "groups_all_wrong": int((per["max"] < 0.5).sum()),
    }


def _verify_rows(table: pa.Table, modes: list[str]) -> pa.Table:
    from ..verify_pool import verify_batch

    results = verify_batch(
        table.column("completion").to_pylist(), table.column("label").to_pylist(), modes=modes
    )
    return (
        table.append_column("answer", pa.array([r.answer for r in results], pa.string()))
        .append_column("reward", pa.array([r.reward for r in results], pa.float32()))
        .append_column("verify_status", pa.array([r.status for r in results], pa.string()))
    )


def _reward_metrics(table: pa.Table) -> dict[str, Any]:
    df = table.select(["question_id", "reward", "verify_status"]).to_pandas()
    status = df["verify_status"].value_counts().to_dict()
    return {
        "mean_reward": mean(df["reward"]),
        "status": {str(k): int(v) for k, v in status.items()},
        **_group_stats(df),
    }


def _reward_diagnostics(iteration: int, verified: pa.Table) -> dict[str, Any]:
    """Parse rates, zero-advantage share, Yes-share (spark_core.diagnostics); warns when no signal."""
    from ..diagnostics import no_signal_warning, reward_phase_diagnostics

    cols = ["question_id", "kind", "label", "completion", "answer", "reward"]
    diag = reward_phase_diagnostics(verified.select(cols).to_pandas())
    if (warning := no_signal_warning(iteration, diag)) is not None:
        log.warning("%s", warning)
    return diag


def _verify(cfg: SparkConfig, store: Store, run_id: str, iteration: int, step: int, *, src_stage: str, what: str,
            out_stage: str, schema: pa.Schema, modes: Callable[[pa.Table], list[str]],
            by_kind: bool = False) -> dict[str, Any]:
    """Shared body of both verification stages: rewards for `src_stage`'s rows -> `out_stage` (RL step `step`)."""
    src_stage, out_stage = (step_stage(s, step, cfg.steps_per_iteration) for s in (src_stage, out_stage))
    out = store.stage_uri(run_id, iteration, out_stage)
    if (done := recorded(store, out)) is not None:
        return done
    started = time.time()
    src = stage_input(store, run_id, iteration, src_stage, what)
    samples = store.read_table(src)
    verified = schemas.conform(_verify_rows(samples, modes(samples)), schema)  # keeps `images`
    metrics = _reward_metrics(verified)
    if by_kind:  # judgment and reflection items: the mean reward per item kind too
        df = verified.select(["kind", "reward"]).to_pandas()
        metrics["mean_reward_by_kind"] = {str(k): float(v) for k, v in df.groupby("kind")["reward"].mean().items()}
        metrics.update(_reward_diagnostics(iteration, verified))
    m = store.write_table(out, verified, manifest_extra(cfg, run_id, iteration, out_stage, started, [src], metrics,
                                                        step=step))
    return stage_summary(m, skipped=False)


def verify_policy(cfg: SparkConfig, store: Store, run_id: str, iteration: int, *, step: int = 1) -> dict[str, Any]:
    """Rule-based rewards for the policy rollouts (last \\boxed{} vs. the label) -> `verified`."""
    return _verify(cfg, store, run_id, iteration, step, src_stage=SAMPLES, what="samples", out_stage=VERIFIED,
                   schema=schemas.VERIFIED, modes=lambda samples: ["math"] * samples.num_rows)


def verify_reward(cfg: SparkConfig, store: Store, run_id: str, iteration: int, *, step: int = 1) -> dict[str, Any]:
    """Judgments checked letter-exact, reflections by the math verifier -> `reward_verified`."""
    from ..reward_data import verify_mode

    return _verify(cfg, store, run_id, iteration, step, src_stage=REWARD_SAMPLES, what="reward samples",
                   out_stage=REWARD_VERIFIED, schema=schemas.REWARD_VERIFIED,
                   modes=lambda samples: [verify_mode(k) for k in samples.column("kind").to_pylist()], by_kind=True)
