"""Config parameters made for forms: a preset choice plus overrides that carry only what a person changes.

A form built from a JSON schema (Prefect's Custom-run form) fills every field with its schema default and
submits them all. Were the overrides typed by `SparkConfig`, those defaults (64 questions, 768 tokens...)
would replace the chosen preset's values. `ConfigOverrides` mirrors `SparkConfig` section by section with
every field optional and defaulting to null: a filled-in form carries nulls, and null means "from the
preset" (or, for an existing run, from its run.json), and a section left empty changes nothing. Lists (levels, benchmarks, few-shot turns) are
replaced as a whole when given.

`compose(preset, config, overrides)` lays them over each other: preset < config mapping < overrides.
Dotted keys are accepted too, like the CLI's ``--set``: ``{"train.lr": 1e-6, "sampling.n": 4}``.
"""

from __future__ import annotations

import types
import typing
from typing import Annotated, Any, Optional, Union

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model, model_validator

from .config import ConfigError, SparkConfig, _deep_merge

UNSET_NOTE = "Unset (null) = the preset's value."


def expand_dotted(data: dict[str, Any]) -> dict[str, Any]:
    """`{"train.lr": 1e-6, "sampling": {"n": 4}}` -> nested mapping (dotted keys split, values kept)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise ConfigError(f"overrides: key {key!r} is not a string")
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"overrides: bad key {key!r} (use section.field, e.g. train.lr)")
        nested: dict[str, Any] = {}
        cur = nested
        for part in parts[:-1]:
            cur = cur.setdefault(part, {})
        cur[parts[-1]] = expand_dotted(value) if isinstance(value, dict) else value
        out = _deep_merge(out, nested)
    return out


def parse_override(expr: str) -> dict[str, Any]:
    """The CLI's ``--set train.lr=1e-6`` as {"train": {"lr": 1e-6}} (the value parsed as YAML)."""
    if "=" not in expr:
        raise ConfigError(f"override {expr!r}: expected key.path=value")
    key, raw = expr.split("=", 1)
    return expand_dotted({key: yaml.safe_load(raw)})


class _Overrides(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _dotted(cls, data: Any) -> Any:
        return expand_dotted(data) if isinstance(data, dict) else data


def _section(annotation: Any) -> type[BaseModel] | None:
    """The config section model behind `X` or `X | None`, if the annotation is one."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (Union, types.UnionType):
        models = [a for a in typing.get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        if len(models) == 1:
            return models[0]
    return None


_MADE: dict[type[BaseModel], type[BaseModel]] = {}


def overrides_model(model: type[BaseModel], skip: tuple[str, ...] = ()) -> type[BaseModel]:
    """`model` with every field optional (default null) and every section replaced by its own overrides model."""
    if model in _MADE:
        return _MADE[model]
    fields: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        if name in skip:
            continue
        section = _section(info.annotation)
        annotation = overrides_model(section) if section is not None else info.annotation
        about = info.description
        if not about and section is not None and section.__doc__:
            about = section.__doc__.strip().splitlines()[0]
        fields[name] = (Optional[annotation], Field(None, description=f"{about or name} {UNSET_NOTE}".strip()))
    made = create_model(
        f"{model.__name__}Overrides", __base__=_Overrides, __module__=__name__,
        __doc__=f"Changes to {model.__name__}: only the fields given are applied. {UNSET_NOTE}", **fields,
    )
    _MADE[model] = made
    return made


# `preset` has its own parameter (a choice); overrides change everything else.
ConfigOverrides = overrides_model(SparkConfig, skip=("preset",))


def overrides_dict(overrides: BaseModel | dict[str, Any] | None) -> dict[str, Any]:
    """Only what was given: nested, nulls dropped (a form's untouched fields)."""
    if overrides is None:
        return {}
    if isinstance(overrides, dict):
        overrides = ConfigOverrides.model_validate(overrides)
    return _drop_nulls(overrides.model_dump(mode="json", exclude_none=True))


def _drop_nulls(data: dict[str, Any]) -> dict[str, Any]:
    """Nulls and sections left empty removed: an opened but untouched section (`model.lora`) changes nothing."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            value = _drop_nulls(value) or None
        if value is not None:
            out[key] = value
    return out


def _as_mapping(value: Any) -> Any:
    """A SparkConfig given where a config mapping is expected (Python callers) becomes its JSON dump."""
    return value.model_dump(mode="json") if isinstance(value, SparkConfig) else value


# A full or partial config as JSON (it may name a `preset`). Typed as a plain mapping so that a form
# shows a JSON editor that starts empty instead of every field filled with SparkConfig's defaults.
ConfigMapping = Annotated[dict[str, Any], BeforeValidator(_as_mapping)]


def compose(preset: str | None, config: dict[str, Any] | SparkConfig | None,
            overrides: BaseModel | dict[str, Any] | None) -> dict[str, Any] | None:
    """preset < config < overrides as one mapping, or None when none of the three was given."""
    config = _as_mapping(config)
    changes = overrides_dict(overrides)
    if preset is None and not config and not changes:
        return None
    data: dict[str, Any] = {"preset": preset} if preset else {}
    data = _deep_merge(data, config or {})
    if preset:
        data["preset"] = preset  # the chosen preset wins over a `preset` key inside `config`
    return _deep_merge(data, changes)
