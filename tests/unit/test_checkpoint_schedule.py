"""The checkpoint schedule and the per-step layout without a model: retention (keep last K, keep every
M-th, never iteration 0 nor the newest), per-step stage names, reading the steps of a stage as one table,
and the config facts steps_per_iteration changes (schedule length, hash)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pytest

from spark_core import layout, schemas
from spark_core.checkpoint_schedule import intermediate_checkpoints, kept_iterations, retired_checkpoints
from spark_core.config import SparkConfig, load_config
from spark_core.vision_config import drop_unused_vision_fields
from spark_core.store import Store

RUN = "sched"


def _checkpoint(store: Store, it: int, stage: str = layout.CHECKPOINT) -> str:
    uri = store.stage_uri(RUN, it, stage)
    with store.checkpoint_writer(uri, {"stage": stage}) as folder:
        (folder / "model.safetensors").write_bytes(b"w" * 8)
    return uri


def test_kept_iterations() -> None:
    assert kept_iterations(5, None, None) == {0, 1, 2, 3, 4, 5}  # default: keep everything
    assert kept_iterations(9, 2, None) == {0, 8, 9}
    assert kept_iterations(9, 2, 4) == {0, 4, 8, 9}
    assert kept_iterations(9, 1, None) == {0, 9}  # K=1: the newest (what a resume starts from) and the reference
    assert kept_iterations(1, 3, None) == {0, 1}


def test_finish_iteration_retires_old_checkpoints_only(tmp_path: Path) -> None:
    from spark_core.stages import finish_iteration

    store = Store(str(tmp_path))
    cfg = SparkConfig(iterations=10)
    cfg.eval.every = 0
    cfg.store.keep_last, cfg.store.keep_every = 2, 3
    from spark_core.stages import report

    for it in range(0, 8):
        _checkpoint(store, it)
        report.save_record(store, RUN, it, report.iteration_record(cfg, store, RUN, it))  # as publish does
        out = finish_iteration(cfg, store, RUN, it)
        assert store.latest(RUN) == it
        kept = {i for i in range(it + 1) if store.is_done(store.stage_uri(RUN, i, layout.CHECKPOINT))}
        assert kept == kept_iterations(it, 2, 3), it
        assert 0 in kept and it in kept  # the KL reference and the resume point never go
    assert out["checkpoints_deleted"] == 1  # iteration 5 (not a multiple of 3) left the last two at 7
    assert {i for i in range(8) if store.is_done(store.stage_uri(RUN, i, layout.CHECKPOINT))} == {0, 3, 6, 7}
    # The published records of the iterations that lost their checkpoint are dropped (the run index would
    # still list it); the next publish rebuilds them from the manifests.
    assert {i for i in range(8) if report.load_record(store, RUN, i) is not None} == {0, 3, 6, 7}


def test_retention_off_deletes_nothing(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    for it in range(4):
        _checkpoint(store, it)
    assert retired_checkpoints(SparkConfig(), store, RUN, 3) == []


def test_intermediate_checkpoints_are_dropped_once_the_iteration_is_complete(tmp_path: Path) -> None:
    from spark_core.stages import finish_iteration

    store = Store(str(tmp_path))
    cfg = SparkConfig(steps_per_iteration=2)
    cfg.eval.every = 0
    cfg.store.intermediate_checkpoints = True
    inter = [_checkpoint(store, 1, layout.step_stage(layout.POLICY_CHECKPOINT, s, 2)) for s in (1, 2)]
    inter.append(_checkpoint(store, 1, layout.step_stage(layout.STEP_CHECKPOINT, 1, 2)))
    assert sorted(u for _, u in intermediate_checkpoints(cfg, store, RUN, 1)) == sorted(inter)
    _checkpoint(store, 1)
    from spark_core.stages import report

    report.save_record(store, RUN, 1, report.iteration_record(cfg, store, RUN, 1))
    assert len(report.load_record(store, RUN, 1)["stages"]) == 4
    finish_iteration(cfg, store, RUN, 1)
    assert not any(store.is_done(u) for u in inter) and store.is_done(store.stage_uri(RUN, 1, layout.CHECKPOINT))
    assert report.load_record(store, RUN, 1) is None  # it listed the dropped checkpoints


def test_step_stage_names() -> None:
    assert layout.step_stage(layout.SAMPLES, 1, 1) == "samples"  # one step: the layout of runs without steps
    assert layout.step_stage(layout.TRAIN_POLICY, 2, 3) == "train/phase=policy/rl_step=02"
    with pytest.raises(ValueError):
        layout.step_stage(layout.SAMPLES, 4, 3)
    assert layout.stage_glob("/r", layout.VERIFIED, 3) == "/r/iter=*/verified/rl_step=*/*.parquet"
    assert layout.stage_glob("/r", layout.VERIFIED) == "/r/iter=*/verified/*.parquet"
    assert layout.hive_partitions("/r/iter=0001/train/phase=policy/rl_step=02") == {
        "iter": "0001", "phase": "policy", "rl_step": "02"}


def _train_rows(step: int) -> pa.Table:
    row = {name: 0 for name in schemas.TRAIN.names}
    row.update(step=step, phase="policy", loss=0.5 * step)
    return pa.Table.from_pylist([row], schema=schemas.TRAIN)


def test_the_steps_of_a_stage_read_as_one_table(tmp_path: Path) -> None:
    """`iter=0001/train/phase=policy` with three step partitions reads as one table with an rl_step
    column (the TRAIN table's own `step`, the optimizer step, is kept apart); a missing step is skipped."""
    store = Store(str(tmp_path))
    for it, steps in ((1, (1, 2, 3)), (2, (1, 3))):
        for s in steps:
            store.write_table(store.stage_uri(RUN, it, layout.step_stage(layout.TRAIN_POLICY, s, 3)), _train_rows(10 * it + s))
    table = store.read_table(store.stage_uri(RUN, 1, layout.TRAIN_POLICY))
    assert table.column("rl_step").to_pylist() == [1, 2, 3] and table.column("step").to_pylist() == [11, 12, 13]
    assert table.column("phase").to_pylist() == ["policy"] * 3
    assert store.read_table(store.stage_uri(RUN, 1, layout.TRAIN_POLICY), columns=["rl_step", "loss"]).column_names == [
        "rl_step", "loss"]
    both = store.read_stage_across_iterations(RUN, layout.TRAIN_POLICY, columns=["step", "rl_step"])
    assert list(zip(both.column("iteration").to_pylist(), both.column("rl_step").to_pylist())) == [
        (1, 1), (1, 2), (1, 3), (2, 1), (2, 3)]


def test_duckdb_reads_the_step_partitions(tmp_path: Path) -> None:
    duckdb = pytest.importorskip("duckdb")
    store = Store(str(tmp_path))
    for s in (1, 2):
        store.write_table(store.stage_uri(RUN, 1, layout.step_stage(layout.TRAIN_POLICY, s, 2)), _train_rows(s))
    glob = layout.stage_glob(store.run_uri(RUN), layout.TRAIN_POLICY, steps=2)
    df = duckdb.sql(f"SELECT iter, phase, rl_step, step FROM read_parquet('{glob}', hive_partitioning=true, "
                    "hive_types={'iter': 'INTEGER', 'rl_step': 'INTEGER'}) ORDER BY rl_step").df()
    assert df.values.tolist() == [[1, "policy", 1, 1], [1, "policy", 2, 2]]


def test_steps_per_iteration_scales_the_schedule_and_enters_the_hash() -> None:
    one = load_config(preset="tiny")
    three = load_config(preset="tiny", overrides={"steps_per_iteration": 3})
    assert three.planned_optimizer_steps() == 3 * one.planned_optimizer_steps()
    assert three.config_hash() != one.config_hash()
    # At its default the field stays out of the hash: runs created before it existed resume unchanged.
    payload = drop_unused_vision_fields(
        one.model_dump(mode="json", exclude={"store", "preset", "iterations", "steps_per_iteration"}))
    payload["train"]["total_steps"] = one.planned_optimizer_steps()
    del payload["sampling"]["vllm_sleep_mode"]  # how the engine is kept is no part of the results either
    del payload["reward_data"]["balance_pointwise_labels"]  # added later: out of the hash at its default
    balanced = load_config(preset="tiny", overrides={"reward_data": {"balance_pointwise_labels": True}})
    assert balanced.config_hash() != one.config_hash()
    assert load_config(preset="tiny", overrides={"sampling": {"vllm_sleep_mode": True}}).config_hash() == one.config_hash()
    assert one.config_hash() == hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def test_the_7b_preset_takes_8_optimizer_steps_of_64_per_phase() -> None:
    from spark_core.trainer import Trainer

    cfg = load_config(preset="qwen2.5-7b")
    policy = cfg.sampling.questions_per_iteration * cfg.sampling.n
    reward = cfg.reward_data.reward_batch_size * cfg.reward_n
    assert policy == reward == 512 and cfg.train.mini_batch_size == 64 and cfg.train.epochs == 1
    # the trainer's own plan (the one train_phase follows): 8 mini-batches of 64
    trainer = SimpleNamespace(cfg=cfg.train)
    trainer._order = lambda n, epoch, start: Trainer._order(trainer, n, epoch, start)
    plan = Trainer._plan(trainer, policy, 0)
    assert [len(mb) for mb in plan] == [64] * 8 and sorted(i for mb in plan for i in mb) == list(range(512))
    assert cfg.planned_optimizer_steps() == cfg.iterations * cfg.steps_per_iteration * 16
