"""Starting the train stage: in this process, or on several ranks under torchrun / accelerate launch.

Launcher side (the train task, one process): ``run_train_stage`` runs the stage in process when
``train.launcher`` is inprocess (or the stage is already done), else ``launch_train_stage`` builds
``torchrun`` (``python -m torch.distributed.run --standalone``) or ``accelerate launch`` (with
``train.accelerate_config``, e.g. ``infra/accelerate/fsdp.yaml``) over ``train.num_processes`` processes
(default: every visible GPU), each running the rank entry point ``main``::

    python -m spark_core.distributed --store URI --run-id ID --iteration N --phase policy|reward

Every rank initialises the process group (NCCL on GPUs, gloo on CPUs), then runs the SAME stage function
as the in-process path (``stages.train_policy`` / ``stages.train_reward``), so the results (TRAIN table,
checkpoint, manifests) have exactly the in-process format. Rank 0 writes the stage summary as JSON for
the launcher, which returns it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Literal, Sequence

import torch

from .. import stages
from ..config import SparkConfig, TrainConfig
from ..layout import PHASES, TRAIN_POLICY, TRAIN_REWARD, step_stage
from ..store import Store
from . import LAUNCHER_ENV, DistributedError, barrier, init_distributed, shutdown

log = logging.getLogger(__name__)

Phase = Literal["policy", "reward"]
_TAIL_LINES = 60


def visible_gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def run_train_stage(cfg: SparkConfig, store: str, run_id: str, iteration: int, phase: Phase,
                    step: int = 1) -> dict[str, Any]:
    """One train stage, in process or over the configured launcher's ranks.

    Before launching ranks this process drops its in-memory model, trainer and engine (the ranks need
    the accelerator, and the weights they write make the in-memory ones stale); the next stage reloads
    from the store."""
    stage, table = (stages.train_policy, TRAIN_POLICY) if phase == "policy" else (stages.train_reward, TRAIN_REWARD)
    st = Store(store)
    done = st.is_done(st.stage_uri(run_id, iteration, step_stage(table, step, cfg.steps_per_iteration)))
    if cfg.train.launcher == "inprocess" or done:
        return stage(cfg, st, run_id, iteration, step=step)  # a finished stage returns its summary without training
    stages.workspace().close()  # frees the model, the KL reference and any engine
    return launch_train_stage(cfg, store, run_id, iteration, phase, step=step)


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


def stage_args(store: str, run_id: str, iteration: int, phase: Phase, summary_out: str | None = None,
               step: int = 1) -> list[str]:
    """Arguments of this module's entry point for one train stage."""
    if phase not in PHASES:
        raise DistributedError(f"phase must be 'policy' or 'reward', got {phase!r}")
    args = ["--store", store, "--run-id", run_id, "--iteration", str(iteration), "--phase", phase]
    args += ["--step", str(step)] if step != 1 else []
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
    env: dict[str, str] | None = None, timeout_s: float | None = None, step: int = 1,
) -> dict[str, Any]:
    """Run one train stage over all ranks and return its summary (what ``stages.train_*`` returns).

    The caller must have released the accelerator first (its in-process model and engine), since the
    ranks need the GPUs, and must treat its in-memory weights as stale afterwards."""
    with tempfile.TemporaryDirectory(prefix="spark-dist-") as tmp:
        summary_path = Path(tmp) / "summary.json"
        cmd = launcher_command(cfg.train, stage_args(store, run_id, iteration, phase, str(summary_path), step))
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
    p.add_argument("--step", type=int, default=1, help="RL step inside the iteration (1-based)")
    p.add_argument("--summary-out", help="rank 0 writes the stage summary (JSON) here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.iteration < 1:
        print(f"--iteration must be >= 1 (training iterations start at 1), got {args.iteration}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s rank" + os.environ.get("RANK", "0") + " %(message)s")
    ctx = init_distributed()
    try:
        store = Store(args.store)
        cfg = stages.run_config(store, args.run_id)
        stage = stages.train_policy if args.phase == "policy" else stages.train_reward
        summary = stage(cfg, store, args.run_id, args.iteration, step=args.step)
        if ctx.is_main and args.summary_out:
            tmp = Path(args.summary_out + ".tmp")
            tmp.write_text(json.dumps(summary, default=str))
            os.replace(tmp, args.summary_out)
        barrier()
    finally:
        shutdown()
    return 0
