"""The in-process GRPO trainer shared by both SPARK phases (same optimizer, same LR schedule).

One ``Trainer`` lives for a whole run segment. ``train_phase`` takes the verified rollouts of one
phase (policy or reward) and runs ``epochs`` passes of clipped GRPO updates over them. Engines return
only text and token ids, so the trainer computes every log-prob itself:

* old log-probs (the sampling policy's): when the phase is ONE optimizer step (a single mini-batch
  holding every row, one epoch) they equal the current weights' log-probs at that step, so the
  training forward's own ``logp.detach()`` serves (ratio exactly 1, same gradient) and no extra
  forward is spent; with several steps they are recomputed once, before the first update;
* reference log-probs (frozen initial model, k3 KL) once per phase, whatever the number of epochs.

Log-probs are computed for completion tokens only, from left-padded micro-batches
(``spark_core.batching``). In one process the training forward runs each shared prompt once for all of
its completions (``spark_core.prefix_scoring``: a differentiable KV cache), and so does the reference;
the values equal full forwards up to float rounding.

Several ranks (``spark_core.distributed``; torchrun DDP or accelerate FSDP): every rank holds all rows,
computes all advantages and the same mini-batch plan, and trains on ``distributed.shard`` of each
mini-batch. The loss is normalised by the mini-batch's GLOBAL token count and scaled by the world size
(DDP/FSDP average gradients), so the update equals the single-process one. Every rank runs the same
number of forward/backward calls per step (short shards get an empty filler micro-batch), which FSDP's
and DDP's collectives require.

Each optimizer step yields one row of the TRAIN table (``spark_core.schemas.TRAIN``). ``save_state`` /
``load_state`` carry the optimizer, the schedule and the step counter across processes so a resumed
run continues exactly.
"""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch

from . import distributed
from .config import SparkConfig, TrainConfig
from .batching import (
    MicroBatch, TrainSequence, collate, completion_logprobs, in_chunks, length_sorted_micro_batches,
    lockstep_micro_batches, prompt_group_micro_batches,
)
from .grpo import group_advantages, grpo_loss
from .multimodal_batch import multimodal_images
from .prefix_scoring import (
    repeated_prompt_tokens, shared_prompt_logprobs, shared_prompt_logprobs_with_grad, worth_sharing,
)
from .schemas import TRAIN
from .trainer_state import (
    STATE_FILE, is_sharded, optimizer_state_to_indexed, optimizer_state_to_named, read_state, write_state,
)

log = logging.getLogger(__name__)

Phase = Literal["policy", "reward"]
REQUIRED_COLUMNS = ("prompt", "completion_ids", "reward", "question_id")


# ------------------------------------------------------------------------------------ schedule


def planned_optimizer_steps(cfg: SparkConfig) -> int:
    """Optimizer steps the whole run takes, counting BOTH phases (the LR schedule spans all of them).

    Per iteration: the policy phase trains ``questions_per_iteration * n`` sequences and the reward
    phase ``reward_batch_size * reward_n`` (when the reward phase can run at all); each phase takes
    ``ceil(sequences / mini_batch_size) * epochs`` steps (one step per epoch without a mini-batch size).
    ``train.total_steps`` overrides the count. The reward phase is counted every iteration although
    it only runs once the pool is full; a schedule that is not fully used just ends above its floor.
    """
    return cfg.planned_optimizer_steps()


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


# ----------------------------------------------------------------------------------- trainer


class Trainer:
    """GRPO optimisation of one model over both SPARK phases.

    ``total_steps`` is the length of the LR schedule (see ``planned_optimizer_steps``). ``ref_model``
    is the frozen initial model for the k3 KL term; it is required when ``train_cfg.kl_coef > 0`` so
    that a missing reference can never silently drop the penalty (and unused when it is 0: no reference
    forward passes are spent then). ``temperature`` is the sampling
    temperature of the rollouts: log-probs (old, new, reference) are taken from logits divided by it,
    so the importance ratio compares the distribution that was actually sampled.

    Under several ranks (``distributed.current().enabled``) the model and optimizer are wrapped with
    ``distributed.prepare_for_training`` (pass the plain model); ``self.model`` is then the wrapper and
    ``self.raw_model`` the plain model.
    """

    # The reference pass forwards each shared prompt once (`prefix_scoring`); False: a full forward each.
    score_prompts_once = True
    # The training forward does too, with gradients (one process, text only, no activation
    # checkpointing: transformers turns the KV cache off under checkpointing); False: full forwards.
    train_prompts_once = True

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
        self.dist = distributed.current()
        self.device = torch.device(device)
        self.tokenizer = tokenizer
        self.total_steps = total_steps
        self.temperature = float(temperature)
        self.global_step = 0  # optimizer steps taken so far, both phases
        self.ref_model = None
        if ref_model is not None and train_cfg.kl_coef > 0:
            self.ref_model = ref_model.to(self.device).eval()
            self.ref_model.requires_grad_(False)
        # A caller may hand over an already wrapped model (DDP); it is then used as it is.
        prewrapped = distributed.unwrap(model, self.dist) is not model
        plain = distributed.unwrap(model, self.dist)
        if not prewrapped:
            plain = plain.to(self.device)
        if train_cfg.gradient_checkpointing:
            # Non-reentrant checkpointing works with inputs that do not require grad (frozen embeddings).
            # transformers 5.x renamed the switch; older 5.x releases only have the first name.
            enable = getattr(plain, "activation_checkpointing_enable", None)
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                plain.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        named = [(name, p) for name, p in plain.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameters")
        self._param_names = [name for name, _ in named]  # optimizer state order (see save_state)
        self.params = [p for _, p in named]
        self._num_params = sum(p.numel() for p in plain.parameters())  # frozen ones too: the forward's cost
        # The fused kernel (one pass over each tensor; CPU and CUDA) took 0.29x the time of the default
        # per-tensor loop for 128M float32 parameters on CPU. Not under accelerate, which may rebuild the
        # optimizer around sharded parameters.
        fused = (self.dist.accelerator is None and all(p.dtype.is_floating_point for p in self.params)
                 and self.device.type in ("cpu", "cuda"))
        self.optimizer = torch.optim.AdamW(
            self.params, lr=train_cfg.lr, betas=tuple(train_cfg.betas), weight_decay=train_cfg.weight_decay,
            fused=fused or None,
        )
        self.model = model if prewrapped else plain
        if not prewrapped:
            wrapped, optimizer = distributed.prepare_for_training(plain, self.optimizer, self.dist)
            self.model, self.optimizer = wrapped, optimizer or self.optimizer
        # accelerate's backward/clipping under `accelerate launch` with several ranks (FSDP needs them)
        self._accelerator = self.dist.accelerator if self.dist.enabled else None
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_lambda)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = int(pad) if pad is not None else 0  # any valid id: padding is masked out
        self.vision: Any = None  # spark_core.vision.VisionInputs for rows with an `images` column

    @property
    def raw_model(self) -> torch.nn.Module:
        """The plain model inside any data-parallel wrapper (HF attributes, saving, generation)."""
        return distributed.unwrap(self.model, self.dist)

    # -------------------------------------------------------------------------- helpers

    def _lr_lambda(self, step: int) -> float:
        return lr_factor(step, self.total_steps, self.cfg.warmup_ratio, self.cfg.min_lr_ratio)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        """bf16 autocast on CUDA (fp32 or bf16 weights); on CPU everything stays fp32."""
        if self.device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _prepare(self, rows: pd.DataFrame) -> list[TrainSequence]:
        missing = [c for c in REQUIRED_COLUMNS if c not in rows.columns]
        if missing:
            raise ValueError(f"train_phase rows lack column(s) {missing}; got {list(rows.columns)}")
        rewards = torch.tensor(rows["reward"].astype(float).to_numpy(), dtype=torch.float64)
        adv = group_advantages(rewards, rows["question_id"].astype(str).tolist(), eps=self.cfg.adv_eps).tolist()
        vocab = self.raw_model.get_input_embeddings().num_embeddings
        prompt_ids: dict[Any, tuple[list[int], Any]] = {}  # the K samples of a question share one prompt
        images = multimodal_images(rows, self.vision)
        seqs = []
        for i, (prompt, completion, reward) in enumerate(zip(rows["prompt"], rows["completion_ids"], rewards.tolist())):
            key = (prompt, images[i]) if images else prompt
            if key not in prompt_ids:
                if images:
                    prompt_ids[key] = self.vision.encode(prompt, list(images[i]))
                else:
                    prompt_ids[key] = (list(self.tokenizer(prompt, add_special_tokens=False).input_ids), None)
                if not prompt_ids[key][0]:
                    raise ValueError(f"row {i}: the prompt tokenizes to nothing; a completion needs context")
            p, vision = prompt_ids[key]
            completion_ids = [int(t) for t in completion]
            if any(t < 0 or t >= vocab for t in completion_ids):
                raise ValueError(
                    f"row {i}: completion_ids hold ids outside the model's vocabulary of {vocab}; "
                    "were the rollouts sampled with another tokenizer?"
                )
            seqs.append(TrainSequence(p + completion_ids, len(p), float(adv[i]), float(reward), vision=vision))
        return seqs

    @torch.no_grad()
    def _score(self, model: torch.nn.Module, seqs: list[TrainSequence], chunks: int | None = None) -> list[torch.Tensor]:
        """Completion log-probs (float32, on CPU) of each sequence under ``model``, without gradients.

        ``chunks`` is the number of forward calls to make (filler micro-batches pad a short shard, so
        every rank calls a wrapped model equally often); default: as many as ``seqs`` need."""
        size = self.cfg.micro_batch_size
        count = chunks if chunks is not None else max(1, math.ceil(len(seqs) / size))
        out: dict[int, torch.Tensor] = {}
        was_training = model.training
        model.eval()
        try:
            prompts = [tuple(s.ids[: s.prompt_len]) for s in seqs]
            text_only = not any(s.vision for s in seqs)  # images: full forward (pixel values, M-RoPE)
            if (model is self.ref_model and self.score_prompts_once and not self.dist.enabled and text_only
                    and worth_sharing(self._num_params, repeated_prompt_tokens(prompts), self.device)):
                # Each shared prompt once (one rank: no lockstep calls), where that saves more than the
                # second forward call costs. Reference only: old log-probs stay bitwise those of a training
                # forward, so a first step's ratio is 1.
                return shared_prompt_logprobs(
                    model, [s.ids[: s.prompt_len] for s in seqs], [s.ids[s.prompt_len :] for s in seqs],
                    pad_id=self.pad_id, device=self.device, temperature=self.temperature, max_sequences=size,
                    autocast=self._autocast)
            template = seqs[0] if seqs else TrainSequence([self.pad_id], 1, 0.0, 0.0)
            position = {id(s): i for i, s in enumerate(seqs)}
            for micro in length_sorted_micro_batches(seqs, size, count, template):
                b = collate(micro, self.device, self.pad_id)
                with self._autocast():
                    lp = completion_logprobs(model, b, self.temperature)
                width = lp.shape[1]
                for row, s in zip(lp, micro):
                    if id(s) in position:  # fillers are not in `seqs`
                        out[position[id(s)]] = row[width - s.num_tokens :].float().cpu()
        finally:
            model.train(was_training)
        return [out[i] for i in range(len(seqs))]

    def _attach(self, seqs: list[TrainSequence], model: torch.nn.Module, field: str, everywhere: bool) -> None:
        """Score ``seqs`` with ``model`` and store the log-probs in ``field`` of each sequence.

        Each rank scores its own shard; with ``everywhere`` the shards are exchanged so that every rank
        holds every sequence's log-probs (needed when later mini-batches reshuffle the rows)."""
        mine = distributed.shard(list(range(len(seqs))), self.dist)
        count = lockstep_micro_batches(len(seqs), self.dist.world_size, self.cfg.micro_batch_size)
        scored = list(zip(mine, self._score(model, [seqs[i] for i in mine], count)))
        if everywhere and self.dist.enabled:
            parts: list[Any] = [None] * self.dist.world_size
            torch.distributed.all_gather_object(parts, scored)
            scored = [pair for part in parts for pair in part]
        for i, lp in scored:
            setattr(seqs[i], field, lp)

    def _order(self, n: int, epoch: int, phase_start: int) -> list[int]:
        """Sequence order of one epoch: shuffled with a seed fixed by the step the phase started at,
        so a resumed run replays the same order (no global RNG involved)."""
        if not self.cfg.mini_batch_size or self.cfg.mini_batch_size >= n:
            return list(range(n))  # one mini-batch: order cannot matter beyond float rounding
        gen = torch.Generator().manual_seed(1_000_003 * phase_start + epoch)
        return torch.randperm(n, generator=gen).tolist()

    def _plan(self, n: int, phase_start: int) -> list[list[int]]:
        """The phase's optimizer steps: each a list of sequence indices (a mini-batch), all epochs."""
        mini = self.cfg.mini_batch_size or n
        return [mb for epoch in range(self.cfg.epochs) for mb in in_chunks(self._order(n, epoch, phase_start), mini)]

    def _reuses_current_logp(self, plan: list[list[int]]) -> bool:
        """One optimizer step over all rows: the weights at that step ARE the sampling weights, so the
        old log-probs equal the training forward's (detached) and need no forward of their own."""
        return len(plan) == 1

    # ------------------------------------------------------------------------------ train

    def train_phase(self, rows: pd.DataFrame, phase: Phase) -> list[dict[str, Any]]:
        """Run GRPO on one phase's verified rollouts; return one TRAIN row per optimizer step.

        ``rows`` needs ``prompt`` (the exact text the engine saw), ``completion_ids``, ``reward`` and
        ``question_id`` (the GRPO group key). Groups whose rewards all agree get zero advantage and stay
        in the batch (they still feel the KL term). An empty frame trains nothing and returns [].
        Under several ranks every rank must call this with the same rows.
        """
        if phase not in ("policy", "reward"):
            raise ValueError(f"phase must be 'policy' or 'reward', got {phase!r}")
        if len(rows) == 0:
            return []
        seqs = self._prepare(rows)
        phase_start = self.global_step
        plan = self._plan(len(seqs), phase_start)
        several_steps = not self._reuses_current_logp(plan)
        if several_steps:
            # Old log-probs come from the weights before any update of this phase (the sampling policy).
            self._attach(seqs, self.model, "old_logp", everywhere=True)
        if self.ref_model is not None:
            self._attach(seqs, self.ref_model, "ref_logp", everywhere=several_steps)

        was_training = self.model.training
        self.model.train()
        out_rows = [self._optimizer_step([seqs[i] for i in mb], phase) for mb in plan]
        self.model.train(was_training)  # callers (engines, evaluation) get the model back as it was
        return out_rows

    def _no_sync(self, last: bool) -> contextlib.AbstractContextManager[Any]:
        """DDP: all-reduce gradients once per optimizer step (on the last micro-batch), not per micro-batch.
        FSDP reduce-scatters every backward (skipping it would keep full unsharded gradients)."""
        from torch.nn.parallel import DistributedDataParallel  # noqa: PLC0415

        if last or not isinstance(self.model, DistributedDataParallel):
            return contextlib.nullcontext()
        return self.model.no_sync()

    def _optimizer_step(self, batch: list[TrainSequence], phase: Phase) -> dict[str, Any]:
        """Accumulate gradients over micro-batches (token-mean over the whole mini-batch), then step."""
        world = self.dist.world_size
        num_tokens = sum(s.num_tokens for s in batch)  # every rank holds the whole mini-batch: the global count
        count = lockstep_micro_batches(len(batch), world, self.cfg.micro_batch_size)
        shared = self._trains_prompts_once(batch)
        micros = (prompt_group_micro_batches(batch, self.cfg.micro_batch_size) if shared else
                  length_sorted_micro_batches(distributed.shard(batch, self.dist), self.cfg.micro_batch_size, count, batch[0]))
        totals = {"loss": 0.0, "pg_loss": 0.0, "kl": 0.0, "clip_frac": 0.0}
        self.optimizer.zero_grad(set_to_none=True)
        for j, micro in enumerate(micros):
            b = collate(micro, self.device, self.pad_id)
            with self._no_sync(last=j == len(micros) - 1):
                with self._autocast():
                    logp = self._shared_prompt_logp(micro, b) if shared else completion_logprobs(
                        self.model, b, self.temperature)
                loss, stats = grpo_loss(
                    logp,
                    b.old_logp if b.old_logp is not None else logp.detach(),
                    b.advantages,
                    b.completion_mask,
                    clip_eps=self.cfg.clip_eps,
                    ref_logp=b.ref_logp,
                    kl_coef=self.cfg.kl_coef,
                    num_tokens=num_tokens,
                )
                # Each rank's loss is its share of the global token sum; DDP/FSDP AVERAGE gradients over
                # ranks, so scaling by the world size makes the result the sum, i.e. the global token mean.
                scaled = loss * world if world > 1 else loss
                if self._accelerator is not None:
                    self._accelerator.backward(scaled)
                else:
                    scaled.backward()
            totals["loss"] += float(loss.detach().item())
            for key in ("pg_loss", "kl", "clip_frac"):
                totals[key] += stats[key]
        if self.dist.enabled:
            totals = distributed.all_reduce_sum(totals, self.dist)
        if self._accelerator is not None:
            grad_norm = self._accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        else:
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

    def _trains_prompts_once(self, batch: list[TrainSequence]) -> bool:
        """Whether this mini-batch's training forward runs each shared prompt once (see
        ``train_prompts_once``): only where a micro-batch holds two completions and the prompt compute
        saved outweighs a second forward call per micro-batch (``prefix_scoring.worth_sharing``)."""
        if not (self.train_prompts_once and not self.dist.enabled and self._accelerator is None
                and not self.cfg.gradient_checkpointing and self.cfg.micro_batch_size > 1
                and not any(s.vision for s in batch)):
            return False
        prompts = [tuple(s.ids[: s.prompt_len]) for s in batch]
        return worth_sharing(self._num_params, repeated_prompt_tokens(prompts), self.device)

    def _shared_prompt_logp(self, micro: list[TrainSequence], b: MicroBatch) -> torch.Tensor:
        """``completion_logprobs`` of the micro-batch ``b`` (same [n, K] layout: completions end at the last
        column), computed with each shared prompt forwarded once."""
        parts = shared_prompt_logprobs_with_grad(
            self.model, [s.ids[: s.prompt_len] for s in micro], [s.ids[s.prompt_len :] for s in micro],
            pad_id=self.pad_id, device=self.device, temperature=self.temperature)
        width = b.completion_mask.shape[1]
        lp = torch.stack([torch.nn.functional.pad(part, (width - part.shape[0], 0)) for part in parts])
        return torch.where(b.completion_mask, lp, torch.zeros_like(lp))

    def _inner_optimizer(self) -> torch.optim.Optimizer:
        return getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate wraps the optimizer

    def state_dict(self) -> dict[str, Any] | None:
        """Optimizer, scheduler, step counter and RNG states; None on ranks other than 0.

        Under FSDP this is a COLLECTIVE (the optimizer state is gathered from the shards): every rank
        must call it. The optimizer state always has the single-process format (parameters by index),
        so a run can resume with a different number of ranks."""
        if self.dist.enabled and is_sharded(self.model):
            from torch.distributed.checkpoint.state_dict import (  # noqa: PLC0415
                StateDictOptions,
                get_optimizer_state_dict,
            )

            named = get_optimizer_state_dict(
                self.model, self._inner_optimizer(), options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
            optimizer = optimizer_state_to_indexed(named, self._param_names) if self.dist.is_main else None
        else:
            optimizer = self.optimizer.state_dict() if self.dist.is_main else None
        if not self.dist.is_main:
            return None
        return {
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(),
            "global_step": self.global_step,
            "total_steps": self.total_steps,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }

    def save_state(self, folder: str | Path, state: dict[str, Any] | None = None) -> Path:
        """Write ``state`` (default: ``self.state_dict()``) to ``folder/trainer_state.pt``.

        The model weights are saved separately (``models.save_checkpoint``). The write goes through a
        temporary file so a crash never leaves half a state file. Under several ranks only rank 0
        writes (the others return the path without writing; under FSDP they must still call this, or
        ``state_dict``, because gathering the optimizer state is collective)."""
        path = Path(folder) / STATE_FILE
        if state is None:
            state = self.state_dict()
        if state is None or not self.dist.is_main:
            return path
        write_state(path, state)
        return path

    def load_state(self, folder: str | Path) -> None:
        """Restore what ``save_state`` wrote; the model must already hold the matching weights.
        Every rank reads the file (under FSDP each keeps its shard of the optimizer state)."""
        path = Path(folder) / STATE_FILE
        state = read_state(path)
        if self.dist.enabled and is_sharded(self.model):
            from torch.distributed.checkpoint.state_dict import (  # noqa: PLC0415
                StateDictOptions,
                set_optimizer_state_dict,
            )

            set_optimizer_state_dict(
                self.model, self._inner_optimizer(),
                optim_state_dict=optimizer_state_to_named(state["optimizer"], self._param_names),
                options=StateDictOptions(full_state_dict=True),
            )
        else:
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
