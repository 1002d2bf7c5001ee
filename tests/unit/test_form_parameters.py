"""The flows' parameters as Prefect's Custom-run form uses them: a form filled with every schema default
and preset `tiny` chosen runs exactly the tiny preset; every parameter is described; bad values fail
before any work, with the field named."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from prefect.utilities.callables import parameter_schema_from_entrypoint

from deployments.deploy import form_defaults
from flows.common import STORE_ENV, resolve
from spark_core.config import PRESETS, ConfigError, load_config
from spark_core.overrides import ConfigOverrides, compose, expand_dotted
from spark_core.stages import StageError
from spark_core.store import Store

ENTRYPOINTS = ("flows/iteration.py:spark_iteration", "flows/run.py:spark_run")
ROOT = Path(__file__).resolve().parents[2]


def schema(entrypoint: str) -> dict[str, Any]:
    """The parameter schema `prefect deploy` registers (read from the source, as the deploy step does)."""
    path, name = entrypoint.split(":")
    return parameter_schema_from_entrypoint(f"{ROOT / path}:{name}").model_dump_for_openapi()


@pytest.mark.parametrize("entrypoint", ENTRYPOINTS)
def test_every_parameter_is_described_and_preset_is_a_choice(entrypoint: str) -> None:
    s = schema(entrypoint)
    for name, prop in s["properties"].items():
        assert prop.get("description"), f"{entrypoint}: parameter {name} has no description"
        assert "informational" not in prop["description"]
    [choice] = [c for c in s["properties"]["preset"]["anyOf"] if "enum" in c]
    assert set(choice["enum"]) == set(PRESETS) == {p.stem for p in (ROOT / "spark_core/presets").glob("*.yaml")}
    # No parameter carries SparkConfig's defaults: those are what overrode the preset.
    assert "SparkConfig" not in s["definitions"]
    overrides = s["definitions"]["SparkConfigOverrides"]
    for name, prop in overrides["properties"].items():
        assert prop.get("default") is None, name
        assert prop.get("description"), name


@pytest.mark.parametrize("entrypoint", ENTRYPOINTS)
def test_form_filled_with_every_default_runs_exactly_the_tiny_preset(
    entrypoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(STORE_ENV, raising=False)
    s = schema(entrypoint)
    params = form_defaults(s)
    params.update(preset="tiny", run_id="form")
    assert params["overrides"]["sampling"]["n"] is None  # the form really did open every section
    assert params["overrides"]["eval"]["benchmarks"] is None

    overrides = ConfigOverrides.model_validate(params["overrides"])  # what validate_parameters does
    cfg, st, run_id = resolve(params["config"], params["store"], params["run_id"],
                              params.get("iterations"), preset=params["preset"], overrides=overrides)
    tiny = load_config(preset="tiny").with_pinned_schedule()  # a new run fixes its LR schedule length
    assert (run_id, st.uri) == ("form", str(Path("./spark-store").resolve()))
    tiny.store.uri = st.uri
    assert cfg.model_dump() == tiny.model_dump()
    assert cfg.config_hash() == tiny.config_hash() and cfg.model.lora is None


def test_overrides_change_only_what_is_given(tmp_path: Path) -> None:
    cfg, _, _ = resolve(None, str(tmp_path), "x", preset="tiny",
                        overrides={"sampling": {"n": 2}, "train.lr": 1e-4, "eval": {"every": None}})
    tiny = load_config(preset="tiny").with_pinned_schedule()  # a new run fixes its LR schedule length
    assert (cfg.sampling.n, cfg.train.lr) == (2, 1e-4)
    assert cfg.sampling.max_new_tokens == tiny.sampling.max_new_tokens and cfg.eval.every == tiny.eval.every
    # preset < config < overrides; a config mapping alone (the API callers' way) still works.
    assert compose("tiny", {"seed": 5, "sampling": {"n": 3}}, {"sampling.n": 6}) == {
        "preset": "tiny", "seed": 5, "sampling": {"n": 6}}
    api, st, _ = resolve({"preset": "tiny", "store": {"uri": str(tmp_path / "s")}}, None, "y")
    assert api.config_hash() == tiny.config_hash() and st.uri == str(tmp_path / "s")
    assert expand_dotted({"a.b.c": 1, "a": {"d": 2}}) == {"a": {"b": {"c": 1}, "d": 2}}


def test_bad_values_fail_before_any_work_naming_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"sampling\.n: Input should be greater than or equal to 2"):
        resolve(None, str(tmp_path), "bad", preset="tiny", overrides={"sampling.n": 1})
    with pytest.raises(Exception, match="samplin"):
        ConfigOverrides.model_validate({"samplin": {"n": 4}})
    with pytest.raises(ConfigError, match="bad key"):
        expand_dotted({"train..lr": 1})
    with pytest.raises(ConfigError, match=r"data\.arithmetic \(n_test=200\).*cannot supply enough distinct"):
        resolve(None, str(tmp_path), "bad", preset="tiny", overrides={"data.arithmetic.n_test": 200})
    with pytest.raises(StageError, match="give a preset or a config"):
        resolve(None, str(tmp_path), None)
    assert not any(tmp_path.iterdir()), "nothing was written"


def test_store_default_comes_from_spark_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(STORE_ENV, str(tmp_path / "stack"))
    _, st, _ = resolve(None, None, "r", preset="tiny")
    assert st.uri == str(tmp_path / "stack")
    _, st, _ = resolve({"preset": "tiny", "store": {"uri": str(tmp_path / "given")}}, None, "r")
    assert st.uri == str(tmp_path / "given"), "a config's explicit store wins over the environment"
    _, st, _ = resolve(None, str(tmp_path / "param"), "r", preset="tiny", overrides={"store.uri": "x"})
    assert st.uri == str(tmp_path / "param"), "the store parameter wins over everything"


def test_existing_run_continues_by_id_and_refuses_a_changed_recipe(
    tiny_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(STORE_ENV, str(tmp_path))
    store = Store(str(tmp_path))
    store.write_run("demo", tiny_cfg)
    cfg, st, _ = resolve(None, None, "demo")
    assert cfg.config_hash() == tiny_cfg.config_hash() and st.uri == str(tmp_path)
    longer, _, _ = resolve(None, None, "demo", overrides={"iterations": 5})  # results-neutral: allowed
    assert longer.iterations == 5
    with pytest.raises(StageError) as err:
        resolve(None, None, "demo", overrides={"train.lr": 0.5})
    text = str(err.value)
    assert "created with a different config" in text
    assert "new run id" in text and f"spark rm {store.run_uri('demo')}" in text
    with pytest.raises(StageError, match="does not exist in .*give a preset"):
        resolve(None, None, "nope")
