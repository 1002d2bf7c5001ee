"""Verified rollouts as training sequences: left-padded micro-batches and their completion log-probs.

Sequences are LEFT-padded with explicit position ids, so every completion ends at the last position
and the model's ``logits_to_keep`` skips the vocabulary projection (and the log-softmax) of all prompt
positions, the bulk of the tokens when prompts carry few-shot examples. Two ways to cut a mini-batch
into micro-batches: length-sorted (least padding; the same number on every rank, see
``lockstep_micro_batches``) or by prompt (``prompt_group_micro_batches``: the completions of a prompt
together, so the training forward can run the prompt once). The loss is a token-sum over the whole
mini-batch, so neither changes the update beyond float rounding.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .multimodal_batch import multimodal_inputs
from .prefix_scoring import picked_logprobs


@dataclass
class TrainSequence:
    """One rollout ready for training: prompt+completion ids and per-completion-token log-probs."""

    ids: list[int]
    prompt_len: int
    advantage: float
    reward: float
    old_logp: torch.Tensor | None = None  # [num_tokens] float32 on CPU
    ref_logp: torch.Tensor | None = None
    vision: dict[str, torch.Tensor] | None = None  # pixel_values + image_grid_thw of the prompt's images

    @property
    def num_tokens(self) -> int:
        return len(self.ids) - self.prompt_len


def filler(template: TrainSequence) -> TrainSequence:
    """A one-token sequence with no completion: a forward/backward that adds nothing to the loss, run
    by a rank whose share of a mini-batch is short so that all ranks make the same collective calls."""
    return TrainSequence(template.ids[:1], 1, 0.0, 0.0)


@dataclass
class MicroBatch:
    """A left-padded micro-batch; per-token tensors cover its last K positions (the completions)."""

    input_ids: torch.Tensor  # [n, T]
    attention_mask: torch.Tensor  # [n, T]
    position_ids: torch.Tensor  # [n, T]
    completion_mask: torch.Tensor  # [n, K] bool, K = longest completion
    advantages: torch.Tensor  # [n]
    old_logp: torch.Tensor | None  # [n, K]
    ref_logp: torch.Tensor | None  # [n, K]
    vision: dict[str, torch.Tensor] | None = None  # the rows' images, concatenated (spark_core.vision)


def collate(seqs: list[TrainSequence], device: torch.device, pad_id: int) -> MicroBatch:
    """Left-pad so every completion ends at the last position; position ids restart at each
    sequence's first real token (what the model saw when it generated, whatever the padding)."""
    n = len(seqs)
    width = max(len(s.ids) for s in seqs)
    keep = max(s.num_tokens for s in seqs)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    attn = torch.zeros((n, width), dtype=torch.long)
    comp = torch.zeros((n, keep), dtype=torch.bool)
    old = torch.zeros((n, keep)) if any(s.old_logp is not None for s in seqs) else None
    ref = torch.zeros((n, keep)) if any(s.ref_logp is not None for s in seqs) else None
    for i, s in enumerate(seqs):
        length, count = len(s.ids), s.num_tokens
        ids[i, width - length :] = torch.tensor(s.ids, dtype=torch.long)
        attn[i, width - length :] = 1
        if count:
            comp[i, keep - count :] = True
            if old is not None:
                old[i, keep - count :] = s.old_logp
            if ref is not None:
                ref[i, keep - count :] = s.ref_logp
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    adv = torch.tensor([s.advantage for s in seqs], dtype=torch.float32)
    return MicroBatch(
        ids.to(device),
        attn.to(device),
        pos.to(device),
        comp.to(device),
        adv.to(device),
        None if old is None else old.to(device),
        None if ref is None else ref.to(device),
        multimodal_inputs(seqs, device),
    )


def completion_logprobs(model: torch.nn.Module, batch: MicroBatch, temperature: float = 1.0) -> torch.Tensor:
    """Log-probs of the completion tokens of a left-padded batch: ``[n, K]``, zero outside the mask.

    ``logits_to_keep`` asks the model for the last ``K + 1`` positions only (a model that ignores it
    returns every position; the slice below then drops the rest). Logits are divided by the sampling
    ``temperature`` and turned into log-probs in float32, a few rows at a time.
    """
    width = batch.completion_mask.shape[1]
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        # with images the model derives its multimodal (3-D) positions from the ids and image grids
        position_ids=None if batch.vision else batch.position_ids,
        use_cache=False,
        logits_to_keep=width + 1,
        **(batch.vision or {}),
    )
    logits = out.logits[:, -(width + 1) : -1]  # the logits at t-1 predict the token at t
    targets = batch.input_ids[:, batch.input_ids.shape[1] - width :]
    lp = picked_logprobs(logits, targets, temperature)
    # where, not a product: whatever a masked position holds (a padding row's values included) can
    # then reach neither the loss nor its gradient
    return torch.where(batch.completion_mask, lp, torch.zeros_like(lp))


def in_chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def lockstep_micro_batches(total: int, world_size: int, micro_batch_size: int) -> int:
    """Micro-batches EVERY rank runs for a mini-batch of ``total`` sequences: enough for the largest
    shard (strided shards differ in size by at most one), and at least one."""
    largest_shard = math.ceil(total / world_size)
    return max(1, math.ceil(largest_shard / micro_batch_size))


def length_sorted_micro_batches(seqs: list[TrainSequence], size: int, count: int, template: TrainSequence) -> list[list[TrainSequence]]:
    """``seqs`` sorted by length (less padding) in chunks of ``size``, then filler chunks up to ``count``."""
    ordered = sorted(seqs, key=lambda s: len(s.ids))
    out = list(in_chunks(ordered, size))
    if len(out) > count:
        raise AssertionError(f"{len(seqs)} sequences need {len(out)} micro-batches, more than the {count} planned")
    return out + [[filler(template)] for _ in range(count - len(out))]


def prompt_group_micro_batches(seqs: list[TrainSequence], size: int) -> list[list[TrainSequence]]:
    """Micro-batches of at most ``size`` sequences that keep the completions of one prompt together, so
    that each prompt is forwarded once for all of them; groups in order of prompt length (less padding),
    a group larger than ``size`` split into pieces of ``size``."""
    groups: dict[tuple[int, ...], list[TrainSequence]] = {}
    for s in seqs:
        groups.setdefault(tuple(s.ids[: s.prompt_len]), []).append(s)
    out: list[list[TrainSequence]] = []
    current: list[TrainSequence] = []
    for group in sorted(groups.values(), key=lambda g: g[0].prompt_len):  # stable: ties keep batch order
        for piece in in_chunks(group, size):
            if current and len(current) + len(piece) > size:
                out.append(current)
                current = []
            current += piece
    return out + [current] if current else out
