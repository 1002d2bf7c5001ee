"""GRPO maths against hand-computed values (spark_core.grpo), and the trainer's completion log-probs."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from spark_core.grpo import group_advantages, grpo_loss, k3_kl
from spark_core.batching import collate, TrainSequence, completion_logprobs


def sequence_logprobs(model, input_ids, attention_mask, completion_mask, temperature=1.0) -> torch.Tensor:
    """``trainer.completion_logprobs`` for right-padded rows whose completion is the tail of their real
    tokens, laid out ``[B, T]`` like ``input_ids`` (``out[b, t] = log p(ids[b, t] | ids[b, :t])``, 0 elsewhere)."""
    seqs = []
    for ids, attn, comp in zip(input_ids, attention_mask, completion_mask):
        real = ids[attn.bool()].tolist()
        seqs.append(TrainSequence(real, len(real) - int(comp.sum()), 0.0, 0.0))
    lp = completion_logprobs(model, collate(seqs, input_ids.device, pad_id=0), temperature)
    width, keep = input_ids.shape[1], lp.shape[1]
    rows = []
    for b, seq in enumerate(seqs):
        k = seq.num_tokens
        rows.append(torch.cat([lp.new_zeros(seq.prompt_len), lp[b, keep - k:], lp.new_zeros(width - seq.prompt_len - k)]))
    return torch.stack(rows)


def _tiny_lm(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    return Qwen2ForCausalLM(cfg).eval()


# ------------------------------------------------------------------------------------ advantages


def test_advantages_hand_computed_unbiased_std_and_interleaved_groups():
    # group "a" = [1, 0, 0, 0]: mean 0.25, unbiased std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5,
    # so advantages 1.5 and -0.5 (the biased std 0.433 would give 1.732 / -0.577).
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    groups = ["a", "b", "a", "b", "a", "b", "a", "b"]
    adv = group_advantages(rewards, groups)
    expected = torch.tensor([1.5, 0.0, -0.5, 0.0, -0.5, 0.0, -0.5, 0.0])
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-6)


def test_advantages_all_equal_group_is_zero_and_singleton_is_zero():
    rewards = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 0.5])
    adv = group_advantages(rewards, torch.tensor([7, 7, 7, 3, 3, 9]))
    assert torch.equal(adv, torch.zeros(6))


def test_advantages_two_member_group_and_length_check():
    # [2, 0]: mean 1, unbiased std sqrt(2) -> +-1/sqrt(2)
    adv = group_advantages(torch.tensor([2.0, 0.0]), ["q", "q"])
    torch.testing.assert_close(adv, torch.tensor([1 / math.sqrt(2), -1 / math.sqrt(2)]))
    with pytest.raises(ValueError, match="group_ids has 1 entries"):
        group_advantages(torch.tensor([1.0, 0.0]), ["q"])


# ------------------------------------------------------------------------------------------- loss


def _hand_example():
    # seq 0: A=+1, ratios 1.5 (clipped to 1.2, active), 1.1, 0.5 (A>0 so the unclipped 0.5 is the min)
    # seq 1: A=-2, ratios 0.5 (clipped to 0.8, active), 1.5 (unclipped -3 is the min), last token masked
    ratios = torch.tensor([[1.5, 1.1, 0.5], [0.5, 1.5, 3.0]])
    old = torch.full((2, 3), -1.0)
    logp = old + torch.log(ratios)
    d = torch.tensor([[0.0, math.log(2.0), 0.0], [-math.log(2.0), 0.0, 5.0]])  # ref - logp
    ref = logp + d
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    return logp, old, adv, mask, ref


def test_k3_hand_values():
    d = torch.tensor([0.0, math.log(2.0), -math.log(2.0)])
    kl = k3_kl(torch.zeros(3), d)
    torch.testing.assert_close(kl, torch.tensor([0.0, 1 - math.log(2.0), math.log(2.0) - 0.5]))
    assert torch.all(k3_kl(torch.randn(100), torch.randn(100)) >= 0)


def test_loss_matches_hand_computed_value():
    logp, old, adv, mask, ref = _hand_example()
    # per-token pg: -1.2, -1.1, -0.5 | +1.6, +3.0  -> sum 1.8 over 5 tokens = 0.36
    # k3: 0, 1-ln2, 0 | ln2-0.5, 0 -> sum 0.5 over 5 tokens = 0.1
    loss, stats = grpo_loss(logp, old, adv, mask, clip_eps=0.2, ref_logp=ref, kl_coef=0.5)
    assert loss.item() == pytest.approx(0.36 + 0.5 * 0.1, abs=1e-6)
    assert stats["pg_loss"] == pytest.approx(0.36, abs=1e-6)
    assert stats["kl"] == pytest.approx(0.1, abs=1e-6)
    assert stats["clip_frac"] == pytest.approx(2 / 5)
    loss_no_ref, stats_no_ref = grpo_loss(logp, old, adv, mask, clip_eps=0.2)
    assert loss_no_ref.item() == pytest.approx(0.36, abs=1e-6)
    assert stats_no_ref["kl"] == 0.0


def test_clipped_tokens_get_no_gradient():
    logp, old, adv, mask, _ = _hand_example()
    logp = logp.clone().requires_grad_(True)
    loss, _ = grpo_loss(logp, old, adv, mask, clip_eps=0.2)
    loss.backward()
    g = logp.grad
    # d(-ratio*A)/dlogp = -ratio*A / 5 on unclipped tokens; 0 where clipping is active or masked
    expected = torch.tensor([[0.0, -1.1 / 5, -0.5 / 5], [0.0, 1.5 * 2 / 5, 0.0]])
    torch.testing.assert_close(g, expected, rtol=1e-5, atol=1e-6)


def test_token_level_mean_not_sequence_mean():
    # seq 0 has 1 token with A=+1, seq 1 has 3 tokens with A=-1; ratio 1 everywhere.
    # token mean = (-1 + 3) / 4 = 0.5; a per-sequence mean would give (-1 + 1) / 2 = 0.
    logp = torch.zeros(2, 3)
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    loss, stats = grpo_loss(logp, logp.clone(), torch.tensor([1.0, -1.0]), mask)
    assert loss.item() == pytest.approx(0.5)
    assert stats["clip_frac"] == 0.0


def test_explicit_normaliser_and_shape_check():
    logp = torch.zeros(1, 2)
    loss, _ = grpo_loss(logp, logp, torch.tensor([1.0]), torch.ones(1, 2), num_tokens=8)
    assert loss.item() == pytest.approx(-2 / 8)
    with pytest.raises(ValueError, match="same shape"):
        grpo_loss(torch.zeros(1, 2), torch.zeros(1, 3), torch.tensor([1.0]), torch.ones(1, 2))


# ------------------------------------------------------------------------------------ log-probs


def test_sequence_logprobs_alignment_and_padding_independence():
    model = _tiny_lm()
    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 0, 0]])
    attn = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    comp = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]])
    with torch.no_grad():
        lp = sequence_logprobs(model, ids, attn, comp)
        manual = torch.log_softmax(model(input_ids=ids[:1]).logits[0].float(), -1)
        alone = sequence_logprobs(model, ids[1:, :3], attn[1:, :3], comp[1:, :3])
    assert lp.shape == ids.shape
    for t in (2, 3, 4):  # logits at t-1 score token t
        assert lp[0, t].item() == pytest.approx(manual[t - 1, ids[0, t]].item(), abs=1e-5)
    assert torch.all(lp[comp == 0] == 0)
    torch.testing.assert_close(lp[1, :3], alone[0], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        hot = sequence_logprobs(model, ids[:1], attn[:1], comp[:1], temperature=2.0)
        manual_hot = torch.log_softmax(model(input_ids=ids[:1]).logits[0].float() / 2.0, -1)
    assert hot[0, 4].item() == pytest.approx(manual_hot[3, ids[0, 4]].item(), abs=1e-5)


def test_micro_batch_accumulation_equals_one_big_batch():
    model = _tiny_lm(seed=1)
    torch.manual_seed(2)
    lengths = [(2, 3), (3, 1), (2, 5), (4, 2)]  # (prompt, completion) of different lengths
    width = max(p + c for p, c in lengths)
    ids = torch.randint(1, 40, (4, width))
    attn = torch.zeros(4, width, dtype=torch.long)
    comp = torch.zeros(4, width, dtype=torch.long)
    for i, (p, c) in enumerate(lengths):
        attn[i, : p + c] = 1
        comp[i, p : p + c] = 1
    adv = torch.tensor([1.0, -0.5, 0.3, -1.2])
    with torch.no_grad():
        base = sequence_logprobs(model, ids, attn, comp)
    old = base + 0.3 * torch.randn_like(base)  # ratios away from 1 so clipping takes part
    ref = base + 0.2 * torch.randn_like(base)

    def grads(chunks):
        model.zero_grad()
        total = int(comp.sum())
        for sl in chunks:
            lp = sequence_logprobs(model, ids[sl], attn[sl], comp[sl])
            loss, _ = grpo_loss(lp, old[sl], adv[sl], comp[sl], ref_logp=ref[sl], kl_coef=0.1, num_tokens=total)
            loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    big = grads([slice(0, 4)])
    small = grads([slice(0, 1), slice(1, 3), slice(3, 4)])
    assert any(g.abs().sum() > 0 for g in big)
    for a, b in zip(big, small):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
