"""GRPO learns: policy-only iterations on the tiny preset model raise the mean reward.

The loop is the real one (HFEngine samples K completions per question -> reward -> Trainer.train_phase
with group advantages, clipped loss and the k3 KL against the frozen initial model); only the task is
chosen so that a randomly initialised 100K-parameter model can learn it within seconds.

Why the task is learnable, and why the reward is lenient:
* Every question's answer is 7 ("What is 3 + 4?", "What is 9 - 2?", ...), so the policy only has to
  raise the probability of one token: the tiny tokenizer splits numbers digit by digit and `7` is a
  single token (`\\boxed{7}` is ` \\boxed{`, `7`, `}`).
* A random model over a 512-token vocabulary almost never writes the three tokens ` \\boxed{7}` in a
  row (~1e-8 per sample), so a strict boxed-answer reward would be 0 for every rollout and GRPO would
  have no signal. The answer is therefore read leniently: the last `\\boxed{}` if there is one, else the
  last number in the text (the usual fallback of math graders), and compared with the gold answer by
  `spark_core.verify`. The random model writes a `7` as the last number in a few percent of its
  8-token samples, which gives mixed groups (the only ones with a GRPO signal) from the first iteration.
"""

from __future__ import annotations

import copy
import re
import time

import pandas as pd
import pytest
import torch

from spark_core.chat import format_prompt
from spark_core.config import TinyModelConfig, TrainConfig
from spark_core.engines.base import SamplingParams
from spark_core.engines.hf import HFEngine
from spark_core.models import build_tiny
from spark_core.trainer import Trainer
from spark_core.verify import extract_boxed, verify

K = 8
ITERATIONS = 8
MAX_NEW_TOKENS = 8
QUESTIONS = [f"What is {a} + {7 - a}?" for a in range(0, 8, 2)] + [f"What is {7 + b} - {b}?" for b in range(1, 9, 2)]
GOLD = "7"


def lenient_reward(text: str, gold: str) -> float:
    """1.0 when the answer (last boxed content, else last number) verifies against the gold answer."""
    answer = extract_boxed(text)
    if answer is None:
        numbers = re.findall(r"\d+", text)
        answer = numbers[-1] if numbers else None
    return 0.0 if answer is None else verify(f"\\boxed{{{answer}}}", gold).reward


def test_lenient_reward_reads_boxed_first_then_last_number():
    assert lenient_reward("so \\boxed{7} and 3", "7") == 1.0
    assert lenient_reward("3 then 7", "7") == 1.0
    assert lenient_reward("7 then 3", "7") == 0.0
    assert lenient_reward("77", "7") == 0.0
    assert lenient_reward("no digits", "7") == 0.0


@pytest.mark.slow
def test_policy_only_grpo_raises_mean_reward(tmp_path):
    started = time.monotonic()
    model, tokenizer = build_tiny(TinyModelConfig(), cache_dir=tmp_path)
    assert len(tokenizer(" \\boxed{7}", add_special_tokens=False).input_ids) == 3
    ref = copy.deepcopy(model)  # the frozen initial policy for the KL term
    prompts = [
        format_prompt(tokenizer, [{"role": "user", "content": f"{q} Put the answer in \\boxed{{}}."}])
        for q in QUESTIONS
    ]
    # 4 optimizer steps per iteration (mini-batches of 16 of the 64 rollouts) at a high LR: the tiny
    # random model needs large steps to move within a few iterations.
    train_cfg = TrainConfig(lr=1e-2, warmup_ratio=0.0, kl_coef=0.001, mini_batch_size=16, micro_batch_size=64)
    trainer = Trainer(model, tokenizer, train_cfg, "cpu", total_steps=4 * ITERATIONS, ref_model=ref)
    engine = HFEngine(model, tokenizer)

    mean_rewards = []
    train_rows = []
    for it in range(ITERATIONS):
        params = SamplingParams(n=K, temperature=1.0, max_new_tokens=MAX_NEW_TOKENS, seed=100 + it)
        groups = engine.generate(prompts, params)
        rows = pd.DataFrame(
            [
                {
                    "question_id": f"q{i}",
                    "prompt": prompts[i],
                    "completion_ids": c.token_ids,
                    "reward": lenient_reward(c.text, GOLD),
                }
                for i, group in enumerate(groups)
                for c in group
            ]
        )
        mean_rewards.append(float(rows["reward"].mean()))
        train_rows += trainer.train_phase(rows, "policy")

    elapsed = time.monotonic() - started
    print(f"mean reward per iteration: {[round(r, 3) for r in mean_rewards]} ({elapsed:.1f} s)")
    assert mean_rewards[0] > 0, "the baseline must have some reward, or GRPO has no signal"
    final = sum(mean_rewards[-2:]) / 2
    assert final > mean_rewards[0] + 0.4, f"mean reward did not rise: {mean_rewards}"
    assert [r["step"] for r in train_rows] == list(range(1, 4 * ITERATIONS + 1))
    assert train_rows[-1]["kl"] > 0  # the policy moved away from the reference
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train_rows)
