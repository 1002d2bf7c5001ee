"""Choosing the rollout engine from the config: ``sampling.engine`` = hf | vllm | openai.

``make_engine`` is what the sampling and evaluation stages call. ``checkpoint_dir`` is the LOCAL folder
of the weights to sample from (the stage downloads the iteration's checkpoint from the store once); the
hf engine samples from the in-memory ``model`` instead. LoRA checkpoints (see :mod:`spark_core.lora`) are
handled here: merged ones load like any model folder, adapter ones pass base + adapter to the engine.
Callers must ``close()`` the engine when the phase ends (the vLLM worker then frees the GPU).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

from ..config import SparkConfig
from .base import Engine

log = logging.getLogger(__name__)


def adapter_name(adapter_dir: str | os.PathLike[str]) -> str:
    """A server-side name unique to this adapter's files (checkpoint folders are often all called
    `checkpoint`, and a LoRA server refuses to load a second adapter under a name it already has)."""
    folder = Path(adapter_dir).resolve()
    weights = next(folder.glob("adapter_model.*"), None)
    stamp = f"{folder}|{weights.stat().st_mtime_ns if weights else 0}"
    return "spark-" + hashlib.sha256(stamp.encode()).hexdigest()[:12]


def vllm_engine_from_config(cfg: SparkConfig, checkpoint_dir: str | os.PathLike[str]) -> Any:
    from ..lora import engine_weights
    from .vllm import VLLMEngine

    weights = engine_weights(checkpoint_dir)
    s = cfg.sampling
    return VLLMEngine(
        weights.model_path,
        s.vllm_python,
        tensor_parallel_size=s.tensor_parallel_size,
        gpu_memory_utilization=s.gpu_memory_utilization,
        dtype=cfg.model.dtype,  # vLLM's "auto" reads the checkpoint's own dtype
        seed=cfg.seed,
        # vLLM also has a CPU build; only a run configured for the CPU may use it
        require_cuda=cfg.device != "cpu",
        lora_path=weights.adapter_path,
        max_lora_rank=weights.rank,
        trust_remote_code=cfg.model.trust_remote_code,
        limit_mm_per_prompt=_image_limit(weights.model_path),
        enable_sleep_mode=s.vllm_sleep_mode,
    )


# Images per prompt vLLM reserves room for with a vision-language checkpoint: the pipeline shows a
# question's images once per prompt, and the paper's sets have one image per question.
VLLM_IMAGES_PER_PROMPT = 4


def _image_limit(model_path: str | os.PathLike[str]) -> dict[str, int] | None:
    from ..vision import is_vision_folder

    return {"image": VLLM_IMAGES_PER_PROMPT} if is_vision_folder(model_path) else None


def openai_engine_from_config(
    cfg: SparkConfig, tokenizer: Any, checkpoint_dir: str | os.PathLike[str] | None
) -> Any:
    """The openai engine, pointed at ``checkpoint_dir``: by the reload hook when configured, else by
    loading an adapter checkpoint through vLLM's LoRA endpoint; otherwise the server keeps its weights."""
    from ..lora import engine_weights
    from .openai import OpenAIEngine

    s = cfg.sampling
    engine = OpenAIEngine(
        s.openai_base_url or "",
        s.openai_model,
        tokenizer=tokenizer,
        timeout_s=s.request_timeout_s,
        reload_command=s.openai_reload_command,
    )
    if checkpoint_dir is None:
        return engine
    weights = engine_weights(checkpoint_dir)
    if s.openai_reload_command:
        engine.reload(checkpoint_dir)
    elif weights.adapter_path is not None:
        engine.use_lora_adapter(weights.adapter_path, adapter_name(weights.adapter_path))
    else:
        log.warning(
            "sampling.openai_reload_command is not set: %s keeps serving the weights it was started with, "
            "not %s (fine for evaluating a fixed model; training needs the current policy)",
            s.openai_base_url, checkpoint_dir,
        )
    return engine


def make_engine(
    cfg: SparkConfig, model: Any, tokenizer: Any, checkpoint_dir: str | os.PathLike[str] | None
) -> Engine:
    """The configured engine. hf needs ``model``; vllm needs ``checkpoint_dir``; openai uses
    ``checkpoint_dir`` to point the server at new weights and ``tokenizer`` when the server returns no
    token ids."""
    kind = cfg.sampling.engine
    if kind == "hf":
        if model is None:
            raise ValueError("sampling.engine=hf samples from the in-memory model: pass model")
        from .hf import HFEngine

        return HFEngine(model, tokenizer, batch_size=cfg.sampling.batch_size)
    if kind == "vllm":
        if checkpoint_dir is None:
            raise ValueError("sampling.engine=vllm loads weights from a local checkpoint folder: pass checkpoint_dir")
        return vllm_engine_from_config(cfg, checkpoint_dir)
    if kind == "openai":
        return openai_engine_from_config(cfg, tokenizer, checkpoint_dir)
    raise ValueError(f"unknown sampling.engine {kind!r}")


# Which kinds sample from the in-process model (they follow every update of the live weights, nothing to
# reload), and which load a checkpoint folder in a process of their own on this machine's accelerator
# (the in-process model has to give the accelerator up first). openai is neither: its server lives elsewhere
# and is pointed at each new checkpoint folder.
_LIVE_MODEL_KINDS = frozenset({"hf"})
_OWN_ACCELERATOR_KINDS = frozenset({"vllm"})


def uses_live_model(kind: str) -> bool:
    """Whether an engine of this kind samples from the in-process weights (so it stays valid after training)."""
    return kind in _LIVE_MODEL_KINDS


def needs_free_accelerator(kind: str) -> bool:
    """Whether an engine of this kind loads its weights onto this machine's accelerator in another process."""
    return kind in _OWN_ACCELERATOR_KINDS


def keeps_engine(cfg: SparkConfig) -> bool:
    """Whether one engine process serves every phase, sharing the accelerator with the trainer (it sleeps
    while the trainer runs and takes new weights in place) instead of being stopped before each update."""
    return cfg.sampling.engine == "vllm" and cfg.sampling.vllm_sleep_mode
