"""LoRA training with peft (``model.lora`` in the config): apply, export for the rollout engine, reload.

Only adapter weights train; the frozen base doubles as the KL reference (adapters switched off), so a
LoRA run needs no second copy of the model.

A LoRA checkpoint folder (what ``export_for_engine`` writes) always has:

* ``adapter/``: the peft adapter (``adapter_config.json`` + ``adapter_model.safetensors``), what training
  resumes from;
* ``spark_lora.json``: the mode and the LoRA settings;
* at the root, a normal ``save_pretrained`` model folder + tokenizer, which any engine can load:
  ``merged``: the base weights with the adapters folded in (``W + scale * B @ A``), so hf, vLLM or an
  OpenAI-compatible server serve it like a full fine-tune; ``adapter``: the untouched base weights, and
  the engine applies ``adapter/`` itself (vLLM ``enable_lora`` + ``LoRARequest``, or a server's
  LoRA load endpoint). The merged weights are computed from the adapter without modifying the training
  model (merging in place and unmerging would add rounding error to the bf16 base every iteration).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import PreTrainedTokenizerFast

from .config import LoraConfig

ADAPTER_DIR = "adapter"
META_FILE = "spark_lora.json"
ADAPTER_NAME = "default"
Mode = Literal["merged", "adapter"]


def apply_lora(model: torch.nn.Module, lora_cfg: LoraConfig) -> PeftModel:
    """Wrap a causal LM with fresh LoRA adapters; every base weight is frozen.

    Adapters start as an exact no-op (peft initialises B = 0), so the wrapped model's outputs equal the
    base model's until the first update."""
    targets = set(lora_cfg.target_modules)
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = sorted(targets - present)
    if missing:
        raise ValueError(
            f"model.lora.target_modules {missing} match no module of {type(model).__name__}; "
            f"linear layers present include {sorted(n for n in present if n.endswith('proj'))}"
        )
    peft_cfg = PeftLoraConfig(
        r=lora_cfg.rank,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=sorted(targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_cfg)


def is_lora_model(model: torch.nn.Module) -> bool:
    return isinstance(model, PeftModel)


def trainable_parameter_names(model: torch.nn.Module) -> list[str]:
    """Names of the parameters that receive gradients (with LoRA: only ``lora_A``/``lora_B``)."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


# ------------------------------------------------------------------------------------ reference


class AdapterDisabledReference(torch.nn.Module):
    """The frozen base model as a KL reference: the LoRA model run with its adapters switched off.

    Pass it as ``Trainer(..., ref_model=AdapterDisabledReference(peft_model))``. The wrapped model is
    held outside the module tree on purpose: ``.to()``, ``.eval()`` and ``.requires_grad_(False)`` on the
    reference must not freeze or move the policy's adapters."""

    def __init__(self, peft_model: PeftModel) -> None:
        super().__init__()
        if not isinstance(peft_model, PeftModel):
            raise TypeError("AdapterDisabledReference needs a peft model (apply_lora's result)")
        self._target = [peft_model]  # a list hides it from nn.Module registration

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        model = self._target[0]
        was_training = model.training
        model.eval()  # no adapter dropout in the reference pass
        try:
            with torch.no_grad(), model.disable_adapter():
                return model(*args, **kwargs)
        finally:
            model.train(was_training)


# ---------------------------------------------------------------------------------------- export


def _base_state_dict(peft_model: PeftModel, merged: bool) -> dict[str, torch.Tensor]:
    """The base model's state dict under its original key names, optionally with adapters folded in."""
    base = peft_model.get_base_model()
    deltas: dict[str, torch.Tensor] = {}
    if merged:
        for name, module in base.named_modules():
            if isinstance(module, LoraLayer) and ADAPTER_NAME in getattr(module, "lora_A", {}):
                deltas[f"{name}.weight"] = module.get_delta_weight(ADAPTER_NAME).detach()
    out: dict[str, torch.Tensor] = {}
    for key, tensor in base.state_dict().items():
        if ".lora_" in key:  # lora_A / lora_B / lora_embedding_* / lora_magnitude_vector
            continue
        clean = key.replace(".base_layer.", ".")
        value = tensor.detach()
        if clean in deltas:
            value = (value.float() + deltas[clean].float()).to(value.dtype)
        out[clean] = value.cpu().contiguous()
    return out


def merged_state_dict(peft_model: PeftModel) -> dict[str, torch.Tensor]:
    """The base model's weights with the adapters folded in, under the base key names (what an engine
    that receives weights in place loads)."""
    return _base_state_dict(peft_model, merged=True)


def export_for_engine(
    model: PeftModel, tokenizer: Any, folder: str | Path, mode: Mode, lora_cfg: LoraConfig | None = None
) -> Path:
    """Write a LoRA checkpoint folder (layout in the module docstring); returns the folder."""
    if mode not in ("merged", "adapter"):
        raise ValueError(f"mode must be 'merged' or 'adapter', got {mode!r}")
    if not isinstance(model, PeftModel):
        raise TypeError("export_for_engine needs a peft model (apply_lora's result)")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out / ADAPTER_DIR))
    state = _base_state_dict(model, merged=(mode == "merged"))
    model.get_base_model().save_pretrained(str(out), state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    if (image_processor := getattr(tokenizer, "image_processor", None)) is not None:
        image_processor.save_pretrained(str(out))  # vision-language: the engines need it too
    tok_cfg = out / "tokenizer_config.json"
    if type(tokenizer) is PreTrainedTokenizerFast and tok_cfg.exists():
        # keep models.load_tokenizer's marker: a locally trained tokenizer must reload with this class
        data = json.loads(tok_cfg.read_text())
        data["tokenizer_class"] = "PreTrainedTokenizerFast"
        tok_cfg.write_text(json.dumps(data, indent=2))
    peft_cfg = model.peft_config[ADAPTER_NAME]
    meta = {
        "mode": mode,
        "rank": int(peft_cfg.r),
        "alpha": int(peft_cfg.lora_alpha),
        "dropout": float(peft_cfg.lora_dropout),
        "target_modules": sorted(peft_cfg.target_modules),
        "config": lora_cfg.model_dump(mode="json") if lora_cfg is not None else None,
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2))
    return out


@dataclass(frozen=True)
class EngineWeights:
    """What an engine loads from a checkpoint folder: the model folder and, in adapter mode, the adapter."""

    model_path: Path
    adapter_path: Path | None = None
    rank: int | None = None


def read_meta(folder: str | Path) -> dict[str, Any] | None:
    """The LoRA metadata of a checkpoint folder, or None for a plain (full-weights) checkpoint."""
    path = Path(folder) / META_FILE
    return json.loads(path.read_text()) if path.exists() else None


def engine_weights(folder: str | Path) -> EngineWeights:
    """How an engine should load ``folder``: plain and merged checkpoints are ordinary model folders;
    adapter checkpoints are base weights plus ``adapter/``."""
    root = Path(folder)
    meta = read_meta(root)
    if meta is None or meta["mode"] == "merged":
        return EngineWeights(root)
    return EngineWeights(root, root / ADAPTER_DIR, int(meta["rank"]))


def load_lora_checkpoint(base_model: torch.nn.Module, folder: str | Path, is_trainable: bool = True) -> PeftModel:
    """Re-attach the adapter saved in ``folder/adapter`` to ``base_model`` (to resume training).

    ``base_model`` must hold the ORIGINAL base weights: in ``adapter`` mode they are the checkpoint
    root itself (load it with ``models.load_model_and_tokenizer(model_cfg, path=folder)``); in
    ``merged`` mode the root holds merged weights, so load the base from ``model.source`` as at the
    start of the run (``base_weights_folder`` says which)."""
    adapter = Path(folder) / ADAPTER_DIR
    if not (adapter / "adapter_config.json").exists():
        raise FileNotFoundError(f"{folder} has no LoRA adapter ({adapter}/adapter_config.json missing)")
    return PeftModel.from_pretrained(base_model, str(adapter), adapter_name=ADAPTER_NAME, is_trainable=is_trainable)


def base_weights_folder(folder: str | Path) -> Path | None:
    """Where the original base weights of a LoRA checkpoint are: the folder itself in adapter mode,
    None in merged mode (load them from ``model.source``). Raises for a non-LoRA folder."""
    meta = read_meta(folder)
    if meta is None:
        raise ValueError(f"{folder} is not a LoRA checkpoint (no {META_FILE})")
    return Path(folder) if meta["mode"] == "adapter" else None
