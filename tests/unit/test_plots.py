"""The metrics plot writes a real PNG."""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from spark_core.plots import metrics_plot

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "iteration": [0, 1, 2, 0, 1, 2],
            "benchmark": ["arith"] * 3 + ["gsm8k"] * 3,
            "accuracy": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
            "accuracy_reflect": [0.15, 0.25, 0.35, None, None, None],  # reflection off for gsm8k
            "judge_f1": [0.0, 0.3, 0.6, 0.2, 0.4, 0.5],
        }
    )


def test_writes_png_file(tmp_path: Path) -> None:
    path = tmp_path / "metrics.png"
    metrics_plot(frame(), path)
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC)
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] > 300 and img.size[1] > 200


def test_writes_to_buffer_and_handles_empty() -> None:
    buf = io.BytesIO()
    metrics_plot(frame().iloc[0:0], buf)
    assert buf.getvalue().startswith(PNG_MAGIC)


def test_missing_column() -> None:
    with pytest.raises(ValueError, match="judge_f1"):
        metrics_plot(frame().drop(columns=["judge_f1"]), io.BytesIO())
