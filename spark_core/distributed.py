"""Multi-GPU training: launching the train stage under torchrun / accelerate, and the rank-side helpers.

Launcher side (the train task, one process): ``launch_train_stage(cfg, store, run_id, iteration, phase)``
builds ``torchrun`` (``python -m torch.distributed.run --standalone``) or ``accelerate launch`` (with
``train.accelerate_config``, e.g. ``infra/accelerate/fsdp.yaml``) over ``train.num_processes`` processes
(default: every visible GPU), each running this module's entry point::

    python -m spark_core.distributed --store URI --run-id ID --iteration N --phase policy|reward

Every rank initialises the process group (NCCL on GPUs, gloo on CPUs), then runs the SAME stage function
as the in-process path (``stages.train_policy`` / ``stages.train_reward``), so the results (TRAIN table,
checkpoint, manifests) have exactly the in-process format. Rank 0 writes the stage summary as JSON for
the launcher, which returns it.

Rank side (trainer and stages): ``current()`` says who this process is; ``prepare_for_training`` wraps
model and optimizer (DDP under torchrun, ``Accelerator.prepare`` — FSDP with the fsdp config — under
accelerate); ``shard`` / ``all_reduce_sum`` / ``full_state_dict`` / ``barrier`` are what a data-parallel
GRPO step and a rank-0 checkpoint write need. In a single process every helper is a no-op.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence, TypeVar

import torch

from .config import SparkConfig, TrainConfig

log = logging.getLogger(__name__)

Phase = Literal["policy", "reward"]
T = TypeVar("T")
LAUNCHER_ENV = "SPARK_LAUNCHER"  # set for the ranks: torchrun | accelerate
_TAIL_LINES = 60


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


# ---------------------------------------------------------------------------------------- launcher


def visible_gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def launcher_command(
    train_cfg: TrainConfig,
    module_args: Sequence[str],
    *,
    module: str = "spark_core.distributed",
    num_processes: int | None = None,
    python: str | None = None,
) -> list[str]:
    """The command line that starts ``module`` with ``module_args`` on every rank.

    ``num_processes``: explicit value, else ``train.num_processes``, else every visible GPU. On a machine
    without GPUs a process count must be given (the ranks then use gloo on the CPU)."""
    python = python or sys.executable
    launcher = train_cfg.launcher
    if launcher == "inprocess":
        raise DistributedError("train.launcher is 'inprocess': training runs in the calling process, not launched")
    procs = num_processes or train_cfg.num_processes or visible_gpu_count()
    if procs < 1:
        raise DistributedError(
            f"train.launcher={launcher} but no GPU is visible: set train.num_processes to run CPU ranks (gloo), "
            "or use train.launcher=inprocess"
        )
    if launcher == "torchrun":
        head = [python, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                "--nproc-per-node", str(procs), "-m", module]
    elif launcher == "accelerate":
        head = [python, "-m", "accelerate.commands.launch", "--num_processes", str(procs)]
        if train_cfg.accelerate_config:
            cfg_path = Path(train_cfg.accelerate_config)
            if not cfg_path.is_file():
                raise DistributedError(f"train.accelerate_config={cfg_path} does not exist (see infra/accelerate/)")
            head += ["--config_file", str(cfg_path)]
        head += ["-m", module]
    else:
        raise DistributedError(f"unknown train.launcher {launcher!r}")
    return head + [str(a) for a in module_args]


def stage_args(store: str, run_id: str, iteration: int, phase: Phase, summary_out: str | None = None) -> list[str]:
    """Arguments of this module's entry point for one train stage."""
    if phase not in ("policy", "reward"):
        raise DistributedError(f"phase must be 'policy' or 'reward', got {phase!r}")
    args = ["--store", store, "--run-id", run_id, "--iteration", str(iteration), "--phase", phase]
    return args + (["--summary-out", summary_out] if summary_out else [])


def run_launcher(cmd: Sequence[str], launcher: str, *, env: dict[str, str] | None = None,
                 timeout_s: float | None = None, log_path: str | Path | None = None) -> None:
    """Run a launcher command; on failure raise with the tail of its combined output."""
    full_env = dict(os.environ if env is None else env)
    full_env[LAUNCHER_ENV] = launcher  # tells init_distributed whether to build an Accelerator
    with tempfile.TemporaryDirectory(prefix="spark-launch-") as tmp:
        out_path = Path(log_path) if log_path else Path(tmp) / "launcher.log"
        log.info("launching: %s", " ".join(cmd))
        try:
            with open(out_path, "wb") as fh:
                proc = subprocess.run(list(cmd), stdout=fh, stderr=subprocess.STDOUT, env=full_env, timeout=timeout_s)
        except FileNotFoundError as err:
            raise DistributedError(f"cannot start the launcher {cmd[0]!r}: {err}") from None
        except subprocess.TimeoutExpired:
            raise DistributedError(f"the launcher ran past {timeout_s:.0f}s and was killed") from None
        if proc.returncode != 0:
            lines = out_path.read_text(errors="replace").rstrip().splitlines()[-_TAIL_LINES:]
            raise DistributedError(
                f"multi-process training failed (exit {proc.returncode}): {' '.join(cmd[:6])} ...\n"
                f"--- launcher output (last {_TAIL_LINES} lines) ---\n" + "\n".join(lines)
            )


def launch_train_stage(
    cfg: SparkConfig, store: str, run_id: str, iteration: int, phase: Phase, *,
    env: dict[str, str] | None = None, timeout_s: float | None = None,
) -> dict[str, Any]:
    """Run one train stage over all ranks and return its summary (what ``stages.train_*`` returns).

    The caller must have released the accelerator first (its in-process model and engine), since the
    ranks need the GPUs, and must treat its in-memory weights as stale afterwards."""
    with tempfile.TemporaryDirectory(prefix="spark-dist-") as tmp:
        summary_path = Path(tmp) / "summary.json"
        cmd = launcher_command(cfg.train, stage_args(store, run_id, iteration, phase, str(summary_path)))
        run_launcher(cmd, cfg.train.launcher, env=env, timeout_s=timeout_s)
        if not summary_path.exists():
            raise DistributedError("the ranks exited cleanly but rank 0 wrote no stage summary")
        return json.loads(summary_path.read_text())


# ------------------------------------------------------------------------------------ entry point


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m spark_core.distributed",
        description="Run one SPARK train stage on this rank (started by torchrun / accelerate launch).",
    )
    p.add_argument("--store", required=True, help="store URI (local folder or s3://bucket/prefix)")
    p.add_argument("--run-id", required=True)
    p.add_argument("--iteration", required=True, type=int)
    p.add_argument("--phase", required=True, choices=("policy", "reward"))
    p.add_argument("--summary-out", help="rank 0 writes the stage summary (JSON) here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.iteration < 1:
        print(f"--iteration must be >= 1 (training iterations start at 1), got {args.iteration}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s rank" + os.environ.get("RANK", "0") + " %(message)s")
    from . import stages  # noqa: PLC0415 - heavy; only the entry point needs it
    from .store import Store  # noqa: PLC0415

    ctx = init_distributed()
    try:
        if ctx.enabled and not getattr(stages, "DISTRIBUTED_READY", False):
            # Ranks running a stage that is not rank-aware would all write the same checkpoint.
            raise DistributedError(
                "spark_core.stages does not declare DISTRIBUTED_READY = True (rank-0-only writes, sharded "
                "mini-batches); multi-process training cannot run yet: use train.launcher=inprocess"
            )
        store = Store(args.store)
        cfg = stages.run_config(store, args.run_id)
        stage = stages.train_policy if args.phase == "policy" else stages.train_reward
        summary = stage(cfg, store, args.run_id, args.iteration)
        if ctx.is_main and args.summary_out:
            tmp = Path(args.summary_out + ".tmp")
            tmp.write_text(json.dumps(summary, default=str))
            os.replace(tmp, args.summary_out)
        barrier()
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    # `python -m` runs this file as __main__, a second copy of the module: stages and the trainer read the
    # rank context from `spark_core.distributed`, so the ranks must initialise THAT copy.
    from spark_core.distributed import main as _package_main

    sys.exit(_package_main())
