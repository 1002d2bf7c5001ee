"""Bad training data is found before anything starts, with the file and the line or row in the message.

Each case of BAD_INPUTS is one row of the bad-input table in docs/reliability.md; with
SPARK_BAD_INPUT_TABLE=path the test appends the message the user actually sees to that file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spark_core.config import DataConfig
from spark_core.data import check_data_source, read_questions
from spark_core.data_checks import MAX_TEXT_CHARS, DataError

REPO = Path(__file__).resolve().parents[2]


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


GOOD = [{"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(5)]


def _broken_line_4(p: Path) -> Path:
    lines = _jsonl(GOOD).splitlines()
    lines[3] = '{"question": "What is 3 + 1?", "answer": '  # cut off mid-object
    p.write_text("\n".join(lines) + "\n")
    return p


def _corrupt_parquet(p: Path) -> Path:
    buf = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(GOOD), buf)
    data = buf.getvalue().to_pybytes()
    p.write_bytes(data[: len(data) // 2])  # a truncated upload
    return p


def _non_utf8(p: Path) -> Path:
    text = _jsonl(GOOD).encode()
    lines = text.splitlines(keepends=True)
    lines[2] = '{"question": "Combien font 2 + 1 ? caf'.encode() + b"\xe9" + b'", "answer": "3"}\n'  # Latin-1
    p.write_bytes(b"".join(lines))
    return p


def _rows(rows: list[dict]) -> Callable[[Path], Path]:
    def make(p: Path) -> Path:
        p.write_text(_jsonl(rows))
        return p
    return make


def _text(text: str) -> Callable[[Path], Path]:
    def make(p: Path) -> Path:
        p.write_text(text)
        return p
    return make


# (case id, what the user did, file name, how to make it, config overrides, a regex the message must match)
BAD_INPUTS = [
    ("broken-jsonl-line", "JSONL with line 4 cut off", "q.jsonl", _broken_line_4, {},
     r"q\.jsonl: line 4, column \d+: not valid JSON"),
    ("corrupt-parquet", "Parquet file truncated to half", "q.parquet", _corrupt_parquet, {},
     r"q\.parquet: not a readable Parquet file"),
    ("non-utf8", "Latin-1 byte on line 3", "q.jsonl", _non_utf8, {},
     r"q\.jsonl: line 3, column 39: not UTF-8 \(byte 0xe9\)"),
    ("missing-column", "no `question` column", "q.jsonl", _rows([{"prompt": "1+1?", "answer": "2"}]), {},
     r"q\.jsonl: column 'question' \(question_column\) not found; available columns: prompt, answer"),
    ("wrong-type", "a number as the answer", "q.jsonl", _rows([GOOD[0], {"question": "2+2?", "answer": 4}]), {},
     r"q\.jsonl: line 2, row 1: answer in column 'answer' is int, not a string"),
    ("empty-question", "a blank question", "q.jsonl", _rows([GOOD[0], GOOD[1], {"question": "  ", "answer": "1"}]), {},
     r"q\.jsonl: line 3, row 2: empty or missing question"),
    ("duplicate-question", "the same question twice", "q.jsonl", _rows([GOOD[0], GOOD[1], dict(GOOD[0])]), {},
     r"q\.jsonl: line 3, row 2: duplicate question \(same text as line 1, row 0\)"),
    ("huge-row", f"a question over {MAX_TEXT_CHARS:,} characters", "q.jsonl",
     _rows([GOOD[0], {"question": "x" * (MAX_TEXT_CHARS + 1), "answer": "1"}]), {},
     r"q\.jsonl: line 2, row 1: question is 100,001 characters long \(at most 100,000\)"),
    ("not-an-object", "a JSON array on a line", "q.jsonl", _text(_jsonl(GOOD[:2]) + "[1, 2]\n"), {},
     r"q\.jsonl: line 3, row 2: expected a JSON object, got list"),
    ("empty-file", "an empty file", "q.jsonl", _text(""), {}, r"q\.jsonl: the file has no rows"),
    ("csv-missing-answer", "CSV with an empty answer cell", "q.csv", _text("question,answer\n1+1?,2\n2+2?,\n"),
     {}, r"q\.csv: row 1: answer is empty"),
    ("gsm8k-no-marker", "answer_format gsm8k, an answer without ####", "q.jsonl",
     _rows([{"question": "a?", "answer": "#### 3"}, {"question": "b?", "answer": "3"}]),
     {"answer_format": "gsm8k"}, r"q\.jsonl: line 2, row 1: answer has no '####' marker"),
    ("missing-file", "a path that does not exist", "nope.jsonl", None, {}, r"nope\.jsonl: file not found"),
    ("unsupported-type", "an Excel file", "q.xlsx", _text("PK"), {}, r"q\.xlsx: unsupported file type"),
]


def _record(case: str, what: str, message: str) -> None:
    table = os.environ.get("SPARK_BAD_INPUT_TABLE")
    if table:
        with open(table, "a") as fh:
            fh.write(json.dumps({"case": case, "input": what, "message": message}) + "\n")


@pytest.mark.parametrize("case, what, name, make, overrides, expected", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_named_with_file_and_place(tmp_path: Path, case, what, name, make, overrides, expected) -> None:
    path = make(tmp_path / name) if make else tmp_path / name
    cfg = DataConfig(source="file", path=str(path), **overrides)
    with pytest.raises(DataError, match=expected) as err:
        check_data_source(cfg)
    assert str(err.value).startswith(str(path)), "the message must start with the file"
    _record(case, what, str(err.value).replace(str(tmp_path) + "/", ""))


def test_csv_is_accepted_and_keeps_answers_as_written(tmp_path: Path) -> None:
    path = tmp_path / "set.csv"
    path.write_text('question,answer,extra\n"What is 1, plus 6?",007,x\nWhat is 2 + 2?,4,y\n')
    questions, skipped = read_questions("file", str(path))
    assert skipped == 0
    assert [(q.question, q.answer) for q in questions] == [("What is 1, plus 6?", "007"), ("What is 2 + 2?", "4")]
    assert check_data_source(DataConfig(source="file", path=str(path))) == 2


def test_skip_mode_skips_duplicates_and_huge_rows(tmp_path: Path) -> None:
    path = tmp_path / "q.jsonl"
    path.write_text(_jsonl([GOOD[0], dict(GOOD[0]), {"question": "y" * (MAX_TEXT_CHARS + 1), "answer": "1"}, GOOD[1]]))
    assert check_data_source(DataConfig(source="file", path=str(path), on_bad_row="skip")) == 2


def test_benchmarks_keep_repeated_questions(tmp_path: Path) -> None:
    path = tmp_path / "bench.jsonl"
    path.write_text(_jsonl([GOOD[0], dict(GOOD[0])]))
    questions, skipped = read_questions("file", str(path))  # reject_duplicates is for training data only
    assert len(questions) == 2 and skipped == 0


def test_a_utf8_bom_is_not_data(tmp_path: Path) -> None:
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbfquestion,answer\n1+1?,2\n")
    questions, _ = read_questions("file", str(path))
    assert questions[0].question == "1+1?"


def test_cli_run_rejects_bad_data_with_exit_2_before_prefect_starts(tmp_path: Path) -> None:
    """`spark run` on a broken file: one line naming file and line, exit 2, no Prefect server started."""
    bad = _broken_line_4(tmp_path / "q.jsonl")
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "HF_HUB_OFFLINE": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    proc = subprocess.run(
        [sys.executable, "-m", "spark_cli", "run", "--preset", "tiny", "--store", str(tmp_path / "store"),
         "--set", "data.source=file", "--set", f"data.path={bad}"],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("error: ") and f"{bad}: line 4, column" in line, line
    assert "ephemeral" not in (proc.stdout + proc.stderr).lower()  # no temporary Prefect server was started
    assert not (tmp_path / "store" / "runs").exists()  # nothing written
    _record("cli-run", "`spark run` on the JSONL with line 4 cut off", line.replace(str(tmp_path) + "/", ""))


def test_an_hf_dataset_that_cannot_be_loaded_is_a_data_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing is downloaded: the id is simply not in the cache
    cfg = DataConfig(source="hf", path="no-such-org/no-such-dataset-rel12")
    with pytest.raises(DataError, match=r"^no-such-org/no-such-dataset-rel12: cannot load the HF dataset \("):
        check_data_source(cfg)
