"""Configuration blocks of the vision-language path (kept apart so spark_core.config stays readable).

`spark_core.config` uses them as ``model.tiny.vision`` (the tiny Qwen2.5-VL) and ``data.visual`` (the
synthetic visual arithmetic task). Text runs leave both unset/unused.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TinyVisionConfig(_Strict):
    """Vision tower of the tiny random Qwen2.5-VL (`model.tiny.vision`); set = the tiny model sees images."""

    depth: int = Field(2, gt=0, description="Vision transformer blocks.")
    hidden_size: int = Field(32, gt=0, description="Width of the vision tower.")
    intermediate_size: int = Field(64, gt=0, description="Width of the vision MLP.")
    num_heads: int = Field(2, gt=0, description="Attention heads of the vision tower.")
    min_pixels: int = Field(28 * 28 * 4, gt=0, description="Images are scaled up to at least this many pixels.")
    max_pixels: int = Field(28 * 28 * 32, gt=0, description="... and down to at most this many (each 28x28 is one token).")


class VisualArithmeticConfig(_Strict):
    """The synthetic visual task (`data.source: visual_arithmetic`): the `data.arithmetic` questions with
    the expression drawn into an image by Pillow; the text only asks for the value of what is shown."""

    width: int = Field(112, ge=16, le=2048, description="Image width in pixels.")
    height: int = Field(56, ge=16, le=2048, description="Image height in pixels.")
    font_size: int = Field(18, ge=6, le=200, description="Font size of the expression (smaller = harder).")
    noise: int = Field(0, ge=0, description="Grey dots scattered over the image (more = harder).")
    jitter: int = Field(4, ge=0, description="Random offset of the text in pixels.")
    question: str = Field("What is the value of the expression in the image?", description="Question text.")


def drop_unused_vision_fields(payload: dict) -> dict:
    """A config dump without the vision fields a run does not use (in place; returned), so the config
    hash of a text run is what it was before these fields existed and its stored runs still resume."""
    tiny = payload.get("model", {}).get("tiny", {})
    if tiny.get("vision") is None:
        tiny.pop("vision", None)
    data = payload.get("data", {})
    if data.get("image_column") is None:
        data.pop("image_column", None)
    if data.get("source") != "visual_arithmetic" and not any(
            b.get("source") == "visual_arithmetic" for b in payload.get("eval", {}).get("benchmarks", [])):
        data.pop("visual", None)
    for bench in payload.get("eval", {}).get("benchmarks", []):
        if bench.get("image_column") is None:
            bench.pop("image_column", None)
    return payload
