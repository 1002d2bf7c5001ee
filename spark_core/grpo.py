"""GRPO maths as pure torch functions: group advantages, the k3 KL estimator and the clipped loss (the
per-token log-probs of completions are ``trainer.completion_logprobs``).

Conventions used throughout:

* Token tensors have shape ``[B, T]`` and are aligned with ``input_ids``: position ``t`` holds the
  value for token ``input_ids[:, t]`` (its log-prob given the tokens before it). ``mask`` is 1 on the
  completion tokens that are trained on and 0 on prompt and padding tokens.
* Advantages are per sequence (``[B]``, broadcast over tokens) or already per token (``[B, T]``).
* The loss is a TOKEN-LEVEL mean: the sum over every valid token of the batch divided by the number
  of valid tokens, so a long completion weighs more than a short one (as in the SPARK recipe). Micro-batching
  keeps this exact by passing ``num_tokens`` = the valid tokens of the whole optimizer mini-batch to
  every micro-batch's call; the summed gradients then equal those of one big batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

# Guard against exp() overflow in k3 when the policy drifts far from the reference; |log ratio| this
# large never occurs in healthy training, so the clamp does not change normal values.
_KL_LOG_RATIO_CLAMP = 20.0


def _group_index(group_ids: Sequence[Any] | torch.Tensor, n: int) -> torch.Tensor:
    """Map arbitrary group keys to dense integer ids 0..G-1 (order of first appearance)."""
    keys = group_ids.tolist() if isinstance(group_ids, torch.Tensor) else list(group_ids)
    if len(keys) != n:
        raise ValueError(f"group_ids has {len(keys)} entries but rewards has {n}")
    dense: dict[Any, int] = {}
    return torch.tensor([dense.setdefault(k, len(dense)) for k in keys], dtype=torch.long)


def group_advantages(
    rewards: torch.Tensor, group_ids: Sequence[Any] | torch.Tensor, eps: float = 1e-9
) -> torch.Tensor:
    """GRPO advantages ``(r - mean_group) / (std_group + eps)``, one per sequence.

    The group standard deviation uses the UNBIASED estimator (divide by K-1), as ``torch.std`` does
    by default and as the reference implementation does. A group whose rewards all agree has advantage
    exactly 0 (its numerator is 0). A group of one sequence has no spread to measure (its unbiased std
    is undefined); its advantage is 0 as well.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D, got shape {tuple(rewards.shape)}")
    r = rewards.detach().to(torch.float64)
    idx = _group_index(group_ids, r.numel()).to(r.device)
    groups = int(idx.max()) + 1 if r.numel() else 0
    count = torch.zeros(groups, dtype=r.dtype, device=r.device).index_add_(0, idx, torch.ones_like(r))
    mean = torch.zeros_like(count).index_add_(0, idx, r) / count
    centred = r - mean[idx]
    sq = torch.zeros_like(count).index_add_(0, idx, centred**2)
    std = torch.sqrt(sq / (count - 1).clamp(min=1))
    adv = centred / (std[idx] + eps)
    adv = torch.where(count[idx] > 1, adv, torch.zeros_like(adv))
    return adv.to(rewards.dtype if rewards.is_floating_point() else torch.float32)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(policy || reference): ``exp(d) - d - 1`` with ``d = ref - logp``.

    Non-negative, unbiased for the KL under samples from the policy, and zero where they agree.
    """
    d = (ref_logp - logp).clamp(-_KL_LOG_RATIO_CLAMP, _KL_LOG_RATIO_CLAMP)
    return torch.exp(d) - d - 1.0


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.001,
    num_tokens: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-clipped GRPO loss with an optional k3 KL penalty, averaged over tokens.

    Per token: ``ratio = exp(logp - old_logp)``, ``pg = -min(ratio * A, clip(ratio, 1-eps, 1+eps) * A)``;
    plus ``kl_coef * k3(logp, ref_logp)`` when ``ref_logp`` is given. Both are summed over valid tokens
    and divided by ``num_tokens`` (default: the valid tokens in ``mask``).

    When an optimizer mini-batch is split into micro-batches, pass the mini-batch's total valid-token
    count as ``num_tokens`` to every micro-batch: the losses (and the returned stats) then add up to the
    mini-batch values, and accumulated gradients equal one big batch's.

    Returns ``(loss, stats)``; stats are floats with the same normaliser: ``pg_loss``, ``kl`` (the
    unweighted k3 mean; 0.0 without a reference) and ``clip_frac`` (share of tokens where the clipped
    branch is active, i.e. ratio > 1+eps with A > 0 or ratio < 1-eps with A < 0: no gradient flows there).
    """
    if logp.shape != old_logp.shape or logp.shape != mask.shape:
        raise ValueError(
            f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)} and mask {tuple(mask.shape)} "
            "must have the same shape"
        )
    maskf = mask.to(logp.dtype)
    adv = advantages.to(logp.dtype)
    if adv.dim() == 1:
        adv = adv.unsqueeze(-1)
    denom = float(maskf.sum().item()) if num_tokens is None else float(num_tokens)
    denom = max(denom, 1.0)  # an all-padding batch gives a zero loss, not a division by zero

    ratio = torch.exp(logp - old_logp.detach())
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    pg_tok = -torch.minimum(ratio * adv, clipped * adv)
    pg = (pg_tok * maskf).sum() / denom
    loss = pg

    if ref_logp is not None:
        kl = (k3_kl(logp, ref_logp.detach()) * maskf).sum() / denom
        loss = loss + kl_coef * kl
        kl_value = float(kl.detach().item())
    else:
        kl_value = 0.0

    with torch.no_grad():
        active = ((ratio > 1.0 + clip_eps) & (adv > 0)) | ((ratio < 1.0 - clip_eps) & (adv < 0))
        clip_frac = float((active.to(maskf.dtype) * maskf).sum().item() / denom)
    stats = {"pg_loss": float(pg.detach().item()), "kl": kl_value, "clip_frac": clip_frac}
    return loss, stats
