"""Trainer state on disk: the state file inside a checkpoint, and the optimizer state in the one format a
single process writes whatever the number of ranks (parameters by index), converted from and to the
parameter-name-keyed format FSDP gathers and scatters."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "trainer_state.pt"  # inside checkpoint/trainer_state/


def write_state(path: Path, state: dict[str, Any]) -> None:
    """Write the trainer state through a temporary file, so a crash never leaves half a state file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".pt.tmp")
    # No CRC32 per zip record: the manifest holds this file's sha256 (checked when a remote checkpoint
    # is downloaded), and the CRC took longer than the write itself (0.98 vs 0.40 s per GB,
    # docs/performance.md). torch.load reads such a file as usual. (set_crc32_options: torch >= 2.6.)
    crc = getattr(torch.serialization, "get_crc32_options", lambda: None)()
    if crc is not None:
        torch.serialization.set_crc32_options(False)
    try:
        torch.save(state, tmp)
    finally:
        if crc is not None:
            torch.serialization.set_crc32_options(crc)
    os.replace(tmp, path)


def read_state(path: Path) -> dict[str, Any]:
    """What ``write_state`` wrote (tensors on the CPU)."""
    if not path.exists():
        raise FileNotFoundError(f"no trainer state at {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def is_sharded(model: torch.nn.Module) -> bool:
    """FSDP (v1 wrapper or v2 ``fully_shard``): parameters and optimizer state are split over ranks."""
    from torch.distributed import fsdp  # noqa: PLC0415

    kinds = tuple(k for k in (getattr(fsdp, "FullyShardedDataParallel", None), getattr(fsdp, "FSDPModule", None)) if k)
    return bool(kinds) and isinstance(model, kinds)


def optimizer_state_to_indexed(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """A parameter-NAME-keyed optimizer state (``torch.distributed.checkpoint.state_dict``'s format) in
    the index-keyed format of ``Optimizer.state_dict()`` (index = position in ``names``), so a state
    gathered from FSDP ranks is the same file a single process writes."""
    index = {name: i for i, name in enumerate(names)}
    missing = [k for k in state["state"] if k not in index]
    if missing:
        raise ValueError(f"optimizer state holds parameters the trainer does not train: {missing[:3]}")
    return {
        "state": {index[k]: v for k, v in state["state"].items()},
        "param_groups": [{**g, "params": [index[k] for k in g["params"]]} for g in state["param_groups"]],
    }


def optimizer_state_to_named(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The inverse of ``optimizer_state_to_indexed``."""
    return {
        "state": {names[int(k)]: v for k, v in state["state"].items()},
        "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in state["param_groups"]],
    }
