"""Turning chat messages into the exact prompt text an engine sees (one place for templating)."""

from __future__ import annotations

from typing import Any, Callable

from .config import DataConfig

Messages = list[dict[str, Any]]  # content: a string, or a list of parts for image-bearing turns
PromptFormatter = Callable[[Messages], str]


def format_prompt(tokenizer: Any, messages: Messages, use_chat_template: bool = True) -> str:
    """Render messages with the tokenizer's chat template, ending with the assistant turn's opening.

    Without a template (or when disabled) falls back to plain "role: content" lines, so any causal LM
    can be driven. Engines tokenize the result with add_special_tokens=False.
    """
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if any(not isinstance(m["content"], str) for m in messages):
        raise ValueError("messages with image parts need the model's chat template (data.use_chat_template)")
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nassistant:"


def formatter(tokenizer: Any, use_chat_template: bool = True) -> PromptFormatter:
    """A one-argument formatter bound to a tokenizer (what reward_data/reflection take)."""
    return lambda messages: format_prompt(tokenizer, messages, use_chat_template)


def question_messages(data: DataConfig, question: str, images: int = 0) -> Messages:
    """System prompt, few-shot turns, then the question with the reason-then-box instruction; with
    ``images``, that many image parts open the question's turn (``vision.with_images``)."""
    messages: Messages = []
    if data.system_prompt:
        messages.append({"role": "system", "content": data.system_prompt})
    for shot in data.few_shot:
        messages.append({"role": "user", "content": shot.question})
        messages.append({"role": "assistant", "content": shot.answer})
    content = f"{question.rstrip()} {data.instruction}".strip() if data.instruction else question
    messages.append({"role": "user", "content": content})
    if images:
        from .vision import with_images

        return with_images(messages, images)
    return messages
