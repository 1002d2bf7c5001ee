"""Turning chat messages into the exact prompt text an engine sees (one place for templating)."""

from __future__ import annotations

from typing import Any, Callable

from .config import DataConfig

Messages = list[dict[str, str]]
PromptFormatter = Callable[[Messages], str]


def format_prompt(tokenizer: Any, messages: Messages, use_chat_template: bool = True) -> str:
    """Render messages with the tokenizer's chat template, ending with the assistant turn's opening.

    Without a template (or when disabled) falls back to plain "role: content" lines, so any causal LM
    can be driven. Engines tokenize the result with add_special_tokens=False.
    """
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nassistant:"


def formatter(tokenizer: Any, use_chat_template: bool = True) -> PromptFormatter:
    """A one-argument formatter bound to a tokenizer (what reward_data/reflection take)."""
    return lambda messages: format_prompt(tokenizer, messages, use_chat_template)


def question_messages(data: DataConfig, question: str) -> Messages:
    """System prompt, few-shot turns, then the question with the reason-then-box instruction."""
    messages: Messages = []
    if data.system_prompt:
        messages.append({"role": "system", "content": data.system_prompt})
    for shot in data.few_shot:
        messages.append({"role": "user", "content": shot.question})
        messages.append({"role": "assistant", "content": shot.answer})
    content = f"{question.rstrip()} {data.instruction}".strip() if data.instruction else question
    messages.append({"role": "user", "content": content})
    return messages
