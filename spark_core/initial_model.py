"""The model a run starts from: `model.source`, warm-started on the run's output formats when configured.

`models.load_model_and_tokenizer` knows only model configs and folders; a warm start also needs the
whole run config (it learns the run's prompt formats, `spark_core.warm_start`), so the choice is made
here, one level up, and `models` never imports `warm_start` (which builds on `models`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .config import SparkConfig
from .models import load_model_and_tokenizer


def initial_weights_folder(cfg: SparkConfig) -> Path | None:
    """The local folder of the run's starting weights when they are built by the project, else None."""
    if cfg.model.source == "tiny" and cfg.model.warm_start is not None:
        from .warm_start import warm_start_folder

        return warm_start_folder(cfg)
    return None


def load_initial_model(cfg: SparkConfig, device: str | torch.device | None = None,
                       path: str | Path | None = None) -> tuple[Any, Any]:
    """Model and tokenizer of `path` if given, else of the run's starting weights."""
    return load_model_and_tokenizer(cfg.model, path=path or initial_weights_folder(cfg), device=device)
