"""Evaluation sets: math benchmarks as :class:`~spark_core.data.Question` lists, and preference pairs.

A :class:`~spark_core.config.BenchmarkConfig` names where the items come from:

* ``arithmetic``: the held-out test split of the synthetic task (``cfg.data.arithmetic``), offline;
  ``visual_arithmetic``: the same split with the expressions drawn into images (``cfg.data.visual``);
* ``hf`` / ``file``: a Hugging Face dataset id or a local (or fsspec) Parquet/JSONL file, read with
  :func:`spark_core.data.read_questions` and the benchmark's column mapping;
* ``preference``: (prompt, chosen, rejected) pairs for judge evaluation (:func:`load_preference_set`).

Column mappings of the paper's text benchmarks (hub ids as published; set them in ``eval.benchmarks``):

==========  ==========================  =========  ===============  =============  =============
benchmark   path                        split      question_column  answer_column  answer_format
==========  ==========================  =========  ===============  =============  =============
GSM8K       openai/gsm8k (config main)  test       question         answer         gsm8k
MATH-500    HuggingFaceH4/MATH-500      test       problem          answer         plain
AIME24      HuggingFaceH4/aime_2024     train      problem          answer         plain
AIME25      math-ai/aime25              test       problem          answer         plain
AMC23       math-ai/amc23               test       question         answer         plain
==========  ==========================  =========  ===============  =============  =============

GSM8K's ``answer`` holds the worked solution with the number after ``####`` (``answer_format: gsm8k``);
the others hold the final answer itself. RewardBench2 (``allenai/reward-bench-2``, split ``test``) has
columns ``prompt``, ``chosen`` (a list: the first entry is used) and ``rejected`` (a list: the first
entry is used), so set ``question_column: prompt`` for it.

Multimodal math sets (MathVista-, MathVerse-style) are ``file`` (or ``hf``) benchmarks with an
``image_column`` (image bytes, ``{"bytes"|"path": ..}`` as the HF ``Image`` feature exports, or a path
relative to the file); e.g. a local MathVista ``testmini`` export: ``question_column: query``,
``answer_column: answer``, ``image_column: decoded_image`` (or ``image``, a relative path). Only such
local copies were exercised here (no hub access); free-form MathVista answers (multiple choice by
letter/text) are verified by the same math verifier, so choice questions need answers as the model boxes them.

``limit`` keeps the first ``limit`` items, in file order, so every evaluation sees the same items.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from .config import BenchmarkConfig, SparkConfig
from .data import Question, make_arithmetic, make_visual_arithmetic, read_questions


@dataclass(frozen=True)
class PreferencePair:
    """One judge item: a prompt, a preferred response and a rejected one."""

    prompt: str
    chosen: str
    rejected: str
    pair_id: str = ""
    images: tuple[bytes, ...] = ()  # the prompt's image(s) (VL-RewardBench-style sets)


def load_benchmark(bcfg: BenchmarkConfig, cfg: SparkConfig) -> list[Question]:
    """The questions of one benchmark (at most ``bcfg.limit``)."""
    if bcfg.source in ("arithmetic", "visual_arithmetic"):
        if bcfg.source == "arithmetic":
            questions = make_arithmetic(cfg.data.arithmetic, "test")
        else:
            questions = make_visual_arithmetic(cfg.data, "test")
        return questions[: bcfg.limit] if bcfg.limit else questions
    if bcfg.source == "preference":
        raise ValueError(
            f"benchmark {bcfg.name!r} is a preference set (source=preference): load it with load_preference_set"
        )
    if not bcfg.path:
        raise ValueError(f"benchmark {bcfg.name!r}: path is required for source={bcfg.source}")
    try:
        # on_bad_row=error: a benchmark silently missing rows would not be comparable across runs.
        questions, _skipped = read_questions(
            bcfg.source,
            bcfg.path,
            hf_config=bcfg.hf_config,
            split=bcfg.split,
            question_column=bcfg.question_column,
            answer_column=bcfg.answer_column,
            answer_format=bcfg.answer_format,
            on_bad_row="error",
            max_rows=bcfg.limit,
            image_column=bcfg.image_column,
        )
    except ValueError as err:  # read_questions names the column/row; add which benchmark it was
        raise ValueError(f"benchmark {bcfg.name!r}: {err}") from None
    return questions


def load_preference_set(bcfg: BenchmarkConfig) -> list[PreferencePair]:
    """(prompt, chosen, rejected) pairs from a local Parquet/JSONL file or a Hugging Face dataset id.

    The prompt is read from ``question_column`` (set it to ``prompt`` for RewardBench2), the responses
    from ``chosen_column`` / ``rejected_column``. A list-valued response (RewardBench2) contributes its
    first entry. An ``id`` column, when present, becomes ``pair_id`` (else the row number). With
    ``image_column`` (VL-RewardBench-style sets) each pair carries its prompt's checked image(s).
    """
    if not bcfg.path:
        raise ValueError(f"preference set {bcfg.name!r}: path is required")
    frame = _read_frame(bcfg.path, hf_config=bcfg.hf_config, split=bcfg.split)
    columns = [bcfg.question_column, bcfg.chosen_column, bcfg.rejected_column]
    if bcfg.subset_column:
        columns.append(bcfg.subset_column)
    if bcfg.image_column:
        columns.append(bcfg.image_column)
    _check_columns(frame, columns, bcfg)
    if bcfg.subset_column and bcfg.subset_values:
        # e.g. RewardBench2's Math subset: subset_column="subset", subset_values=["Math"]
        frame = frame[frame[bcfg.subset_column].astype(str).isin(bcfg.subset_values)]
    if bcfg.limit:
        frame = frame.head(bcfg.limit)
    pairs = []
    for pos, row in enumerate(frame.itertuples(index=False)):
        values = dict(zip(frame.columns, row))
        pair_id = str(values["id"]) if "id" in values and values["id"] is not None else str(pos)
        pairs.append(
            PreferencePair(
                prompt=_text(values[bcfg.question_column], bcfg.question_column, pos, bcfg),
                chosen=_text(values[bcfg.chosen_column], bcfg.chosen_column, pos, bcfg),
                rejected=_text(values[bcfg.rejected_column], bcfg.rejected_column, pos, bcfg),
                pair_id=pair_id,
                images=_pair_images(values, pos, bcfg),
            )
        )
    return pairs


def _pair_images(values: dict[str, Any], pos: int, bcfg: BenchmarkConfig) -> tuple[bytes, ...]:
    if not bcfg.image_column:
        return ()
    from .images import ImageError, row_images

    value = values[bcfg.image_column]
    if hasattr(value, "tolist"):  # pandas gives numpy arrays for list cells
        value = value.tolist()
    base = bcfg.path.rsplit("/", 1)[0] if bcfg.path and "/" in bcfg.path else "."
    try:
        return row_images(value, base)
    except ImageError as err:
        raise ValueError(f"preference set {bcfg.name!r}: row {pos}: {err}") from None


def _is_local_or_uri(path: str) -> bool:
    return "://" in path or Path(path).suffix.lower() in {".parquet", ".jsonl", ".json"} or Path(path).exists()


def _read_frame(path: str, *, hf_config: str | None = None, split: str = "test") -> pd.DataFrame:
    """A local/fsspec Parquet or JSONL file, or (for anything else) a Hugging Face dataset split."""
    if _is_local_or_uri(path):
        suffix = Path(path.split("?")[0]).suffix.lower()
        if suffix == ".parquet":
            frame = pd.read_parquet(path)
        elif suffix in {".jsonl", ".json"}:
            frame = pd.read_json(path, lines=suffix == ".jsonl")
        else:
            raise ValueError(f"{path}: expected a .parquet, .jsonl or .json file")
        return frame
    import datasets  # imported lazily: only hub-backed sets need it

    return datasets.load_dataset(path, hf_config, split=split).to_pandas()


def _check_columns(frame: pd.DataFrame, required: list[str], bcfg: BenchmarkConfig) -> None:
    for column in required:
        if column not in frame.columns:
            raise ValueError(
                f"benchmark {bcfg.name!r}: column {column!r} not found in {bcfg.path} "
                f"(columns: {', '.join(map(str, frame.columns))}); set the column mapping in eval.benchmarks"
            )


def _text(value: Any, column: str, pos: int, bcfg: BenchmarkConfig) -> str:
    """A response cell as text; list-like cells (RewardBench2) give their first entry."""
    if value is not None and not isinstance(value, str) and hasattr(value, "__len__"):
        value = value[0] if len(value) else None
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"preference set {bcfg.name!r}: row {pos} has no text in column {column!r}")
    return value
