"""The in-process GRPO trainer shared by both SPARK phases (same optimizer, same LR schedule).

One ``Trainer`` lives for a whole run segment. ``train_phase`` takes the verified rollouts of one
phase (policy or reward), recomputes the old log-probs with the current weights (engines return only
text and token ids), and runs ``epochs`` passes of clipped GRPO updates. Each optimizer step yields one
row of the TRAIN table (``spark_core.schemas.TRAIN``). ``save_state`` / ``load_state`` carry the
optimizer, the schedule and the step counter across processes so a resumed run continues exactly.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch

from .config import SparkConfig, TrainConfig
from .grpo import group_advantages, grpo_loss, sequence_logprobs
from .schemas import TRAIN

log = logging.getLogger(__name__)

Phase = Literal["policy", "reward"]
STATE_FILE = "trainer_state.pt"
REQUIRED_COLUMNS = ("prompt", "completion_ids", "reward", "question_id")


# ------------------------------------------------------------------------------------ schedule


def _steps_per_phase(sequences: int, mini_batch_size: int | None, epochs: int) -> int:
    if sequences <= 0:
        return 0
    per_epoch = math.ceil(sequences / mini_batch_size) if mini_batch_size else 1
    return per_epoch * epochs


def planned_optimizer_steps(cfg: SparkConfig) -> int:
    """Optimizer steps the whole run takes, counting BOTH phases (the LR schedule spans all of them).

    Per iteration: the policy phase trains ``questions_per_iteration * n`` sequences and the reward
    phase ``reward_batch_size * reward_n`` (when the reward phase can run at all); each phase takes
    ``ceil(sequences / mini_batch_size) * epochs`` steps (one step per epoch without a mini-batch size).
    ``train.total_steps`` overrides the count. The reward phase is counted every iteration although
    it only runs once the pool is full; a schedule that is not fully used just ends above its floor.
    """
    t = cfg.train
    if t.total_steps is not None:
        return t.total_steps
    policy = _steps_per_phase(cfg.sampling.questions_per_iteration * cfg.sampling.n, t.mini_batch_size, t.epochs)
    rd = cfg.reward_data
    reward_runs = rd.enabled and (rd.judgment or rd.reflection)
    reward = _steps_per_phase(rd.reward_batch_size * cfg.reward_n, t.mini_batch_size, t.epochs) if reward_runs else 0
    return max(1, cfg.iterations * (policy + reward))


def lr_factor(step: int, total_steps: int, warmup_ratio: float, min_lr_ratio: float) -> float:
    """Multiplier of the peak LR for 0-based optimizer step ``step``.

    Linear warm-up over ``ceil(warmup_ratio * total_steps)`` steps (the first step already gets
    ``1/warmup`` of the peak, never 0), then cosine decay reaching ``min_lr_ratio`` at ``total_steps``;
    steps beyond the plan stay at the floor.
    """
    warmup = math.ceil(warmup_ratio * total_steps)
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------- batching


@dataclass
class _Sequence:
    """One rollout ready for training: prompt+completion ids and per-token tensors aligned to them."""

    ids: list[int]
    prompt_len: int
    advantage: float
    reward: float
    old_logp: torch.Tensor | None = None  # [len(ids)], zero on prompt positions
    ref_logp: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.ids) - self.prompt_len


@dataclass
class _Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    advantages: torch.Tensor
    old_logp: torch.Tensor | None
    ref_logp: torch.Tensor | None


def _collate(seqs: list[_Sequence], device: torch.device, pad_id: int) -> _Batch:
    """Right-pad a list of sequences (right padding keeps default position ids correct)."""
    width = max(len(s.ids) for s in seqs)
    n = len(seqs)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    attn = torch.zeros((n, width), dtype=torch.long)
    comp = torch.zeros((n, width), dtype=torch.long)
    old = torch.zeros((n, width)) if seqs[0].old_logp is not None else None
    ref = torch.zeros((n, width)) if seqs[0].ref_logp is not None else None
    for i, s in enumerate(seqs):
        L = len(s.ids)
        ids[i, :L] = torch.tensor(s.ids, dtype=torch.long)
        attn[i, :L] = 1
        comp[i, s.prompt_len : L] = 1
        if old is not None:
            old[i, :L] = s.old_logp
        if ref is not None:
            ref[i, :L] = s.ref_logp
    adv = torch.tensor([s.advantage for s in seqs], dtype=torch.float32)
    return _Batch(
        ids.to(device),
        attn.to(device),
        comp.to(device),
        adv.to(device),
        None if old is None else old.to(device),
        None if ref is None else ref.to(device),
    )


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# ----------------------------------------------------------------------------------- trainer


class Trainer:
    """GRPO optimisation of one model over both SPARK phases.

    ``total_steps`` is the length of the LR schedule (see ``planned_optimizer_steps``). ``ref_model``
    is the frozen initial model for the k3 KL term; it is required when ``train_cfg.kl_coef > 0`` so
    that a missing reference can never silently drop the penalty (and unused when it is 0: no reference
    forward passes are spent then). ``temperature`` is the sampling
    temperature of the rollouts: log-probs (old, new, reference) are taken from logits divided by it,
    so the importance ratio compares the distribution that was actually sampled.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        train_cfg: TrainConfig,
        device: torch.device | str,
        total_steps: int,
        ref_model: torch.nn.Module | None = None,
        temperature: float = 1.0,
    ) -> None:
        if total_steps <= 0:
            raise ValueError(f"total_steps must be positive, got {total_steps}")
        if temperature <= 0:
            raise ValueError(
                f"temperature must be positive for GRPO (got {temperature}): greedy rollouts are all "
                "identical, so every group would have zero advantage"
            )
        if train_cfg.kl_coef > 0 and ref_model is None:
            raise ValueError(
                f"train.kl_coef is {train_cfg.kl_coef} but no ref_model was given: pass the frozen "
                "initial model, or set train.kl_coef=0 to train without the KL penalty"
            )
        self.cfg = train_cfg
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.tokenizer = tokenizer
        self.total_steps = total_steps
        self.temperature = float(temperature)
        self.global_step = 0  # optimizer steps taken so far, both phases
        self.ref_model = None
        if ref_model is not None and train_cfg.kl_coef > 0:
            self.ref_model = ref_model.to(self.device).eval()
            self.ref_model.requires_grad_(False)
        if train_cfg.gradient_checkpointing:
            # Non-reentrant checkpointing works with inputs that do not require grad (frozen embeddings).
            # transformers 5.x renamed the switch; older 5.x releases only have the first name.
            enable = getattr(self.model, "activation_checkpointing_enable", None)
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        self.optimizer = torch.optim.AdamW(
            self.params, lr=train_cfg.lr, betas=tuple(train_cfg.betas), weight_decay=train_cfg.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_lambda)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = int(pad) if pad is not None else 0  # any valid id: padding is masked out

    # -------------------------------------------------------------------------- helpers

    def _lr_lambda(self, step: int) -> float:
        return lr_factor(step, self.total_steps, self.cfg.warmup_ratio, self.cfg.min_lr_ratio)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        """bf16 autocast on CUDA (fp32 or bf16 weights); on CPU everything stays fp32."""
        if self.device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _prepare(self, rows: pd.DataFrame) -> list[_Sequence]:
        missing = [c for c in REQUIRED_COLUMNS if c not in rows.columns]
        if missing:
            raise ValueError(f"train_phase rows lack column(s) {missing}; got {list(rows.columns)}")
        rewards = torch.tensor(rows["reward"].astype(float).to_numpy(), dtype=torch.float64)
        adv = group_advantages(rewards, rows["question_id"].astype(str).tolist(), eps=self.cfg.adv_eps)
        vocab = self.model.get_input_embeddings().num_embeddings
        prompt_ids: dict[str, list[int]] = {}  # the K samples of a question share one prompt
        seqs = []
        for i, (prompt, completion) in enumerate(zip(rows["prompt"], rows["completion_ids"])):
            if prompt not in prompt_ids:
                ids = list(self.tokenizer(prompt, add_special_tokens=False).input_ids)
                if not ids:
                    raise ValueError(f"row {i}: the prompt tokenizes to nothing; a completion needs context")
                prompt_ids[prompt] = ids
            p = prompt_ids[prompt]
            completion_ids = [int(t) for t in completion]
            if any(t < 0 or t >= vocab for t in completion_ids):
                raise ValueError(
                    f"row {i}: completion_ids hold ids outside the model's vocabulary of {vocab}; "
                    "were the rollouts sampled with another tokenizer?"
                )
            seqs.append(_Sequence(p + completion_ids, len(p), float(adv[i]), float(rewards[i])))
        return seqs

    @torch.no_grad()
    def _score(self, model: torch.nn.Module, seqs: list[_Sequence]) -> list[torch.Tensor]:
        """Per-sequence log-probs (on CPU, aligned to ids) under ``model``, without gradients."""
        was_training = model.training
        model.eval()
        out: list[torch.Tensor] = []
        try:
            for chunk in _chunks(seqs, self.cfg.micro_batch_size):
                b = _collate(chunk, self.device, self.pad_id)
                with self._autocast():
                    lp = sequence_logprobs(
                        model, b.input_ids, b.attention_mask, b.completion_mask, self.temperature
                    )
                out.extend(lp[i, : len(s.ids)].float().cpu() for i, s in enumerate(chunk))
        finally:
            model.train(was_training)
        return out

    def _order(self, n: int, epoch: int, phase_start: int) -> list[int]:
        """Sequence order of one epoch: shuffled with a seed fixed by the step the phase started at,
        so a resumed run replays the same order (no global RNG involved)."""
        if not self.cfg.mini_batch_size or self.cfg.mini_batch_size >= n:
            return list(range(n))  # one mini-batch: order cannot matter beyond float rounding
        gen = torch.Generator().manual_seed(1_000_003 * phase_start + epoch)
        return torch.randperm(n, generator=gen).tolist()

    # ------------------------------------------------------------------------------ train

    def train_phase(self, rows: pd.DataFrame, phase: Phase) -> list[dict[str, Any]]:
        """Run GRPO on one phase's verified rollouts; return one TRAIN row per optimizer step.

        ``rows`` needs ``prompt`` (the exact text the engine saw), ``completion_ids``, ``reward`` and
        ``question_id`` (the GRPO group key). Groups whose rewards all agree get zero advantage and stay
        in the batch (they still feel the KL term). An empty frame trains nothing and returns [].
        """
        if phase not in ("policy", "reward"):
            raise ValueError(f"phase must be 'policy' or 'reward', got {phase!r}")
        if len(rows) == 0:
            return []
        seqs = self._prepare(rows)
        # Old log-probs come from the weights before any update of this phase (the sampling policy).
        for s, lp in zip(seqs, self._score(self.model, seqs)):
            s.old_logp = lp
        if self.ref_model is not None:
            for s, lp in zip(seqs, self._score(self.ref_model, seqs)):
                s.ref_logp = lp

        was_training = self.model.training
        self.model.train()
        mini = self.cfg.mini_batch_size or len(seqs)
        phase_start = self.global_step
        out_rows: list[dict[str, Any]] = []
        for epoch in range(self.cfg.epochs):
            order = self._order(len(seqs), epoch, phase_start)
            for mb_idx in _chunks(order, mini):
                out_rows.append(self._optimizer_step([seqs[i] for i in mb_idx], phase))
        self.model.train(was_training)  # callers (engines, evaluation) get the model back as it was
        return out_rows

    def _optimizer_step(self, batch: list[_Sequence], phase: Phase) -> dict[str, Any]:
        """Accumulate gradients over micro-batches (token-mean over the whole mini-batch), then step."""
        num_tokens = sum(s.num_tokens for s in batch)
        totals = {"loss": 0.0, "pg_loss": 0.0, "kl": 0.0, "clip_frac": 0.0}
        self.optimizer.zero_grad(set_to_none=True)
        for micro in _chunks(batch, self.cfg.micro_batch_size):
            b = _collate(micro, self.device, self.pad_id)
            with self._autocast():
                logp = sequence_logprobs(
                    self.model, b.input_ids, b.attention_mask, b.completion_mask, self.temperature
                )
            loss, stats = grpo_loss(
                logp,
                b.old_logp,
                b.advantages,
                b.completion_mask,
                clip_eps=self.cfg.clip_eps,
                ref_logp=b.ref_logp,
                kl_coef=self.cfg.kl_coef,
                num_tokens=num_tokens,
            )
            loss.backward()
            totals["loss"] += float(loss.detach().item())
            for key in ("pg_loss", "kl", "clip_frac"):
                totals[key] += stats[key]
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        lr = float(self.optimizer.param_groups[0]["lr"])
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        row = {
            "step": self.global_step,
            "phase": phase,
            "loss": totals["loss"],
            "pg_loss": totals["pg_loss"],
            "kl": totals["kl"],
            "grad_norm": float(grad_norm),
            "lr": lr,
            "clip_frac": totals["clip_frac"],
            "mean_reward": sum(s.reward for s in batch) / len(batch),
            "num_sequences": len(batch),
            "num_tokens": num_tokens,
        }
        return {name: row[name] for name in TRAIN.names}

    # ------------------------------------------------------------------------------ state

    def save_state(self, folder: str | Path) -> Path:
        """Write optimizer, scheduler, step counter and RNG states to ``folder/trainer_state.pt``.

        The model weights are saved separately (``models.save_checkpoint``). The write goes through a
        temporary file so a crash never leaves half a state file.
        """
        path = Path(folder) / STATE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "global_step": self.global_step,
            "total_steps": self.total_steps,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }
        tmp = path.with_suffix(".pt.tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)
        return path

    def load_state(self, folder: str | Path) -> None:
        """Restore what ``save_state`` wrote; the model must already hold the matching weights."""
        path = Path(folder) / STATE_FILE
        if not path.exists():
            raise FileNotFoundError(f"no trainer state at {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])  # moves tensors to the params' device
        self.scheduler.load_state_dict(state["scheduler"])
        self.global_step = int(state["global_step"])
        if state["total_steps"] != self.total_steps:
            log.info("schedule length changed on resume: %s -> %s steps", state["total_steps"], self.total_steps)
        # The restored lr belongs to the saved schedule; recompute it from this trainer's schedule.
        factor = self._lr_lambda(self.scheduler.last_epoch)
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * factor
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
