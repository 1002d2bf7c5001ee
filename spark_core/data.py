"""Training and evaluation questions: the built-in arithmetic task, local files, HF datasets, batching.

Every question becomes a `Question(question_id, question, answer)` with a plain-text gold answer (what
the verifier compares the model's last `\\boxed{}` against).
"""

from __future__ import annotations

import json
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal

from .config import ArithmeticConfig, ArithmeticLevel, DataConfig

log = logging.getLogger(__name__)

AnswerFormat = Literal["plain", "gsm8k", "boxed"]
OnBadRow = Literal["error", "skip"]


@dataclass(frozen=True)
class Question:
    question_id: str
    question: str
    answer: str


# ---------------------------------------------------------------------------------------- arithmetic


def _operand_range(digits: int) -> tuple[int, int]:
    # One-digit operands include 0; longer ones have exactly `digits` digits (no leading zeros).
    return (0, 9) if digits == 1 else (10 ** (digits - 1), 10**digits - 1)


def _level_size(level: ArithmeticLevel) -> int:
    """How many distinct questions a level can produce (bounds the rejection sampling below)."""
    lo, hi = _operand_range(level.digits)
    return (hi - lo + 1) ** level.operands * len(set(level.ops)) ** (level.operands - 1)


def _draw(level: ArithmeticLevel, rng: random.Random) -> tuple[str, str]:
    lo, hi = _operand_range(level.digits)
    nums = [rng.randint(lo, hi) for _ in range(level.operands)]
    ops = [rng.choice(level.ops) for _ in range(level.operands - 1)]
    expr = str(nums[0]) + "".join(f" {op} {n}" for op, n in zip(ops, nums[1:]))
    # Usual precedence (* before + and -); the expression holds only integers and + - *.
    value = eval(expr, {"__builtins__": {}})  # noqa: S307
    return f"What is {expr}?", str(value)


def _sample_split(
    cfg: ArithmeticConfig,
    count: int,
    rng: random.Random,
    exclude: dict[str, int],
    unique: bool,
) -> list[tuple[str, str, int]]:
    """Draw `count` (question, answer, level index) triples, levels mixed by weight, none in `exclude`.

    `exclude` maps question text to its level index. With `unique`, every question is distinct (fails if
    the levels cannot supply enough); otherwise questions are distinct while a level still has unused
    ones, then repeat (small levels, e.g. one-digit additions, have only 100 questions).
    """
    weights = [lv.weight for lv in cfg.levels]
    excluded_per_level = [0] * len(cfg.levels)
    for li in exclude.values():
        excluded_per_level[li] += 1
    used_per_level = [0] * len(cfg.levels)
    seen: set[str] = set()
    out: list[tuple[str, str, int]] = []
    max_tries = 1000
    for _ in range(count):
        li = rng.choices(range(len(cfg.levels)), weights=weights)[0]
        level = cfg.levels[li]
        exhausted = _level_size(level) - used_per_level[li] - excluded_per_level[li] <= 0
        picked: tuple[str, str] | None = None
        repeat: tuple[str, str] | None = None
        for _attempt in range(max_tries):
            text, answer = _draw(level, rng)
            if text in exclude:
                continue
            if text not in seen:
                picked = (text, answer)
                break
            repeat = repeat or (text, answer)
            if exhausted and not unique:
                break
        if picked is None and not unique:
            picked = repeat
        if picked is None:
            raise ValueError(
                f"arithmetic level {level.model_dump()} cannot supply enough distinct questions "
                f"(it has {_level_size(level)}); lower n_test or add harder levels"
            )
        if picked[0] not in seen:
            seen.add(picked[0])
            used_per_level[li] += 1
        out.append((*picked, li))
    return out


def make_arithmetic(cfg: ArithmeticConfig, split: Literal["train", "test"]) -> list[Question]:
    """Seeded synthetic arithmetic questions with integer answers.

    The test split is drawn first (distinct questions) from its own seeded stream, and the train split
    never contains a test question, so the two are disjoint by question text; the test split does not
    depend on `n_train`.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    test = _sample_split(cfg, cfg.n_test, random.Random(f"arith-test-{cfg.seed}"), {}, unique=True)
    if split == "test":
        rows = test
    else:
        exclude = {text: li for text, _, li in test}
        rows = _sample_split(cfg, cfg.n_train, random.Random(f"arith-train-{cfg.seed}"), exclude, unique=False)
    return [Question(f"arith-{split}-{i:06d}", text, answer) for i, (text, answer, _) in enumerate(rows)]


# ------------------------------------------------------------------------------------ answer formats


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\box{...}`), matching nested braces; None if absent."""
    starts = [m.end() for m in re.finditer(r"\\box(?:ed)?\s*\{", text)]
    for start in reversed(starts):
        depth = 1
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i]
    return None


def parse_answer(raw: str, answer_format: AnswerFormat) -> str:
    """The gold final answer from a dataset's answer field; raises ValueError saying what is wrong."""
    if answer_format == "plain":
        answer = raw.strip()
    elif answer_format == "gsm8k":
        if "####" not in raw:
            raise ValueError("answer has no '####' marker (answer_format=gsm8k)")
        answer = raw.split("####")[-1].strip().replace(",", "")
    elif answer_format == "boxed":
        boxed = last_boxed(raw)
        if boxed is None:
            raise ValueError("answer has no \\boxed{} (answer_format=boxed)")
        answer = boxed.strip()
    else:
        raise ValueError(f"unknown answer_format {answer_format!r}")
    if not answer:
        raise ValueError("answer is empty")
    return answer


# ---------------------------------------------------------------------------------------- reading


def _read_table(path: str, max_rows: int | None) -> tuple[list[str], list[dict[str, Any]]]:
    """Columns and rows of a local or fsspec Parquet/JSONL file (format from the extension)."""
    import fsspec
    import pyarrow.parquet as pq

    name = path.split("?")[0].lower()
    if name.endswith((".parquet", ".pq")):
        with fsspec.open(path, "rb") as fh:
            table = pq.read_table(fh)
        if max_rows is not None:
            table = table.slice(0, max_rows)
        return table.column_names, table.to_pylist()
    if name.endswith((".jsonl", ".ndjson", ".json")):
        # Parsed with `json`, not pyarrow: a column whose type varies between rows (a number among
        # strings) must reach the row checks below instead of failing the whole file.
        with fsspec.open(path, "rt", encoding="utf-8") as fh:
            text = fh.read()
        if name.endswith(".json") and text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        if not all(isinstance(r, dict) for r in rows):
            raise ValueError(f"{path}: expected one JSON object per line")
        rows = rows[:max_rows] if max_rows is not None else rows
        columns = list(dict.fromkeys(key for row in rows for key in row))
        return columns, rows
    raise ValueError(f"{path}: unsupported file type; use .parquet or .jsonl (JSON lines)")


def _read_hf(
    path: str, hf_config: str | None, split: str, max_rows: int | None
) -> tuple[list[str], Iterable[dict[str, Any]]]:
    import datasets

    ds = datasets.load_dataset(path, hf_config, split=split)
    if max_rows is not None:
        ds = ds.select(range(min(max_rows, len(ds))))
    return list(ds.column_names), iter(ds)


def _id_prefix(source: str, path: str, split: str) -> str:
    stem = Path(path.rstrip("/").split("?")[0]).name.split(".")[0] if source == "file" else path.split("/")[-1]
    slug = re.sub(r"[^A-Za-z0-9]+", "-", stem).strip("-").lower() or "data"
    return f"{slug}-{split}" if source == "hf" else slug


def read_questions(
    source: Literal["hf", "file"],
    path: str,
    *,
    hf_config: str | None = None,
    split: str = "train",
    question_column: str = "question",
    answer_column: str = "answer",
    answer_format: AnswerFormat = "plain",
    on_bad_row: OnBadRow = "error",
    max_rows: int | None = None,
) -> tuple[list[Question], int]:
    """Questions from a Parquet/JSONL file (local path or fsspec URI) or an HF dataset id.

    Returns (questions, number of rows skipped). A bad row (empty question, missing or non-string
    answer, answer not in the expected format) raises ValueError naming the row with `on_bad_row=error`
    and is skipped and counted with `skip`. Question ids are `<name>-<row index>`.
    """
    if source == "file":
        columns, rows = _read_table(path, max_rows)
    elif source == "hf":
        columns, rows = _read_hf(path, hf_config, split, max_rows)
    else:
        raise ValueError(f"source must be 'hf' or 'file', got {source!r}")
    for col, role in ((question_column, "question_column"), (answer_column, "answer_column")):
        if col not in columns:
            raise ValueError(
                f"{path}: column {col!r} ({role}) not found; available columns: {', '.join(columns)}"
            )

    prefix = _id_prefix(source, path, split)
    questions: list[Question] = []
    skipped = 0
    for index, row in enumerate(rows):
        question, raw_answer = row.get(question_column), row.get(answer_column)
        try:
            if not isinstance(question, str) or not question.strip():
                raise ValueError(f"empty or missing question in column {question_column!r}")
            if raw_answer is None:
                raise ValueError(f"missing answer in column {answer_column!r}")
            if not isinstance(raw_answer, str):
                raise ValueError(
                    f"answer in column {answer_column!r} is {type(raw_answer).__name__}, not a string"
                )
            answer = parse_answer(raw_answer, answer_format)
        except ValueError as err:
            if on_bad_row == "error":
                raise ValueError(f"{path}: row {index}: {err} (set on_bad_row: skip to skip such rows)") from None
            skipped += 1
            continue
        questions.append(Question(f"{prefix}-{index:06d}", question, answer))
    return questions, skipped


def load_training_questions(data_cfg: DataConfig) -> list[Question]:
    """The training questions a run samples from (arithmetic train split, a file, or an HF dataset)."""
    if data_cfg.source == "arithmetic":
        questions = make_arithmetic(data_cfg.arithmetic, "train")
        return questions[: data_cfg.max_rows] if data_cfg.max_rows else questions
    if not data_cfg.path:
        raise ValueError(f"data.path is required when data.source is {data_cfg.source!r}")
    questions, skipped = read_questions(
        data_cfg.source,
        data_cfg.path,
        hf_config=data_cfg.hf_config,
        split=data_cfg.split,
        question_column=data_cfg.question_column,
        answer_column=data_cfg.answer_column,
        answer_format=data_cfg.answer_format,
        on_bad_row=data_cfg.on_bad_row,
        max_rows=data_cfg.max_rows,
    )
    if skipped:
        log.warning("%s: skipped %d bad rows, kept %d questions", data_cfg.path, skipped, len(questions))
    if not questions:
        raise ValueError(f"{data_cfg.path}: no usable questions")
    return questions


# ---------------------------------------------------------------------------------------- batching


def batch_for_iteration(questions: list[Question], iteration: int, size: int, seed: int) -> list[Question]:
    """The questions of training iteration `iteration` (1-based), deterministic for a given seed.

    Iterations walk through the dataset in epochs: each epoch is a fresh seeded permutation, and
    iteration i takes positions (i-1)*size .. i*size-1 of the concatenated permutations. So no question
    repeats inside an epoch, and a resumed run gets exactly the batches it would have had.
    """
    if iteration < 1:
        raise ValueError(f"iteration must be >= 1 (1 is the first training iteration), got {iteration}")
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    if not questions:
        raise ValueError("no questions to batch")
    n = len(questions)
    start = (iteration - 1) * size
    cached: dict[int, list[int]] = {}
    out: list[Question] = []
    for pos in range(start, start + size):
        epoch, offset = divmod(pos, n)
        if epoch not in cached:
            order = list(range(n))
            random.Random(f"batch-{seed}-{epoch}").shuffle(order)
            cached[epoch] = order
        out.append(questions[cached[epoch][offset]])
    return out
