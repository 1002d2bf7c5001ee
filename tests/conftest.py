"""Shared test setup: no hub access, modest CPU threads, the tiny preset and its model.

Fixtures:
- `tiny_cfg` (session): `load_config(preset="tiny")` with the store and the model cache in a session
  temporary folder. Shared by every test: treat it as read-only and copy it before changing it
  (`cfg = tiny_cfg.model_copy(deep=True)`).
- `tiny_model_and_tokenizer` (per test): a fresh copy of the tiny model (float32, CPU) and its tokenizer,
  loaded from the session's cached build, so a test may train or modify it freely.
"""

from __future__ import annotations

import os

# Set before transformers / tokenizers are imported anywhere: nothing in the tests may reach a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from spark_core.config import SparkConfig, load_config  # noqa: E402

# The test machines have few cores shared by several processes; more threads only add contention.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_cfg(tmp_path_factory: pytest.TempPathFactory) -> SparkConfig:
    root = tmp_path_factory.mktemp("tiny")
    return load_config(
        preset="tiny",
        overrides={
            "store": {"uri": str(root / "store")},
            "model": {"cache_dir": str(root / "models")},
        },
    )


@pytest.fixture
def tiny_model_and_tokenizer(tiny_cfg: SparkConfig) -> tuple:
    from spark_core.initial_model import load_initial_model

    return load_initial_model(tiny_cfg, device="cpu")
