"""Completion log-probs with each shared prompt forwarded once.

GRPO scores K completions of the same prompt. A plain forward over the K prompt+completion sequences
processes the prompt K times; here a first pass runs each distinct prompt once with the KV cache on,
the cache rows are then repeated for every completion of that prompt, and a second pass runs only the
completion tokens on top of it. The first completion token's log-prob comes from the prompt pass's last
position. Same model, same positions, same masks: the values equal a full forward up to float rounding
(the attention kernels sum in another order; see tests/unit/test_trainer.py for the tolerance).

Both passes are differentiable (the cache rows are gathered with ``index_select`` and extended with
``cat``), so the same trick serves the training forward: gradients reach the prompt's activations once,
summed over its completions, which is what K separate forwards would accumulate.

Used by ``Trainer._score`` (reference log-probs, ``shared_prompt_logprobs``, no gradients) and by the
training forward (``shared_prompt_logprobs_with_grad``) in a single process; under several ranks the
trainer keeps its lockstep full forwards (a sharded model needs the same calls on every rank). Each
user (reference, training forward, the hf engine's prefill) takes this path only where ``worth_sharing``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import torch

# Float32 logits handled per log-softmax call (64M floats = 256 MB): a full-vocabulary float32 copy of a
# large micro-batch never exists at once. Shared by the trainer's forward (with gradients) and this module.
_LOGSOFTMAX_CHUNK = 64 * 1024 * 1024


def cache_keyword() -> str:
    """The model-forward keyword (and output field) of the KV cache: `cache` in recent transformers 5.x,
    `past_key_values` before (deprecated, removed in 5.40)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


# Forward FLOPs (2 x parameters x prompt tokens not recomputed) a batch must save before its prompts are
# run once (training forward, sampling prefill): below it the extra, small forward call costs more than it
# saves. CPU, measured (`bench/step.py`, 2 cores): the tiny test model saves 0.04 GFLOP per mini-batch
# and its train phase took 1.08x the time; SmolLM2-135M saves ~190 GFLOP and took 0.55x. CUDA (and any
# other accelerator): an estimate, about 5 ms of a large GPU's matmul throughput, the order of a forward
# call's launch overhead; not measured here.
MIN_SAVED_FLOPS = {"cpu": 1e9, "cuda": 2e12}


def worth_sharing(num_params: int, saved_tokens: int, device: torch.device) -> bool:
    """Whether not recomputing ``saved_tokens`` prompt tokens of a ``num_params`` model pays for a
    second forward call on ``device`` (see ``MIN_SAVED_FLOPS``)."""
    return saved_tokens > 0 and 2 * num_params * saved_tokens >= MIN_SAVED_FLOPS[
        "cpu" if device.type == "cpu" else "cuda"]


def repeated_prompt_tokens(prompts: Sequence[tuple[int, ...]]) -> int:
    """Prompt tokens a forward per sequence computes again (0 when no prompt repeats): what running each
    distinct prompt once saves, for ``worth_sharing``."""
    return sum(len(p) for p in prompts) - sum(len(p) for p in set(prompts))


def picked_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / temperature) at `targets`, in float32, a few rows at a time. [n, T].
    Differentiable: the trainer's completion log-probs go through it too."""
    if logits.shape[0] == 0:
        return torch.zeros(targets.shape, dtype=torch.float32, device=targets.device)
    # Zero-width rows still go through the ops below: the result stays part of the autograd graph.
    per_row = max(1, logits[0].numel())
    rows = max(1, _LOGSOFTMAX_CHUNK // per_row)
    parts = []
    for start in range(0, logits.shape[0], rows):
        chunk = logits[start : start + rows].float()
        if temperature != 1.0:
            chunk = chunk / temperature
        picked = chunk.gather(-1, targets[start : start + rows].unsqueeze(-1)).squeeze(-1)
        parts.append(picked - torch.logsumexp(chunk, dim=-1))
    return torch.cat(parts)


@torch.no_grad()
def shared_prompt_logprobs(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    *,
    pad_id: int,
    device: torch.device,
    temperature: float = 1.0,
    max_sequences: int = 16,
    autocast: Callable[[], AbstractContextManager[object]] | None = None,
) -> list[torch.Tensor]:
    """Log-probs (float32, CPU) of each completion given its prompt, one tensor per sequence.

    Sequences are grouped by prompt; a forward pair (prompts, then completions) takes whole groups up to
    ``max_sequences`` completions (a larger group goes alone)."""
    groups = _prompt_groups(prompts, completions)
    out: list[torch.Tensor | None] = [None] * len(prompts)
    batch: list[tuple[tuple[int, ...], list[int]]] = []

    def score(batch: list[tuple[tuple[int, ...], list[int]]]) -> None:
        for i, lp in _group_logprobs(model, batch, completions, pad_id, device, temperature, autocast):
            out[i] = lp.float().cpu()

    for group in groups.items():
        if batch and sum(len(m) for _, m in batch) + len(group[1]) > max_sequences:
            score(batch)
            batch = []
        batch.append(group)
    if batch:
        score(batch)
    scored = [t for t in out if t is not None]
    assert len(scored) == len(out), "every sequence belongs to one group"
    return scored


def shared_prompt_logprobs_with_grad(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    *,
    pad_id: int,
    device: torch.device,
    temperature: float = 1.0,
) -> list[torch.Tensor]:
    """Log-probs (float32, on ``device``, part of the autograd graph) of each completion given its prompt,
    one tensor per sequence: all sequences in one forward pair (a training micro-batch; callers keep the
    completions of a prompt in the same micro-batch, or nothing is shared)."""
    groups = _prompt_groups(prompts, completions)
    got = dict(_group_logprobs(model, list(groups.items()), completions, pad_id, device, temperature, None))
    return [got[i] for i in range(len(prompts))]


def _prompt_groups(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]]
                   ) -> dict[tuple[int, ...], list[int]]:
    """prompt ids -> the indices of its sequences, in first-seen order."""
    if len(prompts) != len(completions):
        raise ValueError("one prompt per completion")
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"sequence {i}: empty prompt")
        groups.setdefault(tuple(int(t) for t in p), []).append(i)
    return groups


def _group_logprobs(model: torch.nn.Module, batch: list[tuple[tuple[int, ...], list[int]]],
                    completions: Sequence[Sequence[int]], pad_id: int, device: torch.device, temperature: float,
                    autocast: Callable[[], AbstractContextManager[object]] | None
                    ) -> list[tuple[int, torch.Tensor]]:
    """(sequence index, completion log-probs) for every member of the groups: one prompt pass, one
    completion pass. Gradients flow when the caller has them on."""
    ctx = autocast or contextlib.nullcontext
    # Prompt pass: the distinct prompts, left-padded (as the trainer's own batches).
    g = len(batch)
    width = max(len(p) for p, _ in batch)
    ids = torch.full((g, width), pad_id, dtype=torch.long)
    attn = torch.zeros((g, width), dtype=torch.long)
    for row, (p, _) in enumerate(batch):
        ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        attn[row, width - len(p) :] = 1
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    with ctx():
        first = model(input_ids=ids.to(device), attention_mask=attn.to(device), position_ids=pos.to(device),
                      use_cache=True, logits_to_keep=1)
    members = [(row, i) for row, (_, idx) in enumerate(batch) for i in idx]
    rows = torch.tensor([row for row, _ in members], dtype=torch.long)
    lengths = [len(completions[i]) for _, i in members]
    span = max(lengths)
    # The first completion token is predicted by the prompt's last position.
    first_targets = torch.tensor([[int(completions[i][0]) if lengths[k] else pad_id] for k, (_, i) in
                                  enumerate(members)], dtype=torch.long, device=device)
    head = picked_logprobs(first.logits[:, -1:][rows.to(first.logits.device)], first_targets, temperature)
    tail = torch.zeros((len(members), max(0, span - 1)), dtype=torch.float32, device=device)
    if span > 1:
        # Completion pass: every completion (right-padded) on its prompt's cache rows.
        name = cache_keyword()
        cache = getattr(first, name)
        cache.reorder_cache(rows.to(device))
        comp = torch.full((len(members), span), pad_id, dtype=torch.long)
        comp_attn = torch.zeros((len(members), span), dtype=torch.long)
        for k, (_, i) in enumerate(members):
            comp[k, : lengths[k]] = torch.tensor([int(t) for t in completions[i]], dtype=torch.long)
            comp_attn[k, : lengths[k]] = 1
        prompt_len = attn.sum(-1)[rows]
        comp_pos = prompt_len[:, None] + torch.arange(span)[None, :]
        with ctx():
            second = model(input_ids=comp.to(device), attention_mask=torch.cat([attn[rows], comp_attn], 1).to(device),
                           position_ids=comp_pos.to(device), use_cache=True, **{name: cache})
        # Logits at completion position j predict token j + 1.
        tail = picked_logprobs(second.logits[:, : span - 1], comp[:, 1:].to(device), temperature)
        del cache
    return [(i, torch.cat([head[k, : min(lengths[k], 1)], tail[k, : max(0, lengths[k] - 1)]]))
            for k, (_, i) in enumerate(members)]
