"""LoRA (peft) on the tiny model: only adapters train, checkpoints save and reload in both engine modes."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM

from spark_core import lora
from spark_core.config import LoraConfig, TinyModelConfig, TrainConfig
from spark_core.models import build_tiny, load_tokenizer
from spark_core.trainer import Trainer

LORA = LoraConfig(rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "o_proj"])


@pytest.fixture(scope="module")
def tiny() -> tuple:
    return build_tiny(TinyModelConfig())


def copy_base(tiny: tuple) -> torch.nn.Module:
    """A fresh copy of the tiny base model (peft modifies the module it wraps)."""
    model = AutoModelForCausalLM.from_config(tiny[0].config)
    model.load_state_dict(tiny[0].state_dict())
    return model


def fresh_lora(tiny: tuple) -> tuple:
    return lora.apply_lora(copy_base(tiny), LORA), tiny[1]


def rows(tok) -> pd.DataFrame:
    """Two GRPO groups with mixed rewards, so every advantage is non-zero."""
    data = []
    for q, prompt in enumerate(["What is 1 + 2?", "What is 3 + 4?"]):
        for j, (text, reward) in enumerate([(" \\boxed{3}", 1.0), (" \\boxed{9}", 0.0)]):
            ids = tok(text, add_special_tokens=False).input_ids
            data.append({"question_id": f"q{q}", "sample_idx": j, "prompt": prompt, "completion_ids": ids, "reward": reward})
    return pd.DataFrame(data)


def logits(model: torch.nn.Module, tok) -> torch.Tensor:
    ids = tok("What is 2 + 2? \\boxed{4}", return_tensors="pt", add_special_tokens=False).input_ids
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_apply_lora_freezes_the_base_and_starts_as_a_no_op(tiny: tuple) -> None:
    model, tok = fresh_lora(tiny)
    names = lora.trainable_parameter_names(model)
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert {n.split(".")[-4] for n in names} == {"q_proj", "v_proj", "o_proj"}
    assert torch.equal(logits(model, tok), logits(tiny[0], tok))  # B = 0 at start


def test_unknown_target_module_is_a_clear_error(tiny: tuple) -> None:
    with pytest.raises(ValueError, match="match no module"):
        lora.apply_lora(AutoModelForCausalLM.from_config(tiny[0].config), LoraConfig(target_modules=["qkv"]))


def test_lora_training_step_changes_only_adapter_weights(tiny: tuple) -> None:
    model, tok = fresh_lora(tiny)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref = lora.AdapterDisabledReference(model)
    cfg = TrainConfig(lr=1e-2, warmup_ratio=0.0, kl_coef=0.01, micro_batch_size=2)
    trainer = Trainer(model, tok, cfg, "cpu", total_steps=4, ref_model=ref)
    # the reference wrapper must not have frozen the policy's adapters
    assert lora.trainable_parameter_names(model) == [n for n in before if ".lora_" in n]
    out = trainer.train_phase(rows(tok), "policy")
    trainer.train_phase(rows(tok), "policy")  # second step: lora_A moves too once lora_B is non-zero
    assert len(out) == 1 and out[0]["kl"] == 0.0  # first step: policy == reference
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".lora_" in n for n in changed)
    assert any(".lora_A." in n for n in changed) and any(".lora_B." in n for n in changed)
    # the reference is still the base model
    assert torch.equal(logits(ref, tok), logits(tiny[0], tok))
    assert not torch.equal(logits(model, tok), logits(tiny[0], tok))


@pytest.fixture(scope="module")
def trained(tiny: tuple) -> tuple:
    """A LoRA model with non-zero adapters (as after training)."""
    model, tok = fresh_lora(tiny)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model, tok


def test_merged_export_equals_the_adapter_model(tiny: tuple, trained: tuple, tmp_path: Path) -> None:
    model, tok = trained
    expected = logits(model, tok)
    folder = lora.export_for_engine(model, tok, tmp_path / "ckpt", "merged", LORA)
    assert lora.engine_weights(folder) == lora.EngineWeights(folder)
    assert lora.base_weights_folder(folder) is None
    merged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert not any("lora" in k for k in merged.state_dict())
    torch.testing.assert_close(logits(merged, tok), expected, atol=1e-5, rtol=1e-5)
    text = "What is 12 + 30? \\boxed{42}"
    assert load_tokenizer(folder)(text).input_ids == tok(text).input_ids
    # training resumes from the adapter on top of the original base weights
    resumed = lora.load_lora_checkpoint(copy_base(tiny), folder)
    torch.testing.assert_close(logits(resumed, tok), expected, atol=1e-6, rtol=1e-6)
    assert lora.trainable_parameter_names(resumed)  # is_trainable=True by default


def test_adapter_export_reloads_base_plus_adapter(tiny: tuple, trained: tuple, tmp_path: Path) -> None:
    model, tok = trained
    expected = logits(model, tok)
    folder = lora.export_for_engine(model, tok, tmp_path / "ckpt", "adapter", LORA)
    weights = lora.engine_weights(folder)
    assert weights.adapter_path == folder / "adapter" and weights.rank == 4
    assert lora.base_weights_folder(folder) == folder
    assert (folder / "adapter" / "adapter_model.safetensors").exists()
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert torch.equal(logits(base, tok), logits(tiny[0], tok))  # the root holds the untouched base
    reloaded = lora.load_lora_checkpoint(base, folder, is_trainable=False)
    torch.testing.assert_close(logits(reloaded, tok), expected, atol=1e-6, rtol=1e-6)
    assert lora.trainable_parameter_names(reloaded) == []


def test_plain_checkpoint_is_not_a_lora_checkpoint(tmp_path: Path) -> None:
    assert lora.engine_weights(tmp_path) == lora.EngineWeights(tmp_path)
    with pytest.raises(ValueError, match="not a LoRA checkpoint"):
        lora.base_weights_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="no LoRA adapter"):
        lora.load_lora_checkpoint(torch.nn.Linear(1, 1), tmp_path)
