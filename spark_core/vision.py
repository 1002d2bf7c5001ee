"""Vision-language models: the tiny random Qwen2.5-VL, chat messages with image parts, and model inputs.

A Qwen2-VL / Qwen2.5-VL prompt holds one ``<|vision_start|><|image_pad|><|vision_end|>`` per image (what
the chat template writes for an ``{"type": "image"}`` content part). Before the model sees it, each
``<|image_pad|>`` is repeated once per merged patch of its image (``grid_t * grid_h * grid_w / merge**2``)
and the image processor turns the images into ``pixel_values`` and ``image_grid_thw``.
`VisionInputs.encode` does exactly that (what ``Qwen2VLProcessor`` does, without its video processor,
which needs torchvision). Stored prompts keep the short form; engines and the trainer expand them.

The tiny model (``model.tiny.vision`` set) is a Qwen2.5-VL of a few hundred K parameters: the tiny
tokenizer plus the four vision tokens, a template that renders string or part-list contents, and the
PIL image processor; built from the seed, cached like the text tiny model (``spark_core.models``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .images import MAX_PIXELS, model_image

VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"
VISION_TOKENS = [VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD]
IMAGE_PLACEHOLDER = VISION_START + IMAGE_PAD + VISION_END

# The tiny template (ChatML like the text tiny model's): string contents render as before; a list of parts
# renders image parts as the vision placeholder and text parts as their text.
VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

if TYPE_CHECKING:
    import torch

Messages = list[dict[str, Any]]


# ------------------------------------------------------------------------------------------ messages


def with_images(messages: Messages, count: int, max_pixels: int = MAX_PIXELS) -> Messages:
    """``messages`` with ``count`` image parts put before the text of the LAST user turn (the one that
    carries the question); unchanged when ``count`` is 0. Each part records the ``max_pixels`` cap."""
    if count <= 0:
        return messages
    out = [dict(m) for m in messages]
    for m in reversed(out):
        if m["role"] == "user":
            text = m["content"] if isinstance(m["content"], str) else "".join(
                p.get("text", "") for p in m["content"] if p.get("type") == "text")
            m["content"] = [{"type": "image", "max_pixels": max_pixels} for _ in range(count)] + [
                {"type": "text", "text": text}]
            return out
    raise ValueError("messages have no user turn to attach the image(s) to")


def count_placeholders(prompt: str) -> int:
    return prompt.count(IMAGE_PAD)


# ------------------------------------------------------------------------------------------ inputs


def is_vision_folder(folder: str | Path) -> bool:
    """Whether a model folder holds a vision-language model (its config has a vision tower)."""
    path = Path(folder) / "config.json"
    return path.is_file() and "vision_config" in json.loads(path.read_text())


def load_image_processor(folder: str | Path) -> Any:
    """The folder's Qwen2-VL image processor (PIL backend: no torchvision needed)."""
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil.from_pretrained(str(folder))


class VisionInputs:
    """Turns (prompt with placeholders, images) into model inputs: expanded ids, pixel values, grids.

    ``load`` maps an image reference to its bytes (``images.ImageCache``); images are shown capped at
    ``max_pixels`` (`images.model_image`) before the image processor applies its own limits."""

    def __init__(self, tokenizer: Any, image_processor: Any, load: Callable[[str], bytes] | None = None,
                 max_pixels: int = MAX_PIXELS) -> None:
        self.tokenizer, self.image_processor, self.load = tokenizer, image_processor, load
        self.max_pixels = max_pixels
        self.merge = int(getattr(image_processor, "merge_size", 2))

    def pictures(self, images: Sequence[Any]) -> list[Any]:
        """PIL images from references (via ``load``), bytes, or PIL images."""
        out = []
        for img in images:
            if isinstance(img, str):
                if self.load is None:
                    raise ValueError("image references need a loader (VisionInputs(load=...))")
                img = self.load(img)
            out.append(model_image(img, self.max_pixels) if isinstance(img, (bytes, bytearray)) else img)
        return out

    def encode(self, prompt: str, images: Sequence[Any]) -> tuple[list[int], dict[str, torch.Tensor] | None]:
        """Token ids of ``prompt`` with each image placeholder expanded, and the vision tensors (None
        without images). The number of images must match the placeholders."""
        pieces = prompt.split(IMAGE_PAD)
        if len(pieces) - 1 != len(images):
            raise ValueError(f"the prompt has {len(pieces) - 1} image placeholder(s) but {len(images)} image(s) came with it")
        if not images:
            return list(self.tokenizer(prompt, add_special_tokens=False).input_ids), None
        vision = self.image_processor(images=self.pictures(images), return_tensors="pt")
        grids = vision["image_grid_thw"]
        text = pieces[0]
        for grid, piece in zip(grids, pieces[1:]):
            text += IMAGE_PAD * (int(grid.prod()) // self.merge**2) + piece
        ids = list(self.tokenizer(text, add_special_tokens=False).input_ids)
        return ids, {"pixel_values": vision["pixel_values"], "image_grid_thw": grids}


def collate_vision(parts: Sequence[dict[str, torch.Tensor] | None], device: torch.device | str) -> dict[str, torch.Tensor]:
    """One batch's vision tensors: each row's, concatenated in row order (the order in which the model
    meets the image tokens of the flattened batch); empty when no row has an image."""
    import torch

    present = [p for p in parts if p is not None]
    if not present:
        return {}
    return {key: torch.cat([p[key] for p in present]).to(device) for key in ("pixel_values", "image_grid_thw")}


# ------------------------------------------------------------------------------------------ tiny


def mrope_section(head_dim: int) -> list[int]:
    """Qwen2-VL's split of the rotary half-dimension into (time, height, width): 1/4, 3/8, 3/8."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def write_tiny_vl(tiny_cfg: Any, folder: Path, tokenizer: Any, save: Callable[..., None]) -> None:
    """Build the tiny Qwen2.5-VL from the text tokenizer (vision tokens added) and save it in ``folder``."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

    vis = tiny_cfg.vision
    tokenizer.add_special_tokens({"additional_special_tokens": VISION_TOKENS})
    tokenizer.chat_template = VL_CHAT_TEMPLATE
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    head_dim = tiny_cfg.hidden_size // tiny_cfg.num_attention_heads
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=tiny_cfg.hidden_size,
            intermediate_size=tiny_cfg.intermediate_size, num_hidden_layers=tiny_cfg.num_hidden_layers,
            num_attention_heads=tiny_cfg.num_attention_heads, num_key_value_heads=tiny_cfg.num_key_value_heads,
            max_position_embeddings=tiny_cfg.max_position_embeddings, tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope_section(head_dim)},
            bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            depth=vis.depth, hidden_size=vis.hidden_size, intermediate_size=vis.intermediate_size,
            num_heads=vis.num_heads, out_hidden_size=tiny_cfg.hidden_size, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[vis.depth - 1],
        ),
        image_token_id=ids[IMAGE_PAD], video_token_id=ids[VIDEO_PAD],
        vision_start_token_id=ids[VISION_START], vision_end_token_id=ids[VISION_END], tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tiny_cfg.seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    save(model, tokenizer, folder)
    processor = Qwen2VLImageProcessorPil(min_pixels=vis.min_pixels, max_pixels=vis.max_pixels,
                                         patch_size=14, merge_size=2, temporal_patch_size=2)
    processor.save_pretrained(str(folder))
