"""Balanced reward pool in every preset, token budgets, and an LR schedule a resumed run cannot change."""

from __future__ import annotations

from pathlib import Path

import pytest

from spark_core.config import PRESETS, load_config
from spark_core.stages import StageError, run_config
from spark_core.store import Store
from spark_core.trainer import planned_optimizer_steps


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_keeps_what_it_pops(preset: str) -> None:
    cfg = load_config(preset=preset)
    rd = cfg.reward_data
    assert rd.max_judgment_items + rd.max_reflection_items == rd.reward_batch_size
    assert cfg.pool_balance_problem() is None


def test_pool_imbalance_is_reported() -> None:
    cfg = load_config(preset="smollm2-arith", overrides={"reward_data": {"max_judgment_items": 6}})
    problem = cfg.pool_balance_problem()
    assert problem is not None and "keeps up to 9" in problem and "reward_batch_size=6" in problem
    # Kinds that are not built are not kept; an RLVR-only run has no pool to balance.
    only = load_config(preset="smollm2-arith", overrides={"reward_data": {"reflection": False, "max_judgment_items": 6}})
    assert only.pool_balance_problem() is None
    off = load_config(preset="smollm2-arith", overrides={"reward_data": {"enabled": False, "max_judgment_items": 9}})
    assert off.pool_balance_problem() is None


def test_token_budgets_fall_back_and_are_separate() -> None:
    tiny = load_config(preset="tiny")
    assert tiny.reward_judge_max_new_tokens == tiny.reward_reflection_max_new_tokens == tiny.reward_max_new_tokens
    assert tiny.eval_judge_max_new_tokens == tiny.eval_revision_max_new_tokens == tiny.eval_max_new_tokens
    cfg = load_config(preset="tiny", overrides={
        "reward_data": {"judge_max_new_tokens": 21, "reflection_max_new_tokens": 22},
        "eval": {"judge_max_new_tokens": 23, "revision_max_new_tokens": 24},
    })
    assert cfg.reward_kind_max_new_tokens("pointwise") == cfg.reward_kind_max_new_tokens("pairwise") == 21
    assert cfg.reward_kind_max_new_tokens("reflection") == 22
    assert (cfg.eval_judge_max_new_tokens, cfg.eval_revision_max_new_tokens) == (23, 24)
    smol = load_config(preset="smollm2-arith")
    assert smol.reward_judge_max_new_tokens >= 32 and smol.eval_judge_max_new_tokens >= 32
    assert smol.reward_data.demonstrations > 0
    assert load_config(preset="qwen2.5-7b").reward_data.demonstrations == 0


def test_reward_phase_samples_each_kind_with_its_budget(monkeypatch) -> None:
    from spark_core.stages import sample as stages

    calls = []
    monkeypatch.setattr(stages, "_sample", lambda cfg, ws, prompts, n, budget, seed: (
        calls.append((list(prompts), budget)) or [[f"{p}@{budget}"] for p in prompts]))
    cfg = load_config(preset="tiny")
    outs = stages._sample_per_budget(cfg, None, ["j1", "r1", "j2"], 2, [40, 60, 40], 0)
    assert outs == [["j1@40"], ["r1@60"], ["j2@40"]]
    assert calls == [(["j1", "j2"], 40), (["r1"], 60)]


def test_iterations_enter_the_hash_through_the_schedule() -> None:
    three = load_config(preset="smollm2-arith")
    five = load_config(preset="smollm2-arith", overrides={"iterations": 5})
    assert planned_optimizer_steps(three) != planned_optimizer_steps(five)
    assert three.config_hash() != five.config_hash()  # different LR schedules
    pinned = three.with_pinned_schedule()
    assert pinned.train.total_steps == planned_optimizer_steps(three) and pinned.config_hash() == three.config_hash()
    longer = pinned.model_copy(deep=True)
    longer.iterations = 5  # extending a pinned run keeps its schedule, and its hash
    assert planned_optimizer_steps(longer) == planned_optimizer_steps(three)
    assert longer.config_hash() == three.config_hash()


def test_a_resumed_run_keeps_its_schedule_or_is_refused(tmp_path: Path) -> None:
    from flows.common import resolve

    store = Store(str(tmp_path))
    cfg = load_config(preset="tiny")
    created, _, rid = resolve(cfg, str(tmp_path), "r1", iterations=2)
    assert created.train.total_steps == planned_optimizer_steps(load_config(preset="tiny", overrides={"iterations": 2}))
    # Only run.json matters here: write it as init_run does (without building a model).
    store.write_run(rid, created)
    # Resuming from run.json with more iterations: same schedule.
    resumed, _, _ = resolve(None, str(tmp_path), rid, iterations=6)
    assert resumed.iterations == 6 and resumed.train.total_steps == created.train.total_steps
    assert run_config(store, rid).train.total_steps == created.train.total_steps
    # Same config again: fine; the same config asking for another iteration count: refused, clearly.
    resolve(cfg, str(tmp_path), rid, iterations=2)
    with pytest.raises(StageError, match=r"LR schedule of \d+ optimizer steps.*iterations=6"):
        resolve(cfg, str(tmp_path), rid, iterations=6)
