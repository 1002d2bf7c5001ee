"""The trainer's multimodal additions, kept out of trainer.py: which rows carry images, and a
micro-batch's vision tensors (``pixel_values`` and ``image_grid_thw`` of its rows, in row order).

Rows of a vision-language run carry an ``images`` column of references (``spark_core.images``); the
trainer's ``vision`` (a ``spark_core.vision.VisionInputs`` with a store loader) expands each prompt's
image placeholders exactly as the engine did, so the scored ids equal the sampled context.
"""

from __future__ import annotations

from typing import Any, Sequence

import pandas as pd


def multimodal_images(rows: pd.DataFrame, vision: Any) -> list[tuple[str, ...]] | None:
    """Each row's image references, or None when no row has any (a text phase: nothing changes)."""
    if "images" not in rows.columns:
        return None
    refs = [tuple(r) if r is not None else () for r in rows["images"]]
    if not any(refs):
        return None
    if vision is None:
        raise ValueError("rows carry images but the trainer has no image inputs (is the model a vision-language model?)")
    return refs


def multimodal_inputs(seqs: Sequence[Any], device: Any) -> dict[str, Any] | None:
    """The micro-batch's vision tensors for the forward pass, or None for a text-only micro-batch."""
    if not any(getattr(s, "vision", None) is not None for s in seqs):
        return None
    from .vision import collate_vision

    return collate_vision([s.vision for s in seqs], device)
