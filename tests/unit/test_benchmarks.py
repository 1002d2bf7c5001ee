"""Benchmark and preference-set loading from local files (no hub access)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from spark_core.benchmarks import PreferencePair, load_benchmark, load_preference_set
from spark_core.config import BenchmarkConfig, load_config
from spark_core.data import make_arithmetic


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def cfg():
    return load_config(preset="tiny")


def test_arithmetic_is_the_test_split_with_limit(cfg) -> None:
    questions = load_benchmark(BenchmarkConfig(name="arith", source="arithmetic", limit=5), cfg)
    assert questions == make_arithmetic(cfg.data.arithmetic, "test")[:5]
    everything = load_benchmark(BenchmarkConfig(name="arith", source="arithmetic"), cfg)
    assert len(everything) == cfg.data.arithmetic.n_test
    train_texts = {q.question for q in make_arithmetic(cfg.data.arithmetic, "train")}
    assert not train_texts & {q.question for q in everything}


def test_file_with_column_mapping(cfg, tmp_path: Path) -> None:
    # MATH-500 / AIME style: problem/answer columns.
    rows = [{"problem": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(6)]
    path = write_jsonl(tmp_path / "math.jsonl", rows)
    bcfg = BenchmarkConfig(name="m", source="file", path=path, question_column="problem", limit=4)
    questions = load_benchmark(bcfg, cfg)
    assert [q.answer for q in questions] == ["0", "2", "4", "6"]
    assert questions[1].question == "What is 1 + 1?"


def test_gsm8k_answer_format(cfg, tmp_path: Path) -> None:
    path = tmp_path / "gsm.parquet"
    pd.DataFrame(
        {"question": ["Tom has 2 apples and buys 1,000 more. How many?"], "answer": ["2 + 1000 = 1002\n#### 1,002"]}
    ).to_parquet(path)
    bcfg = BenchmarkConfig(name="gsm8k", source="file", path=str(path), answer_format="gsm8k")
    (question,) = load_benchmark(bcfg, cfg)
    assert question.answer == "1002"


def test_file_missing_column_is_named(cfg, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "What is 1 + 1?", "answer": "2"}])
    bcfg = BenchmarkConfig(name="math500", source="file", path=path, question_column="problem")
    with pytest.raises(ValueError, match=r"math500.*'problem'"):
        load_benchmark(bcfg, cfg)


def test_preference_source_is_not_a_question_set(cfg) -> None:
    with pytest.raises(ValueError, match="load_preference_set"):
        load_benchmark(BenchmarkConfig(name="rb2", source="preference", path="x.jsonl"), cfg)


def test_missing_path(cfg) -> None:
    with pytest.raises(ValueError, match="path is required"):
        load_benchmark(BenchmarkConfig(name="x", source="file"), cfg)


def test_preference_set_rewardbench2_lists(tmp_path: Path) -> None:
    # RewardBench2 stores chosen/rejected as lists: the first entry is used.
    path = tmp_path / "rb2.parquet"
    pd.DataFrame(
        {
            "id": ["a1", "a2"],
            "prompt": ["What is 1 + 1?", "Name a colour."],
            "chosen": [["2", "two"], ["Blue."]],
            "rejected": [["3", "4", "5"], ["Seven.", "Cat."]],
        }
    ).to_parquet(path)
    bcfg = BenchmarkConfig(name="rb2", source="preference", path=str(path), question_column="prompt")
    pairs = load_preference_set(bcfg)
    assert pairs == [
        PreferencePair("What is 1 + 1?", "2", "3", "a1"),
        PreferencePair("Name a colour.", "Blue.", "Seven.", "a2"),
    ]


def test_preference_set_jsonl_custom_columns_and_limit(tmp_path: Path) -> None:
    rows = [{"q": f"Q{i}", "good": f"G{i}", "bad": f"B{i}"} for i in range(5)]
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    bcfg = BenchmarkConfig(
        name="p", source="preference", path=path, question_column="q", chosen_column="good",
        rejected_column="bad", limit=3,
    )
    pairs = load_preference_set(bcfg)
    assert [(p.prompt, p.chosen, p.rejected, p.pair_id) for p in pairs] == [
        ("Q0", "G0", "B0", "0"), ("Q1", "G1", "B1", "1"), ("Q2", "G2", "B2", "2"),
    ]


def test_preference_set_missing_column_is_named(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "Q", "chosen": "A"}])
    bcfg = BenchmarkConfig(name="prefs", source="preference", path=path, question_column="prompt")
    with pytest.raises(ValueError, match=r"prefs.*'rejected'.*columns: prompt, chosen"):
        load_preference_set(bcfg)


def test_preference_set_empty_response_is_rejected(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "Q", "chosen": [], "rejected": "B"}])
    bcfg = BenchmarkConfig(name="prefs", source="preference", path=path, question_column="prompt")
    with pytest.raises(ValueError, match=r"row 0 .*'chosen'"):
        load_preference_set(bcfg)


def test_preference_set_subset_filter(tmp_path: Path) -> None:
    # RewardBench2 mixes subsets; eval can keep only e.g. the Math subset.
    rows = [
        {"prompt": "P0", "chosen": "c0", "rejected": "r0", "subset": "Math"},
        {"prompt": "P1", "chosen": "c1", "rejected": "r1", "subset": "Safety"},
        {"prompt": "P2", "chosen": "c2", "rejected": "r2", "subset": "Math"},
    ]
    path = write_jsonl(tmp_path / "rb2.jsonl", rows)
    bcfg = BenchmarkConfig(
        name="rb2-math", source="preference", path=path, question_column="prompt",
        subset_column="subset", subset_values=["Math"],
    )
    assert [p.prompt for p in load_preference_set(bcfg)] == ["P0", "P2"]
    missing = bcfg.model_copy(update={"subset_column": "category"})
    with pytest.raises(ValueError, match="category"):
        load_preference_set(missing)
