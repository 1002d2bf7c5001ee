"""Config loading: presets validate, unknown keys and bad values give one message naming the field."""

from __future__ import annotations

import pytest

from spark_core.config import (
    PRESETS,
    ConfigError,
    SparkConfig,
    build_config,
    load_config,
)
from spark_core.overrides import parse_override


@pytest.mark.parametrize("name", PRESETS)
def test_presets_validate(name: str) -> None:
    cfg = load_config(preset=name)
    assert isinstance(cfg, SparkConfig)
    assert cfg.preset == name
    assert cfg.sampling.n >= 2


def test_paper_defaults_match_spark_md() -> None:
    cfg = SparkConfig()
    assert cfg.sampling.n == 8 and cfg.sampling.questions_per_iteration == 64
    assert cfg.train.clip_eps == 0.2 and cfg.train.kl_coef == 0.001 and cfg.train.adv_eps == 1e-9
    assert cfg.train.betas == (0.9, 0.95) and cfg.train.grad_clip == 1.0
    assert cfg.reward_data.pointwise_prob_mixed == 0.3 and cfg.reward_data.pairwise_swap_prob == 0.5
    assert cfg.reward_data.max_judgment_items == 32 and cfg.reward_data.max_reflection_items == 32
    assert cfg.reward_data.reward_batch_size == 64 and cfg.reward_data.context_mode == "both"
    assert cfg.eval.max_rounds == 2


def test_unknown_key_names_the_field(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("preset: tiny\ntrain:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "train.lrr" in str(err.value) and "unknown key" in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_value_names_the_field() -> None:
    with pytest.raises(ConfigError) as err:
        build_config({"preset": "tiny", "sampling": {"n": 1}})
    assert "sampling.n" in str(err.value)
    with pytest.raises(ConfigError) as err:
        build_config({"reward_data": {"context_mode": "reasoning"}})
    assert "reward_data.context_mode" in str(err.value)


def test_unknown_preset_and_missing_file(tmp_path) -> None:
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config(preset="gpt-5")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_file_extends_preset_and_overrides_apply(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("preset: tiny\nsampling:\n  n: 6\n")
    cfg = load_config(path, overrides=parse_override("train.lr=2e-3"))
    assert cfg.sampling.n == 6
    assert cfg.train.lr == 2e-3
    assert cfg.model.source == "tiny"  # inherited from the preset


def test_pretrained_needs_a_path() -> None:
    with pytest.raises(ConfigError, match="name_or_path"):
        build_config({"model": {"source": "pretrained"}})


def test_config_hash_ignores_store_but_not_science() -> None:
    a = load_config(preset="tiny")
    b = load_config(preset="tiny", overrides={"store": {"uri": "s3://x/y"}})
    c = load_config(preset="tiny", overrides={"train": {"lr": 0.5}})
    assert a.config_hash() == b.config_hash() != c.config_hash()


def test_derived_sizes_default_to_sampling() -> None:
    cfg = load_config(preset="qwen2.5-7b")
    assert cfg.reward_n == cfg.sampling.n
    assert cfg.reward_max_new_tokens == cfg.sampling.max_new_tokens


def test_parse_override_rejects_garbage() -> None:
    with pytest.raises(ConfigError):
        parse_override("no-equals-sign")


def test_a_bare_preset_mapping_is_the_whole_preset() -> None:
    # Prefect validates a flow's `config` parameter straight into SparkConfig: {"preset": "tiny"}
    # must mean the tiny preset, not paper-size defaults labelled "tiny".
    cfg = SparkConfig.model_validate({"preset": "tiny", "sampling": {"n": 3}})
    assert cfg.model.source == "tiny" and cfg.sampling.questions_per_iteration == 8
    assert cfg.sampling.n == 3
    # a dumped config round-trips unchanged
    assert SparkConfig.model_validate(cfg.model_dump(mode="json")) == cfg


def test_vl_presets_carry_the_paper_recipe_and_the_tiny_vl_shape() -> None:
    cfg = load_config(preset="qwen2.5-vl-7b")
    assert cfg.model.name_or_path == "Qwen/Qwen2.5-VL-7B-Instruct" and cfg.data.image_column
    t = cfg.train
    assert (t.lr, t.min_lr_ratio, t.warmup_ratio, t.kl_coef) == (5e-7, 0.1, 0.03, 0.001)
    assert (cfg.sampling.questions_per_iteration, cfg.sampling.n, cfg.sampling.max_new_tokens) == (64, 8, 768)
    per_phase = cfg.sampling.questions_per_iteration * cfg.sampling.n
    assert per_phase // t.mini_batch_size == 8 and cfg.reward_data.reward_batch_size * cfg.reward_n // t.mini_batch_size == 8
    tiny = load_config(preset="tiny-vl")
    assert tiny.model.tiny.vision is not None and tiny.data.source == "visual_arithmetic"
    assert load_config(preset="tiny").model.tiny.vision is None
