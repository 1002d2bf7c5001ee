"""The checkpoint schedule: which checkpoints a run writes and which it keeps.

Written: ONE checkpoint per iteration (``iter=NNNN/checkpoint``: weights, optimizer, scheduler, RNG state),
after the last update of its last RL step, plus iteration 0 (the initial model, also the frozen KL
reference). Intermediate weights inside an iteration stay in the live workspace unless
``store.intermediate_checkpoints`` (or a multi-process train launcher) writes them
(``policy_checkpoint[/rl_step=SS]``, ``step_checkpoint/rl_step=SS``); they are deleted once the iteration's
checkpoint exists, unless ``store.keep_policy_checkpoints``.

Kept: all by default. With ``store.keep_last = K`` only the checkpoints of the last K completed
iterations, plus every M-th with ``store.keep_every = M``; never iteration 0 (the KL reference and the
run's origin) and never the newest (LATEST: what the next iteration and any resume start from). A deleted
checkpoint's tables stay: only the weights go.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from .config import SparkConfig
from .layout import CHECKPOINT, POLICY_CHECKPOINT, STEP_CHECKPOINT, step_stage
from .store import Store


def kept_iterations(latest: int, keep_last: int | None, keep_every: int | None) -> set[int]:
    """Iterations 0..latest whose checkpoint retention keeps."""
    if keep_last is None:
        return set(range(latest + 1))
    kept = {0, latest, *range(max(0, latest - keep_last + 1), latest + 1)}
    if keep_every:
        kept |= {i for i in range(latest + 1) if i % keep_every == 0}
    return kept


def retired_checkpoints(cfg: SparkConfig, store: Store, run_id: str, latest: int) -> list[tuple[int, str]]:
    """The stored iteration checkpoints retention no longer keeps once `latest` is complete, as
    (iteration, URI)."""
    kept = kept_iterations(latest, cfg.store.keep_last, cfg.store.keep_every)
    out = []
    for it in store.list_iterations(run_id):
        uri = store.stage_uri(run_id, it, CHECKPOINT)
        if it <= latest and it not in kept and store.is_done(uri):
            out.append((it, uri))
    return out


def intermediate_checkpoints(cfg: SparkConfig, store: Store, run_id: str, iteration: int) -> list[tuple[Store, str]]:
    """The intermediate checkpoints stored inside `iteration` (what finish_iteration drops), with the store
    each lives in (the object store, or the node-local one of launched ranks)."""
    n = cfg.steps_per_iteration
    where = snapshot_store(cfg, store)
    out = []
    for st in {id(s): s for s in (store, where) if s is not None}.values():
        uris = [st.stage_uri(run_id, iteration, step_stage(stage, s, n))
                for s in range(1, n + 1) for stage in (POLICY_CHECKPOINT, STEP_CHECKPOINT)
                if not (stage == STEP_CHECKPOINT and n == 1)]
        out += [(st, u) for u in uris if st.is_done(u)]
    return out


def snapshot_store(cfg: SparkConfig, store: Store) -> Store | None:
    """Where intermediate weights (between the updates of an iteration) are written, if anywhere.

    The object store under ``store.intermediate_checkpoints``. Otherwise they stay in the live workspace,
    except when training runs in launched rank processes (``train.launcher`` torchrun / accelerate) that
    end after each phase: then a node-local folder (``launched_snapshot_dir``; the launcher is single-node)
    carries them from one phase's ranks to the next process, never the object store."""
    if cfg.store.intermediate_checkpoints:
        return store
    if cfg.train.launcher != "inprocess":
        return Store(str(launched_snapshot_dir(store)))
    return None


def launched_snapshot_dir(store: Store) -> Path:
    """The node-local folder of launched ranks' intermediate weights, one per store (the same on every rank):
    `_live/` beside `runs/` for a local store (hidden from run listings and hive readers), else a folder
    beside the checkpoint download cache."""
    if store.is_local:
        return Path(store.root) / "_live"
    key = hashlib.sha256(store.uri.encode()).hexdigest()[:16]
    return store.cache_dir.parent / "live" / key
