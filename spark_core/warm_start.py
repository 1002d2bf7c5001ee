"""Warm start of the tiny model: a short supervised pass on the pipeline's OUTPUT FORMATS.

A randomly initialised tiny Qwen2 never writes an extractable ``\\boxed{}`` answer, so a run on it never
builds a reward item and never reaches the reward phase. This module teaches it the formats of every
role, and nothing about judging:

* **solver**: the exact policy prompt of the run (``chat.question_messages`` + the run's chat template)
  for an arithmetic question, reply ``a + b = c. The answer is \\boxed{c}.``; a share
  ``solver_error_rate`` of the replies has a wrong ``c`` (off by 1, 2 or 10), so that sampled groups
  are mixed (an all-right or all-wrong group carries no GRPO signal) and the judge has wrong answers
  to see;
* **judgment**: the run's own pointwise Yes/No, pointwise A/B and pairwise prompts
  (:mod:`spark_core.prompts`, every wording, the run's judge contexts, in the run's role chat:
  :func:`spark_core.demonstrations.role_prompts`) on right and wrong solver
  replies; the boxed verdict of the reply is drawn **at random, independently of the correctness of
  the judged answer**. With ``judge_reasoning`` the reply first restates the judge's own computation
  (as noisy as the solver's) and the answer(s) shown, with no judging word:
  ``3 + 5 = 8; the response says 9. \\boxed{Yes}`` or ``3 + 5 = 8; (A) says 8, (B) says 9. \\boxed{B}``
  (the layout of the run's demonstrations, minus their judging "and"/"but"). The warm-started judge
  therefore sits at chance; only the reward phase can teach it to compare;
* **reflection**: the run's reflection prompts (CoT and answer modes, explicit and neutral wordings)
  on an earlier attempt (wrong with probability 3/4); the reply is a fresh solver reply (same error
  rate), independent of the attempt shown.

Questions are drawn from the run's arithmetic levels with a separate seed, and the run's held-out test
questions are left out. Loss is on the reply tokens only. Everything is seeded: the same config gives
the same corpus and the same weights; the result is cached as a ``save_pretrained`` folder next to the
tiny model, named by a hash of the tiny config, the warm-start config and the corpus text (so a change
of any prompt wording rebuilds it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import prompts
from .chat import format_prompt, question_messages
from .config import ArithmeticConfig, ArithmeticLevel
from .demonstrations import role_prompts

if TYPE_CHECKING:
    from .config import SparkConfig

log = logging.getLogger(__name__)

# Bump when the recipe changes in a way the corpus hash does not see (training loop, optimizer).
WARM_START_VERSION = 1
_ERROR_DELTAS = (-10, -2, -1, 1, 2, 10)


@dataclass(frozen=True)
class Example:
    kind: str  # solver | pointwise | pairwise | reflection
    prompt: str  # the exact text the engine would be fed (chat template applied)
    reply: str  # the assistant reply (EOS appended at tokenization)


def _levels(cfg: "SparkConfig") -> list[ArithmeticLevel]:
    if cfg.data.source == "arithmetic":
        return list(cfg.data.arithmetic.levels)
    return [ArithmeticLevel(digits=1, operands=2, ops=["+"])]


def _questions(cfg: "SparkConfig", count: int, seed: int) -> list[tuple[str, int]]:
    """(expression, value) pairs from the run's levels, none of them a held-out test question."""
    from .data import make_arithmetic

    test: set[str] = set()
    if cfg.data.source == "arithmetic":
        test = {q.question for q in make_arithmetic(cfg.data.arithmetic, "test")}
    pool_cfg = ArithmeticConfig(levels=_levels(cfg), n_train=count, n_test=1, seed=seed)
    out = []
    for q in make_arithmetic(pool_cfg, "train"):
        if q.question in test:
            continue
        expr = q.question[len("What is "):].rstrip("?")
        out.append((expr, int(q.answer)))
    if not out:
        raise ValueError("warm start: every drawn question is a held-out test question; use harder levels")
    return out


def _value(rng: random.Random, value: int, error_rate: float) -> int:
    if rng.random() < error_rate:
        return value + rng.choice(_ERROR_DELTAS)
    return value


def solver_reply(expr: str, value: int) -> str:
    return f"{expr} = {value}. The answer is \\boxed{{{value}}}."


def warm_start_corpus(cfg: "SparkConfig", tokenizer: Any) -> list[Example]:
    """The supervised examples for ``cfg.model.warm_start`` (deterministic given the config)."""
    ws = cfg.model.warm_start
    if ws is None:
        raise ValueError("model.warm_start is not set")
    rng = random.Random(f"warm-start-{ws.seed}")
    questions = _questions(cfg, max(64, ws.examples // 2), seed=10_000 + ws.seed)
    use_template = cfg.data.use_chat_template
    roles = role_prompts(cfg)  # the run's system prompt (and demonstrations, if any) for judge/reflection chats

    def fmt(messages: Any) -> str:
        return format_prompt(tokenizer, messages, use_template)

    def chat(prompt: Any) -> str:
        return fmt(roles.messages(prompt, rng))
    contexts = sorted({cfg.reward_data.context_mode, cfg.eval.judge_context})
    err = ws.solver_error_rate
    shares = [max(0.0, s) for s in ws.mix]
    kinds = ("solver", "judgment", "reflection")
    out: list[Example] = []
    for _ in range(ws.examples):
        kind = rng.choices(kinds, weights=shares)[0]
        expr, value = rng.choice(questions)
        question = f"What is {expr}?"
        if kind == "solver":
            v = _value(rng, value, err)
            out.append(Example("solver", fmt(question_messages(cfg.data, question)), solver_reply(expr, v)))
            continue
        if kind == "reflection":
            shown = value + rng.choice(_ERROR_DELTAS) if rng.random() < 0.75 else value
            mode = rng.choice(prompts.REFLECTION_MODES)
            explicit = rng.random() < 1 / 3
            idx = prompts.pick_reflection_template(rng, mode, explicit)
            rp = prompts.reflection_request(question, solver_reply(expr, shown), str(shown), mode=mode,
                                            explicit=explicit, template_index=idx)
            v = _value(rng, value, err)
            out.append(Example("reflection", chat(rp), solver_reply(expr, v)))
            continue
        context = rng.choice(contexts)
        computed = _value(rng, value, err)  # the judge's own computation, as noisy as the solver's
        if rng.random() < 0.5:  # pointwise
            shown = value if rng.random() < 0.5 else value + rng.choice(_ERROR_DELTAS)
            style = rng.choice(prompts.POINTWISE_STYLES)
            idx = prompts.pick_pointwise_template(rng, style)
            jp = prompts.pointwise_judgment(question, solver_reply(expr, shown), str(shown),
                                            context_mode=context, style=style, template_index=idx)
            verdict = rng.choice(prompts.POINTWISE_LABELS[style])  # random: NOT the correctness of `shown`
            check = f"{expr} = {computed}; the response says {shown}. " if ws.judge_reasoning else ""
            out.append(Example("pointwise", chat(jp), f"{check}\\boxed{{{verdict}}}"))
        else:  # pairwise: one right and one wrong response, in random order
            wrong = value + rng.choice(_ERROR_DELTAS)
            a, b = (value, wrong) if rng.random() < 0.5 else (wrong, value)
            idx = prompts.pick_pairwise_template(rng)
            jp = prompts.pairwise_judgment(question, solver_reply(expr, a), str(a), solver_reply(expr, b), str(b),
                                           context_mode=context, template_index=idx)
            verdict = rng.choice(prompts.PAIRWISE_LABELS)  # random: NOT the letter of the right one
            check = f"{expr} = {computed}; (A) says {a}, (B) says {b}. " if ws.judge_reasoning else ""
            out.append(Example("pairwise", chat(jp), f"{check}\\boxed{{{verdict}}}"))
    return out


def corpus_digest(examples: list[Example]) -> str:
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex.kind, ex.prompt, ex.reply]).encode())
    return h.hexdigest()[:12]


def warm_start_folder_name(cfg: "SparkConfig", examples: list[Example]) -> str:
    payload = {
        "tiny": cfg.model.tiny.model_dump(mode="json", exclude_none=True),  # text: named as before `vision`
        "warm_start": cfg.model.warm_start.model_dump(mode="json") if cfg.model.warm_start else None,
        "corpus": corpus_digest(examples),
        "v": WARM_START_VERSION,
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]
    return f"tiny-sft-{digest}"


def _encode(tokenizer: Any, examples: list[Example], max_len: int) -> list[tuple[list[int], int]]:
    """(ids, prompt_len) per example: prompt and reply tokenized apart, as the engine sees them."""
    eos = tokenizer.eos_token or ""
    out = []
    for ex in examples:
        p = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
        r = tokenizer(ex.reply + eos, add_special_tokens=False)["input_ids"]
        ids = (p + r)[-max_len:]
        out.append((ids, max(0, len(ids) - len(r))))
    return out


def train_warm_start(model: Any, tokenizer: Any, cfg: "SparkConfig", examples: list[Example]) -> dict[str, Any]:
    """The supervised pass, in place on ``model`` (CPU, float32): reply-token cross-entropy, AdamW."""
    ws = cfg.model.warm_start
    assert ws is not None
    started = time.time()
    encoded = _encode(tokenizer, examples, cfg.model.tiny.max_position_embeddings)
    # by_kind_batches: batches of one kind each (drawn by the share of that kind in the corpus): solver
    # examples are a fifth as long as judgment ones, so mixed batches mostly train on padding.
    by_kind: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        by_kind.setdefault(ex.kind if ws.by_kind_batches else "all", []).append(i)
    kinds = sorted(by_kind)
    kind_weights = torch.tensor([float(len(by_kind[k])) for k in kinds])
    pad = tokenizer.pad_token_id
    gen = torch.Generator().manual_seed(ws.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=ws.lr, betas=(0.9, 0.98), weight_decay=0.0)
    warmup = max(1, ws.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 1.0 - 0.9 * (s - warmup) / max(1, ws.steps - warmup)
    )
    model.train()
    losses = []
    for _step in range(ws.steps):
        if ws.by_kind_batches:
            members = by_kind[kinds[int(torch.multinomial(kind_weights, 1, generator=gen))]]
        else:
            members = by_kind["all"]
        idx = torch.randint(len(members), (ws.batch_size,), generator=gen).tolist()
        batch = [encoded[members[i]] for i in idx]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        attn = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (ids, plen) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, plen: len(ids)] = torch.tensor(ids[plen:])
            attn[row, : len(ids)] = 1
        loss = model(input_ids=input_ids, attention_mask=attn, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (_step + 1) % 100 == 0:
            log.info("warm start step %d/%d: loss %.3f", _step + 1, ws.steps, sum(losses[-100:]) / 100)
    model.eval()
    tail = losses[-max(1, len(losses) // 10):]
    return {"steps": ws.steps, "final_loss": sum(tail) / len(tail), "seconds": round(time.time() - started, 1),
            "examples": len(examples)}


def warm_start_folder(cfg: "SparkConfig") -> Path:
    """The cached warm-started tiny model of ``cfg`` (built on first use; see the module docstring)."""
    from .models import _build_atomically, _cache_root, _model_class, load_tokenizer, save_checkpoint, tiny_folder

    base = tiny_folder(cfg.model.tiny, cfg.model.cache_dir)
    tokenizer = load_tokenizer(base)
    examples = warm_start_corpus(cfg, tokenizer)
    target = _cache_root(cfg.model.cache_dir) / warm_start_folder_name(cfg, examples)

    def build(tmp: Path) -> None:
        log.info("warm-starting the tiny model on the output formats (once): %s", target.name)
        threads = torch.get_num_threads()
        # One thread: for a model this small, more threads mostly wait on each other (measured 5-10x
        # slower per step with 2 threads on a loaded 2-core machine).
        torch.set_num_threads(1)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.model.warm_start.seed)  # type: ignore[union-attr]
                # a tiny VL model learns the formats from text turns (its language half; images come later)
                model = _model_class(str(base)).from_pretrained(str(base), dtype=torch.float32)
                stats = train_warm_start(model, tokenizer, cfg, examples)
        finally:
            torch.set_num_threads(threads)
        save_checkpoint(model, tokenizer, tmp)
        (tmp / "warm_start.json").write_text(json.dumps(
            {**stats, "config": cfg.model.warm_start.model_dump(mode="json"),  # type: ignore[union-attr]
             "corpus": corpus_digest(examples)}, indent=2))
        log.info("warm start done: %s", stats)

    return _build_atomically(target, build)


__all__ = ["Example", "WARM_START_VERSION", "corpus_digest", "solver_reply", "train_warm_start",
           "warm_start_corpus", "warm_start_folder", "warm_start_folder_name"]
