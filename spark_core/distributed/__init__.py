"""Multi-GPU training, rank side: who this process is and what a data-parallel GRPO step needs.

``current()`` says who this process is; ``init_distributed`` joins the process group a launcher set up;
``prepare_for_training`` wraps model and optimizer (DDP under torchrun, ``Accelerator.prepare`` -- FSDP
with the fsdp config -- under accelerate); ``shard`` / ``all_reduce_sum`` / ``full_state_dict`` /
``barrier`` are what a data-parallel GRPO step and a rank-0 checkpoint write need. In a single process
every helper is a no-op. Starting the ranks is ``spark_core.distributed.launch``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Sequence, TypeVar

import torch


log = logging.getLogger(__name__)

T = TypeVar("T")
LAUNCHER_ENV = "SPARK_LAUNCHER"  # set for the ranks: torchrun | accelerate


class DistributedError(RuntimeError):
    """A multi-process launch or setup failed; the message says why and what to change."""


# ------------------------------------------------------------------------------------ rank context


@dataclass
class DistContext:
    """Who this process is in a (possibly single-process) training job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None  # nccl | gloo, None when not distributed
    accelerator: Any = None  # accelerate.Accelerator under `accelerate launch`

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_CTX = DistContext()


def current() -> DistContext:
    """This process's context (single-process until ``init_distributed`` ran under a launcher)."""
    return _CTX


def init_distributed() -> DistContext:
    """Join the process group the launcher set up (env ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``).

    Without those variables this is a single process and nothing is initialised."""
    global _CTX
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        _CTX = DistContext(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        return _CTX
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if torch.cuda.is_available():
        if local >= torch.cuda.device_count():
            raise DistributedError(
                f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s) are visible: lower train.num_processes"
            )
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    accelerator = None
    if os.environ.get(LAUNCHER_ENV) == "accelerate":
        from accelerate import Accelerator  # noqa: PLC0415 - only under `accelerate launch`

        # Accelerator initialises the process group itself (with the backend of its config).
        accelerator = Accelerator(step_scheduler_with_optimizer=False)
        device = accelerator.device
        backend = str(torch.distributed.get_backend()) if torch.distributed.is_initialized() else backend
    elif not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=backend)
    _CTX = DistContext(rank, world, local, device, backend, accelerator)
    log.info("rank %d/%d on %s (%s)", rank, world, device, backend)
    return _CTX


def shutdown() -> None:
    """Leave the process group (end of a rank's work)."""
    global _CTX
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _CTX = DistContext()


def barrier() -> None:
    if _CTX.enabled:
        torch.distributed.barrier()


def shard(items: Sequence[T], ctx: DistContext | None = None) -> list[T]:
    """This rank's share of a list (strided, so shares differ in size by at most one)."""
    ctx = ctx or _CTX
    return list(items[ctx.rank :: ctx.world_size])


def all_reduce_sum(values: dict[str, float], ctx: DistContext | None = None) -> dict[str, float]:
    """Sum scalar statistics over ranks (token counts, loss sums); identity in a single process."""
    ctx = ctx or _CTX
    if not ctx.enabled or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=ctx.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return {k: float(v) for k, v in zip(keys, t.tolist())}


def prepare_for_training(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, ctx: DistContext | None = None
) -> tuple[torch.nn.Module, torch.optim.Optimizer | None]:
    """Wrap for data-parallel training: ``accelerator.prepare`` (FSDP/DDP per the accelerate config) or
    DDP under torchrun. DDP averages gradients over ranks: scale a token-sum loss by ``world_size`` (or
    normalise by the per-rank share of tokens) to keep the single-process gradient."""
    ctx = ctx or _CTX
    if not ctx.enabled:
        return model, optimizer
    if ctx.accelerator is not None:
        if optimizer is None:
            return ctx.accelerator.prepare(model), None
        wrapped, opt = ctx.accelerator.prepare(model, optimizer)
        return wrapped, opt
    model = model.to(ctx.device)
    ids = [ctx.local_rank] if ctx.device.type == "cuda" else None
    return _transparent_ddp()(model, device_ids=ids), optimizer


def _transparent_ddp() -> type:
    """DDP that falls back to the wrapped model for attributes it lacks (``config``,
    ``get_input_embeddings``, ``generation_config``...), so code written for a plain HF model keeps
    working; forward/backward still go through DDP's gradient synchronisation."""
    from torch.nn.parallel import DistributedDataParallel  # noqa: PLC0415

    class TransparentDDP(DistributedDataParallel):
        def __getattr__(self, name: str) -> Any:
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(super().__getattr__("module"), name)

    return TransparentDDP


def unwrap(model: torch.nn.Module, ctx: DistContext | None = None) -> torch.nn.Module:
    """The plain model inside a DDP/FSDP/accelerate wrapper (for generate, save_pretrained, peft calls)."""
    ctx = ctx or _CTX
    if ctx.accelerator is not None:
        return ctx.accelerator.unwrap_model(model)
    return getattr(model, "module", model)


def full_state_dict(model: torch.nn.Module, ctx: DistContext | None = None) -> dict[str, torch.Tensor] | None:
    """The full (unsharded) state dict on rank 0, None on other ranks. A COLLECTIVE under FSDP: every
    rank must call it. Save it with ``unwrap(model).save_pretrained(folder, state_dict=sd)`` on rank 0."""
    ctx = ctx or _CTX
    if ctx.accelerator is not None:
        sd = ctx.accelerator.get_state_dict(model)
        return sd if ctx.is_main else None
    return unwrap(model, ctx).state_dict() if ctx.is_main else None
