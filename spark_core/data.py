"""Training and evaluation questions: the built-in arithmetic task, local files, HF datasets, batching.

Every question becomes a `Question(question_id, question, answer)` with a plain-text gold answer (what
the verifier compares the model's last `\\boxed{}` against), and for vision-language data the checked
bytes of its image(s) (`images`; empty for text).
"""

from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal

from .config import ArithmeticConfig, ArithmeticLevel, DataConfig
from .data_checks import DataError, read_file_rows, text_problem

log = logging.getLogger(__name__)

AnswerFormat = Literal["plain", "gsm8k", "boxed"]
OnBadRow = Literal["error", "skip"]


@dataclass(frozen=True)
class Question:
    question_id: str
    question: str
    answer: str
    images: tuple[bytes, ...] = ()


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


def make_visual_arithmetic(data_cfg: DataConfig, split: Literal["train", "test"]) -> list[Question]:
    """The arithmetic questions of ``data.arithmetic`` with the expression drawn into an image
    (``data.visual``): same splits, answers and disjointness; each image seeded by split and index."""
    from .images import render_expression

    vis = data_cfg.visual
    out = []
    for i, q in enumerate(make_arithmetic(data_cfg.arithmetic, split)):
        expr = q.question.removeprefix("What is ").removesuffix("?")
        png = render_expression(expr, f"visual-{data_cfg.arithmetic.seed}-{split}-{i}", width=vis.width,
                                height=vis.height, font_size=vis.font_size, noise=vis.noise, jitter=vis.jitter)
        out.append(Question(f"varith-{split}-{i:06d}", vis.question, q.answer, (png,)))
    return out


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
    reject_duplicates: bool = False,
    image_column: str | None = None,
) -> tuple[list[Question], int]:
    """Questions from a Parquet/JSONL/JSON/CSV file (local path or fsspec URI) or an HF dataset id.

    Returns (questions, number of rows skipped). A bad row (empty question, missing or non-string
    answer, answer not in the expected format, text over `MAX_TEXT_CHARS`, a repeated question with
    `reject_duplicates`) raises DataError (a ValueError) naming the file and line/row with
    `on_bad_row=error`, and is skipped and counted with `skip`. Question ids are `<name>-<row index>`.
    With `image_column`, each row's image(s) are read and checked too (`images.row_images`: unreadable,
    zero-size or huge images are bad rows); a repeated question text is then no duplicate by itself.
    """
    if source == "file":
        columns, rows, labels = read_file_rows(path, max_rows)
    elif source == "hf":
        columns, rows = _read_hf(path, hf_config, split, max_rows)
        labels = None
    else:
        raise ValueError(f"source must be 'hf' or 'file', got {source!r}")
    wanted = ((question_column, "question_column"), (answer_column, "answer_column"))
    for col, role in wanted + (((image_column, "image_column"),) if image_column else ()):
        if col not in columns:
            raise DataError(
                f"{path}: column {col!r} ({role}) not found; available columns: {', '.join(columns)}"
            )

    prefix = _id_prefix(source, path, split)
    base = path.rsplit("/", 1)[0] if source == "file" and "/" in path else ("." if source == "file" else None)
    if image_column:  # visual questions share texts ("What is shown?"); their images tell them apart
        seen_images: dict[str, str] = {} if reject_duplicates else None  # type: ignore[assignment]
        reject_duplicates = False
    questions: list[Question] = []
    skipped = 0
    seen: dict[str, str] | None = {} if reject_duplicates else None  # question -> where it first was
    for index, row in enumerate(rows):
        where = labels[index] if labels is not None else f"row {index}"
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
            if (problem := text_problem(question, raw_answer, seen, where)) is not None:
                raise ValueError(problem)
            answer = parse_answer(raw_answer, answer_format)
            images = _row_images(row.get(image_column), base, question, seen_images, where) if image_column else ()
        except ValueError as err:
            if on_bad_row == "error":
                raise DataError(f"{path}: {where}: {err} (set on_bad_row: skip to skip such rows)") from None
            skipped += 1
            continue
        questions.append(Question(f"{prefix}-{index:06d}", question, answer, images))
    return questions, skipped


def _row_images(value: Any, base: str | None, question: str, seen: dict[str, str] | None,
                where: str) -> tuple[bytes, ...]:
    """A row's checked images; with ``seen``, the same question text with the same images is a duplicate."""
    import hashlib

    from .images import row_images

    images = row_images(value, base)
    if seen is not None:
        key = hashlib.sha256(" ".join(question.split()).encode() + b"".join(images)).hexdigest()
        if key in seen:
            raise ValueError(f"duplicate question (same text and image as {seen[key]})")
        seen[key] = where
    return images


def load_training_questions(data_cfg: DataConfig) -> list[Question]:
    """The training questions a run samples from (arithmetic train split, a file, or an HF dataset)."""
    if data_cfg.source in ("arithmetic", "visual_arithmetic"):
        make = make_arithmetic if data_cfg.source == "arithmetic" else make_visual_arithmetic
        questions = make(data_cfg.arithmetic if data_cfg.source == "arithmetic" else data_cfg, "train")  # type: ignore[arg-type]
        return questions[: data_cfg.max_rows] if data_cfg.max_rows else questions
    if not data_cfg.path:
        raise DataError(f"data.path is required when data.source is {data_cfg.source!r}")
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
        reject_duplicates=True,
        image_column=data_cfg.image_column,
    )
    if skipped:
        log.warning("%s: skipped %d bad rows, kept %d questions", data_cfg.path, skipped, len(questions))
    if not questions:
        raise DataError(f"{data_cfg.path}: no usable questions")
    return questions


def check_data_source(data_cfg: DataConfig) -> int:
    """Open and validate the training questions a run would use; the number of usable questions.

    Raises DataError naming the file and line/row. Cheap next to a run (one read of the file), and run
    before any server, model or task starts so a bad file fails in seconds, not after start-up.
    """
    try:
        return len(load_training_questions(data_cfg))
    except DataError:
        raise
    except ValueError as err:  # the row checks' messages already name the file and row
        raise DataError(str(err)) from None
    except Exception as err:  # noqa: BLE001 - `datasets` raises many kinds; all mean "cannot use it"
        if data_cfg.source != "hf":
            raise
        raise DataError(f"{data_cfg.path}: cannot load the HF dataset ({type(err).__name__}: {err})") from None


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
