"""The GRPO trainer: LR schedule, step counting, TRAIN rows, exact resume, zero-variance groups."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from spark_core.config import TrainConfig, load_config
from spark_core.grpo import group_advantages
from spark_core.schemas import TRAIN
from spark_core.trainer import Trainer, lr_factor, planned_optimizer_steps

VOCAB = 40


class CharTokenizer:
    """Enough of a tokenizer for the trainer: one id per character, id 0 is padding."""

    pad_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = False) -> SimpleNamespace:
        assert add_special_tokens is False  # prompts are already fully formatted
        return SimpleNamespace(input_ids=[1 + ord(c) % (VOCAB - 1) for c in text])


def tiny_model(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    return Qwen2ForCausalLM(cfg)


def rollouts(seed: int, questions: int = 3, k: int = 4, constant_reward: float | None = None) -> pd.DataFrame:
    """Synthetic verified rollouts: K completions of different lengths per question."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for q in range(questions):
        for j in range(k):
            length = int(torch.randint(1, 6, (1,), generator=g))
            reward = constant_reward if constant_reward is not None else float(torch.randint(0, 2, (1,), generator=g))
            rows.append(
                {
                    "question_id": f"q{seed}-{q}",
                    "prompt": f"what is {q}+{seed}?",
                    "completion_ids": torch.randint(1, VOCAB, (length,), generator=g).tolist(),
                    "reward": reward,
                }
            )
    return pd.DataFrame(rows)


def cfg(**kw) -> TrainConfig:
    base = dict(lr=1e-2, warmup_ratio=0.0, kl_coef=0.0, micro_batch_size=16)
    base.update(kw)
    return TrainConfig(**base)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------ schedule


def test_lr_factor_warmup_then_cosine_to_floor():
    # 10 steps, 20% warm-up = 2 steps: 0.5, 1.0, then cosine from 1.0 to 0.1 at step 10
    f = [lr_factor(s, 10, 0.2, 0.1) for s in range(13)]
    assert f[0] == pytest.approx(0.5)
    assert f[1] == pytest.approx(1.0)
    assert f[2] == pytest.approx(1.0)
    assert f[6] == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the decay
    assert f[10] == pytest.approx(0.1)
    assert f[12] == pytest.approx(0.1)  # past the plan: stays at the floor
    assert all(a >= b for a, b in zip(f[2:], f[3:]))
    assert lr_factor(0, 10, 0.0, 0.1) == pytest.approx(1.0)  # no warm-up: starts at the peak
    assert lr_factor(0, 100, 0.03, 0.1) == pytest.approx(1 / 3)  # ceil(3) warm-up steps


def test_planned_steps_count_both_phases():
    tiny = load_config(preset="tiny")  # 8 questions x 4 samples, reward 8 items x 4, 2 iterations
    assert planned_optimizer_steps(tiny) == 2 * (1 + 1)
    c = load_config(preset="tiny", overrides={"train": {"mini_batch_size": 10, "epochs": 2}})
    assert planned_optimizer_steps(c) == 2 * (math.ceil(32 / 10) * 2 + math.ceil(32 / 10) * 2)
    c = load_config(
        preset="tiny",
        overrides={"train": {"mini_batch_size": 10}, "reward_data": {"n": 2, "reward_batch_size": 5}},
    )
    assert planned_optimizer_steps(c) == 2 * (4 + 1)  # reward phase: 5 items x 2 samples = 10
    c = load_config(preset="tiny", overrides={"reward_data": {"enabled": False}, "iterations": 5})
    assert planned_optimizer_steps(c) == 5
    c = load_config(preset="tiny", overrides={"train": {"total_steps": 77}})
    assert planned_optimizer_steps(c) == 77


def test_rows_schema_steps_and_lr_follow_schedule():
    model = tiny_model()
    t = cfg(mini_batch_size=5, warmup_ratio=0.25, min_lr_ratio=0.2)
    trainer = Trainer(model, CharTokenizer(), t, "cpu", total_steps=8)
    policy = rollouts(1)  # 12 sequences -> 3 mini-batches of 5, 5, 2
    reward = rollouts(2, questions=2)  # 8 sequences -> 5, 3
    rows = trainer.train_phase(policy, "policy") + trainer.train_phase(reward, "reward")
    assert [list(r) for r in rows] == [TRAIN.names] * 5
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["phase"] for r in rows] == ["policy"] * 3 + ["reward"] * 2
    assert [r["num_sequences"] for r in rows] == [5, 5, 2, 5, 3]
    assert sum(r["num_tokens"] for r in rows[:3]) == sum(len(c) for c in policy["completion_ids"])
    for r in rows:
        assert r["lr"] == pytest.approx(1e-2 * lr_factor(r["step"] - 1, 8, 0.25, 0.2))
        assert r["grad_norm"] > 0 and 0 <= r["clip_frac"] <= 1
        assert r["kl"] == 0.0  # kl_coef 0: no reference model
    assert rows[0]["lr"] == pytest.approx(0.5e-2)  # first of 2 warm-up steps
    assert sum(r["mean_reward"] * r["num_sequences"] for r in rows[:3]) == pytest.approx(policy["reward"].sum())
    assert trainer.global_step == 5
    assert trainer.train_phase(policy.iloc[:0], "policy") == []
    assert trainer.global_step == 5


def test_first_step_ratio_is_one_and_loss_is_pg_only():
    # Old log-probs are recomputed from the same weights, so the first step has ratio 1 everywhere:
    # no clipping and pg_loss = -(token-weighted mean advantage).
    model = tiny_model()
    trainer = Trainer(model, CharTokenizer(), cfg(), "cpu", total_steps=4)
    rows = rollouts(3)
    out = trainer.train_phase(rows, "policy")
    assert len(out) == 1 and out[0]["clip_frac"] == 0.0
    adv = group_advantages(torch.tensor(rows["reward"].to_numpy()), rows["question_id"].tolist())
    lengths = torch.tensor([len(c) for c in rows["completion_ids"]], dtype=adv.dtype)
    assert out[0]["pg_loss"] == pytest.approx(float(-(adv * lengths).sum() / lengths.sum()), abs=1e-5)
    assert out[0]["loss"] == pytest.approx(out[0]["pg_loss"])


def test_micro_batching_and_checkpointing_do_not_change_the_update():
    rows = rollouts(4)
    results = []
    for kw in ({"micro_batch_size": 12}, {"micro_batch_size": 5}, {"micro_batch_size": 3, "gradient_checkpointing": True}):
        model = tiny_model()
        trainer = Trainer(model, CharTokenizer(), cfg(**kw), "cpu", total_steps=4)
        out = trainer.train_phase(rows, "policy")
        results.append((out[0], weights(model)))
    (row0, w0) = results[0]
    for row, w in results[1:]:
        assert row["grad_norm"] == pytest.approx(row0["grad_norm"], rel=1e-4)
        assert row["loss"] == pytest.approx(row0["loss"], rel=1e-4, abs=1e-7)
        for k in w0:
            torch.testing.assert_close(w[k], w0[k], rtol=1e-4, atol=1e-6)


def test_sampling_temperature_changes_the_scored_distribution():
    rows = rollouts(6)
    norms = []
    for temperature in (1.0, 0.5):
        trainer = Trainer(tiny_model(), CharTokenizer(), cfg(), "cpu", total_steps=4, temperature=temperature)
        norms.append(trainer.train_phase(rows, "policy")[0]["grad_norm"])
    assert norms[0] != pytest.approx(norms[1], rel=1e-3)


def test_zero_reward_variance_gives_zero_pg_gradient_but_kl_is_computed():
    rows = rollouts(5, constant_reward=1.0)  # every group agrees: advantages are all 0
    model = tiny_model()
    before = weights(model)
    no_kl = Trainer(model, CharTokenizer(), cfg(), "cpu", total_steps=4)
    out = no_kl.train_phase(rows, "policy")[0]
    assert out["pg_loss"] == 0.0 and out["grad_norm"] == 0.0 and out["kl"] == 0.0
    after = weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # AdamW with zero grads, no decay

    ref = tiny_model(seed=9)  # a reference that differs, so the KL term has a gradient
    with_kl = Trainer(model, CharTokenizer(), cfg(kl_coef=0.1), "cpu", total_steps=4, ref_model=ref)
    out = with_kl.train_phase(rows, "policy")[0]
    assert out["pg_loss"] == 0.0
    assert out["kl"] > 0 and out["grad_norm"] > 0
    assert out["loss"] == pytest.approx(0.1 * out["kl"])
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())


def test_kl_without_reference_is_refused_and_bad_rows_are_named():
    with pytest.raises(ValueError, match="ref_model"):
        Trainer(tiny_model(), CharTokenizer(), cfg(kl_coef=0.001), "cpu", total_steps=4)
    trainer = Trainer(tiny_model(), CharTokenizer(), cfg(), "cpu", total_steps=4)
    with pytest.raises(ValueError, match="reward"):
        trainer.train_phase(rollouts(1).drop(columns=["reward"]), "policy")
    with pytest.raises(ValueError, match="phase"):
        trainer.train_phase(rollouts(1), "value")
    with pytest.raises(ValueError, match="temperature must be positive"):
        Trainer(tiny_model(), CharTokenizer(), cfg(), "cpu", total_steps=4, temperature=0.0)
    bad = rollouts(1)
    bad.at[2, "completion_ids"] = [3, VOCAB + 5]
    with pytest.raises(ValueError, match="row 2: completion_ids hold ids outside"):
        trainer.train_phase(bad, "policy")


# ------------------------------------------------------------------------------------- resume


def test_save_and_load_state_resume_exactly(tmp_path):
    t = cfg(mini_batch_size=5, epochs=2, warmup_ratio=0.3, kl_coef=0.05, lr=5e-3)
    policy, reward, policy2 = rollouts(10), rollouts(11, questions=2), rollouts(12)
    total = 16

    # continuous: three phases in one trainer
    model = tiny_model()
    trainer = Trainer(model, CharTokenizer(), t, "cpu", total, ref_model=tiny_model())
    cont = [trainer.train_phase(d, p) for d, p in ((policy, "policy"), (reward, "reward"), (policy2, "policy"))]

    # interrupted after the first phase: weights + trainer state to disk, then a fresh process's view
    model_a = tiny_model()
    trainer_a = Trainer(model_a, CharTokenizer(), t, "cpu", total, ref_model=tiny_model())
    first = trainer_a.train_phase(policy, "policy")
    model_a.save_pretrained(tmp_path / "ckpt")
    trainer_a.save_state(tmp_path / "ckpt")
    del trainer_a, model_a

    model_b = Qwen2ForCausalLM.from_pretrained(tmp_path / "ckpt")
    trainer_b = Trainer(model_b, CharTokenizer(), t, "cpu", total, ref_model=tiny_model())
    trainer_b.load_state(tmp_path / "ckpt")
    assert trainer_b.global_step == len(first) == 6
    resumed = [first, trainer_b.train_phase(reward, "reward"), trainer_b.train_phase(policy2, "policy")]

    assert resumed == cont  # every TRAIN value identical, lr and step included
    w_cont, w_res = weights(model), weights(model_b)
    assert all(torch.equal(w_cont[k], w_res[k]) for k in w_cont)


def test_resume_with_a_longer_plan_uses_the_new_schedule(tmp_path):
    model = tiny_model()
    trainer = Trainer(model, CharTokenizer(), cfg(), "cpu", total_steps=4)
    trainer.train_phase(rollouts(1), "policy")
    trainer.save_state(tmp_path)
    longer = Trainer(copy.deepcopy(model), CharTokenizer(), cfg(), "cpu", total_steps=40)
    longer.load_state(tmp_path)
    row = longer.train_phase(rollouts(2), "policy")[0]
    assert row["step"] == 2
    assert row["lr"] == pytest.approx(1e-2 * lr_factor(1, 40, 0.0, 0.1))
    with pytest.raises(FileNotFoundError, match="trainer_state.pt"):
        longer.load_state(tmp_path / "missing")


# ----------------------------------------------------------------------- speed paths, sharding


def _count_scores(trainer: Trainer) -> list[str]:
    """Record which model each no-grad scoring pass ran on ('policy' or 'ref')."""
    calls: list[str] = []
    score = trainer._score

    def counted(model, seqs, chunks=None):
        calls.append("ref" if model is trainer.ref_model else "policy")
        return score(model, seqs, chunks)

    trainer._score = counted  # type: ignore[method-assign]
    return calls


def test_one_step_phase_reuses_the_training_logp_with_the_same_update(monkeypatch):
    """One mini-batch, one epoch: old log-probs come from the training forward itself (no extra pass),
    and the update equals the one with a separate recompute."""
    rows = rollouts(7)
    results = {}
    for reuse in (True, False):
        model = tiny_model()
        trainer = Trainer(model, CharTokenizer(), cfg(kl_coef=0.05, micro_batch_size=5), "cpu", total_steps=4,
                          ref_model=tiny_model(seed=3))
        calls = _count_scores(trainer)
        if not reuse:
            monkeypatch.setattr(trainer, "_reuses_current_logp", lambda plan: False)
        out = trainer.train_phase(rows, "policy")
        results[reuse] = (out, weights(model), calls)
    (fast, w_fast, calls_fast), (slow, w_slow, calls_slow) = results[True], results[False]
    assert calls_fast == ["ref"] and calls_slow == ["policy", "ref"]
    assert fast[0]["clip_frac"] == 0.0 and fast[0]["kl"] > 0
    for key in ("loss", "pg_loss", "kl", "grad_norm", "clip_frac"):
        assert fast[0][key] == pytest.approx(slow[0][key], rel=1e-6, abs=1e-9), key
    for k in w_fast:
        torch.testing.assert_close(w_fast[k], w_slow[k], rtol=1e-6, atol=1e-8)


def test_several_steps_recompute_old_logp_once_and_reference_once():
    trainer = Trainer(tiny_model(), CharTokenizer(), cfg(kl_coef=0.05, mini_batch_size=5, epochs=2), "cpu",
                      total_steps=10, ref_model=tiny_model(seed=3))
    calls = _count_scores(trainer)
    out = trainer.train_phase(rollouts(8), "policy")  # 12 sequences: 3 mini-batches x 2 epochs
    assert len(out) == 6 and calls == ["policy", "ref"]
    assert out[0]["clip_frac"] == 0.0  # the first step still sees ratio 1


def test_completion_logprobs_ignore_padding_and_batch_company():
    """Left padding with explicit position ids: a sequence scores the same alone or padded in a batch,
    and the values are the model's log-softmax at the completion positions."""
    from spark_core.batching import collate, TrainSequence, completion_logprobs

    model = tiny_model().eval()
    seqs = [TrainSequence([3, 4, 5, 6, 7, 8, 9], 4, 0.0, 0.0), TrainSequence([10, 11, 12], 2, 0.0, 0.0),
            TrainSequence([13, 14, 15, 16, 17], 1, 0.0, 0.0)]
    with torch.no_grad():
        together = completion_logprobs(model, collate(seqs, torch.device("cpu"), 0), temperature=0.7)
        for i, s in enumerate(seqs):
            alone = completion_logprobs(model, collate([s], torch.device("cpu"), 0), temperature=0.7)[0]
            torch.testing.assert_close(together[i, together.shape[1] - s.num_tokens :], alone, rtol=1e-5, atol=1e-6)
            assert torch.all(together[i, : together.shape[1] - s.num_tokens] == 0)
            logits = model(input_ids=torch.tensor([s.ids])).logits[0] / 0.7
            direct = torch.log_softmax(logits, -1)[torch.arange(s.prompt_len - 1, len(s.ids) - 1),
                                                   torch.tensor(s.ids[s.prompt_len:])]
            torch.testing.assert_close(alone, direct, rtol=1e-5, atol=1e-6)


def test_every_rank_runs_the_same_number_of_micro_batches():
    """DDP/FSDP collectives need equal forward/backward counts: short shards get empty fillers."""
    from spark_core import distributed
    from spark_core.batching import length_sorted_micro_batches, TrainSequence, lockstep_micro_batches

    batch = [TrainSequence(list(range(1, 3 + i)), 1, 1.0, 1.0) for i in range(7)]
    assert lockstep_micro_batches(7, 2, 3) == 2 and lockstep_micro_batches(7, 1, 3) == 3
    assert lockstep_micro_batches(1, 4, 8) == 1  # ranks without a share still run one (filler) pass
    counts = []
    for rank in (0, 1):
        shard = distributed.shard(batch, distributed.DistContext(rank=rank, world_size=2))
        micros = length_sorted_micro_batches(shard, 3, lockstep_micro_batches(7, 2, 3), batch[0])
        counts.append(len(micros))
        real = [s for m in micros for s in m if s.num_tokens]
        assert sorted(id(s) for s in real) == sorted(id(s) for s in shard)  # each shard member exactly once
        assert all(len(m) <= 3 for m in micros)
    assert counts == [2, 2]
    shard = distributed.shard(batch[:1], distributed.DistContext(rank=1, world_size=2))
    (filler,), = length_sorted_micro_batches(shard, 3, 1, batch[0])
    assert shard == [] and filler.num_tokens == 0


def test_a_filler_micro_batch_adds_nothing_to_the_loss_or_gradient():
    from spark_core.grpo import grpo_loss
    from spark_core.batching import collate, filler, TrainSequence, completion_logprobs

    model = tiny_model()
    b = collate([filler(TrainSequence([5, 6, 7], 1, 1.0, 1.0))], torch.device("cpu"), 0)
    logp = completion_logprobs(model, b)
    loss, stats = grpo_loss(logp, logp.detach(), b.advantages, b.completion_mask, num_tokens=10)
    loss.backward()
    assert float(loss.detach()) == 0.0 and stats == {"pg_loss": 0.0, "kl": 0.0, "clip_frac": 0.0}
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_optimizer_state_names_round_trip():
    """The FSDP save path gathers a name-keyed optimizer state and writes the single-process format."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from spark_core.trainer_state import optimizer_state_to_indexed, optimizer_state_to_named

    model = tiny_model()
    model.model.embed_tokens.weight.requires_grad_(False)  # names must skip frozen parameters
    trainer = Trainer(model, CharTokenizer(), cfg(), "cpu", total_steps=4)
    assert "model.embed_tokens.weight" not in trainer._param_names
    trainer.train_phase(rollouts(9), "policy")
    named = get_optimizer_state_dict(trainer.model, trainer.optimizer)
    indexed = optimizer_state_to_indexed(named, trainer._param_names)
    plain = trainer.optimizer.state_dict()
    assert indexed["param_groups"] == plain["param_groups"]
    assert indexed["state"].keys() == plain["state"].keys()
    for i, entry in plain["state"].items():
        for key, value in entry.items():
            torch.testing.assert_close(indexed["state"][i][key], value)
    back = optimizer_state_to_named(indexed, trainer._param_names)
    assert back["param_groups"] == named["param_groups"] and back["state"].keys() == named["state"].keys()
    with pytest.raises(ValueError, match="does not train"):
        optimizer_state_to_indexed(named, trainer._param_names[1:])


def test_each_shared_prompt_is_scored_once_with_the_same_kl(monkeypatch):
    """Reference log-probs from one prompt pass + a KV cache equal a full forward per sequence (float32
    rounding: |diff| <= 1e-5 per token), and so do the step's KL term and update (rel 1e-5)."""
    from spark_core import prefix_scoring

    monkeypatch.setattr(prefix_scoring, "MIN_SAVED_FLOPS", {"cpu": 0.0, "cuda": 0.0})  # the tiny model too
    rows = pd.concat([rollouts(11, questions=3, k=4), rollouts(12, questions=1, k=1)], ignore_index=True)
    results = {}
    for once in (True, False):
        model = tiny_model()
        trainer = Trainer(model, CharTokenizer(), cfg(kl_coef=0.1, micro_batch_size=5), "cpu", total_steps=4,
                          ref_model=tiny_model(seed=3), temperature=0.7)
        trainer.score_prompts_once = once
        seqs = trainer._prepare(rows)
        ref_logp = trainer._score(trainer.ref_model, seqs)
        forwards: list[int] = []
        hook = trainer.ref_model.register_forward_hook(lambda m, a, kw, o: forwards.append(kw["input_ids"].numel()),
                                                       with_kwargs=True)
        out = trainer.train_phase(rows, "policy")
        hook.remove()
        results[once] = (ref_logp, out[0], weights(model), sum(forwards))
    (lp_once, out_once, w_once, tokens_once), (lp_full, out_full, w_full, tokens_full) = results[True], results[False]
    assert [t.shape for t in lp_once] == [t.shape for t in lp_full]
    for a, b in zip(lp_once, lp_full):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert out_once["kl"] > 0
    for key in ("loss", "pg_loss", "kl", "grad_norm"):
        assert out_once[key] == pytest.approx(out_full[key], rel=1e-5, abs=1e-9), key
    for k in w_once:
        torch.testing.assert_close(w_once[k], w_full[k], rtol=1e-5, atol=1e-7)
    assert tokens_once < 0.6 * tokens_full, (tokens_once, tokens_full)  # prompts went through once


def test_a_model_too_small_to_gain_keeps_the_full_reference_forward():
    """Below prefix_scoring.MIN_SAVED_FLOPS the extra prompt call costs more than it saves (the tiny model
    on CPU): the reference then runs one full forward per micro-batch."""
    rows = rollouts(11, questions=3, k=4)
    trainer = Trainer(tiny_model(), CharTokenizer(), cfg(kl_coef=0.1, micro_batch_size=12), "cpu", total_steps=4,
                      ref_model=tiny_model(seed=3))
    assert trainer.score_prompts_once
    calls: list[tuple[int, bool]] = []
    hook = trainer.ref_model.register_forward_hook(
        lambda m, a, kw, o: calls.append((kw["input_ids"].shape[0], bool(kw.get("use_cache")))), with_kwargs=True)
    trainer._score(trainer.ref_model, trainer._prepare(rows))
    hook.remove()
    assert calls == [(12, False)]  # one forward of the 12 whole sequences: no prompt pass, no cache


def test_scoring_prompts_once_handles_empty_and_one_token_completions():
    from spark_core.prefix_scoring import shared_prompt_logprobs

    model = tiny_model(seed=4).eval()
    prompts = [[3, 4, 5], [3, 4, 5], [3, 4, 5], [7, 8]]
    completions = [[9], [], [9, 10, 11], [12, 13]]
    got = shared_prompt_logprobs(model, prompts, completions, pad_id=0, device=torch.device("cpu"), max_sequences=2)
    assert [t.shape[0] for t in got] == [1, 0, 3, 2]
    for p, c, lp in zip(prompts, completions, got):
        if c:
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([p + c])).logits[0].float()
            want = torch.log_softmax(logits[len(p) - 1 : -1], -1).gather(-1, torch.tensor(c)[:, None])[:, 0]
            torch.testing.assert_close(lp, want, rtol=0, atol=1e-5)


def test_state_file_is_written_without_crc_and_reads_back_exactly(tmp_path):
    """write_state skips torch's per-record CRC32 (the manifest's sha256 covers the file), leaves the
    process-wide option as it found it, and torch.load reads every tensor back bit for bit."""
    import zipfile

    from spark_core.trainer_state import read_state, write_state

    state = {"optimizer": {"state": {0: {"exp_avg": torch.randn(1000), "step": torch.tensor(3.0)}}},
             "global_step": 3, "torch_rng": torch.get_rng_state()}
    before = torch.serialization.get_crc32_options()
    write_state(tmp_path / "trainer_state.pt", state)
    assert torch.serialization.get_crc32_options() == before
    with zipfile.ZipFile(tmp_path / "trainer_state.pt") as z:
        assert {i.CRC for i in z.infolist() if i.file_size > 0} == {0}  # no CRC was computed
    got = read_state(tmp_path / "trainer_state.pt")
    assert torch.equal(got["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
    assert got["global_step"] == 3 and torch.equal(got["torch_rng"], state["torch_rng"])


def test_training_forward_with_each_prompt_once_makes_the_same_update(monkeypatch):
    """The training forward with one prompt pass + a differentiable KV cache gives the loss, KL, gradient
    norm and updated weights of full forwards (float32 rounding), over two optimizer steps of mini-batches
    (old log-probs scored separately) with groups split across micro-batches; the policy model then
    forwards far fewer tokens. The tiny model saves too little compute for the default threshold."""
    import spark_core.prefix_scoring as prefix_scoring

    rows = pd.concat([rollouts(21, questions=3, k=4), rollouts(22, questions=2, k=1)], ignore_index=True)
    probe = Trainer(tiny_model(), CharTokenizer(), cfg(micro_batch_size=3), "cpu", total_steps=1)
    assert not probe._trains_prompts_once(probe._prepare(rows))  # 2 x ~0.1M params x 60 tokens < 1 GFLOP
    monkeypatch.setattr(prefix_scoring, "MIN_SAVED_FLOPS", {"cpu": 0.0, "cuda": 0.0})
    assert probe._trains_prompts_once(probe._prepare(rows))
    probe.cfg = cfg(micro_batch_size=1)
    assert not probe._trains_prompts_once(probe._prepare(rows))  # a micro-batch of one shares nothing
    results = {}
    for once in (True, False):
        model = tiny_model()
        trainer = Trainer(model, CharTokenizer(), cfg(kl_coef=0.1, micro_batch_size=3, mini_batch_size=7), "cpu",
                          total_steps=4, ref_model=tiny_model(seed=3), temperature=0.7)
        trainer.train_prompts_once = once
        forwards: list[int] = []  # tokens through the training forwards (the old log-probs' pass left out)
        hook = model.register_forward_hook(
            lambda m, a, kw, o: forwards.append(kw["input_ids"].numel() if torch.is_grad_enabled() else 0),
            with_kwargs=True)
        out = trainer.train_phase(rows, "policy")
        hook.remove()
        results[once] = (out, weights(model), sum(forwards))
    (out_once, w_once, tokens_once), (out_full, w_full, tokens_full) = results[True], results[False]
    assert len(out_once) == len(out_full) == 2
    for a, b in zip(out_once, out_full):
        assert a["num_tokens"] == b["num_tokens"] and a["num_sequences"] == b["num_sequences"]
        for key in ("loss", "pg_loss", "kl", "grad_norm", "clip_frac"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), key
    for k in w_once:
        torch.testing.assert_close(w_once[k], w_full[k], rtol=1e-4, atol=1e-6)
    assert w_once != {} and any(not torch.equal(w_once[k], weights(tiny_model())[k]) for k in w_once)
    assert tokens_once < 0.8 * tokens_full, (tokens_once, tokens_full)


def test_prompt_group_micro_batches_keep_groups_together():
    from spark_core.batching import TrainSequence, prompt_group_micro_batches

    def seq(prompt: list[int], n: int) -> TrainSequence:
        return TrainSequence(prompt + [9] * n, len(prompt), 0.0, 0.0)

    seqs = [seq([1, 2, 3], 2), seq([4], 1), seq([1, 2, 3], 1), seq([4], 3), seq([5, 6], 1)] + \
        [seq([7, 7, 7, 7], i) for i in range(1, 6)]
    micros = prompt_group_micro_batches(seqs, 3)
    assert sorted(id(s) for m in micros for s in m) == sorted(id(s) for s in seqs)  # each exactly once
    assert all(1 <= len(m) <= 3 for m in micros)
    prompts = [[tuple(s.ids[: s.prompt_len]) for s in m] for m in micros]
    # shorter prompts first, whole groups packed up to the size; a group larger than the size is split
    assert prompts[:2] == [[(4,), (4,), (5, 6)], [(1, 2, 3), (1, 2, 3)]]
    assert [len(m) for m in micros[2:]] == [3, 2] and {p for m in prompts[2:] for p in m} == {(7, 7, 7, 7)}
