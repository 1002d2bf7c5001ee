"""One function per pipeline stage; each reads its inputs from the store and writes its outputs there.

Every stage has the signature ``(cfg, store, run_id, iteration, ...) -> summary`` and is idempotent: when
its ``_SUCCESS.json`` manifest exists it does nothing and returns the recorded summary, so a crashed or
re-triggered iteration resumes where it stopped. Seeds derive from ``(cfg.seed, iteration, stage)``, so
re-running a deleted stage reproduces its table. Summaries are small JSON-able dicts (URIs, row counts,
metrics, seconds): they are what the Prefect tasks pass around, never tables.

One SPARK iteration ``i >= 1`` (the checkpoint of ``i-1`` is the policy that samples)::

    sample_policy -> verify_policy -> build_reward_data -> train_policy
        -> [sample_reward -> verify_reward -> train_reward]     (when the pool popped a batch)
        -> evaluate (per benchmark) -> finish_iteration

Iteration 0 is ``init_run``: run.json and the initial model (also the frozen KL reference) as
``iter=0000/checkpoint``, then the baseline evaluation. LATEST is written by ``finish_iteration`` only,
so LATEST=0 means "initialised and baseline evaluated" and LATEST=i means iteration i is complete.

A process-level :class:`Workspace` keeps the model, tokenizer, trainer and engine of the checkpoint the
live weights equal, so the stages of one iteration in one process never reload between phases; after a
crash, a new process loads from the store (weights and trainer state) and continues exactly.

The training stages are rank-aware (``DISTRIBUTED_READY``): launched on several ranks by
``spark_core.distributed``, every rank loads the model on its own device, builds the trainer and trains
its shard of every mini-batch; every rank takes part in gathering the full weights and optimizer state
(collective under FSDP); only rank 0 writes the checkpoint, the TRAIN table and the manifests.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from . import schemas
from .chat import formatter, question_messages
from .config import BenchmarkConfig, SparkConfig, build_config
from .engines.base import Engine, SamplingParams
from .store import Store, StoreError, eval_stage, train_stage

log = logging.getLogger(__name__)

# Stage names (directories under iter=NNNN/).
SAMPLES = "samples"
VERIFIED = "verified"
REWARD_ITEMS = "reward_items"
REWARD_POOL = "reward_pool"
TRAIN_POLICY = train_stage("policy")
POLICY_CHECKPOINT = "policy_checkpoint"
REWARD_SAMPLES = "reward_samples"
REWARD_VERIFIED = "reward_verified"
TRAIN_REWARD = train_stage("reward")
CHECKPOINT = "checkpoint"
TRAINER_STATE_DIR = "trainer_state"


# The train stages run correctly on several ranks (see the module docstring); spark_core.distributed
# refuses to launch ranks without this declaration.
DISTRIBUTED_READY = True


class StageError(RuntimeError):
    """A stage cannot run as asked (missing input, config mismatch); the message says what to do."""


# ------------------------------------------------------------------------------------------ helpers


def stage_seed(seed: int, iteration: int, stage: str) -> int:
    """A seed for one stage of one iteration, stable across processes and machines."""
    digest = hashlib.sha256(f"{seed}:{iteration}:{stage}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def eval_due(cfg: SparkConfig, iteration: int) -> bool:
    """Evaluate iteration 0 (baseline), every `eval.every`-th iteration, and the run's last one."""
    every = cfg.eval.every
    return every > 0 and (iteration % every == 0 or iteration == cfg.iterations)


def _summary(manifest: dict[str, Any], skipped: bool) -> dict[str, Any]:
    keys = ("stage", "uri", "rows", "seconds", "metrics", "reward_phase", "popped")
    out = {k: manifest[k] for k in keys if k in manifest}
    out["skipped"] = skipped
    return out


def _extra(cfg: SparkConfig, run_id: str, iteration: int, stage: str, started: float,
           inputs: list[str], metrics: dict[str, Any] | None = None, **more: Any) -> dict[str, Any]:
    return {
        "stage": stage,
        "run_id": run_id,
        "iteration": iteration,
        "inputs": inputs,
        "config_hash": cfg.config_hash(),
        "seed": stage_seed(cfg.seed, iteration, stage),
        "started_at": datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.time() - started, 3),
        "metrics": metrics or {},
        **more,
    }


def _require(store: Store, uri: str, what: str) -> None:
    if not store.is_done(uri):
        raise StageError(f"{what} is missing: {uri} has no _SUCCESS.json (run the earlier stage first)")


def _mean(values: Any) -> float | None:
    s = pd.Series(values, dtype="float64").dropna()
    return float(s.mean()) if len(s) else None


def _group_stats(df: pd.DataFrame) -> dict[str, Any]:
    """Share of GRPO groups that carry signal (mixed) vs. all-correct / all-wrong."""
    if df.empty:
        return {"groups": 0, "groups_mixed": 0, "groups_all_correct": 0, "groups_all_wrong": 0}
    per = df.groupby("question_id")["reward"].agg(["min", "max"])
    return {
        "groups": int(len(per)),
        "groups_mixed": int(((per["min"] < 0.5) & (per["max"] > 0.5)).sum()),
        "groups_all_correct": int((per["min"] > 0.5).sum()),
        "groups_all_wrong": int((per["max"] < 0.5).sum()),
    }


def _train_metrics(rows: list[dict[str, Any]]) -> dict[str, Any]:
    df = pd.DataFrame(rows)
    if df.empty:
        return {"steps": 0}
    return {
        "steps": int(len(df)),
        "last_step": int(df["step"].max()),
        "mean_loss": _mean(df["loss"]),
        "mean_kl": _mean(df["kl"]),
        "mean_reward": _mean(df["mean_reward"]),
        "lr": float(df["lr"].iloc[-1]),
    }


# ---------------------------------------------------------------------------------------- workspace


class Workspace:
    """What one process keeps loaded between stages: the policy whose weights equal one checkpoint.

    ``use(checkpoint_uri)`` is free when the live weights already are that checkpoint (the usual case
    within an iteration: training updates the model in place and the new checkpoint is adopted), and
    otherwise drops everything and points at the new checkpoint; model, trainer and engine load lazily
    from its local folder. The frozen reference model (iteration 0) is kept separately.
    """

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.key: tuple[str, str, str] | None = None
        self.folder: Path | None = None
        self.model: Any = None
        self.tokenizer: Any = None
        self.trainer: Any = None
        self.engine: Engine | None = None
        self._ref: tuple[tuple[str, str], Any] | None = None
        self._questions: dict[str, list[Any]] = {}
        # Tests (and embedders) may supply their own engine: called as factory(cfg, workspace).
        self.engine_factory: Callable[[SparkConfig, "Workspace"], Engine] | None = None

    # -- identity of the live weights
    @staticmethod
    def _key(cfg: SparkConfig, store: Store, uri: str) -> tuple[str, str, str]:
        return (uri, str(store.manifest(uri).get("token", "")), cfg.config_hash())

    def use(self, cfg: SparkConfig, store: Store, uri: str) -> "Workspace":
        with self.lock:
            _require(store, uri, "checkpoint")
            key = self._key(cfg, store, uri)
            if key != self.key:
                self.reset()
                self.folder = store.download_checkpoint(uri)
                self.key = key
            return self

    def adopt(self, cfg: SparkConfig, store: Store, uri: str) -> None:
        """The live weights were just saved as `uri`: remember that instead of reloading."""
        with self.lock:
            self.key = self._key(cfg, store, uri)
            self.folder = store.download_checkpoint(uri)
            if self.engine is not None and cfg.sampling.engine != "hf":
                # An out-of-process engine still serves the old weights.
                self.engine.close()
                self.engine = None

    def reset(self) -> None:
        """Forget the live weights (after a failure mid-training they match no checkpoint)."""
        with self.lock:
            if self.engine is not None:
                self.engine.close()
            self.key = self.folder = None
            self.model = self.tokenizer = self.trainer = self.engine = None

    def close(self) -> None:
        self.reset()
        self._ref = None

    # -- lazily loaded parts
    @staticmethod
    def device(cfg: SparkConfig) -> Any:
        """Where this process computes: its rank's device under a launcher, else ``cfg.device``."""
        from .distributed import current
        from .models import resolve_device

        ctx = current()
        return ctx.device if ctx.enabled else resolve_device(cfg.device)

    def _need_folder(self) -> Path:
        if self.folder is None:
            raise StageError("workspace has no checkpoint selected (call use() first)")
        return self.folder

    def get_tokenizer(self, cfg: SparkConfig) -> Any:
        if self.tokenizer is None:
            from .models import load_tokenizer

            self.tokenizer = load_tokenizer(self._need_folder())
        return self.tokenizer

    def get_model(self, cfg: SparkConfig) -> Any:
        if self.model is None:
            from .models import load_model_and_tokenizer

            if self.engine is not None and cfg.sampling.engine != "hf":
                self.engine.close()  # free the accelerator before the in-process model needs it
                self.engine = None
            folder, device = self._need_folder(), self.device(cfg)
            if cfg.model.lora is None:
                self.model, self.tokenizer = load_model_and_tokenizer(cfg.model, path=folder, device=device)
            else:
                from .lora import base_weights_folder, load_lora_checkpoint

                # Adapter-mode checkpoints hold the base weights; merged ones need the original base.
                base, self.tokenizer = load_model_and_tokenizer(
                    cfg.model, path=base_weights_folder(folder), device=device
                )
                self.model = load_lora_checkpoint(base, folder, is_trainable=True).to(device)
        return self.model

    def get_trainer(self, cfg: SparkConfig, store: Store, run_id: str) -> Any:
        if self.trainer is None:
            from .trainer import STATE_FILE, Trainer, planned_optimizer_steps

            _check_sharded_lora(cfg)
            model = self.get_model(cfg)
            ref = self._ref_model(cfg, store, run_id) if cfg.train.kl_coef > 0 else None
            trainer = Trainer(
                model, self.tokenizer, cfg.train, self.device(cfg),
                total_steps=planned_optimizer_steps(cfg), ref_model=ref,
                # log-probs of the distribution that was sampled (both phases sample at this temperature)
                temperature=cfg.sampling.temperature,
            )
            state = self._need_folder() / TRAINER_STATE_DIR
            if (state / STATE_FILE).exists():
                trainer.load_state(state)
            self.trainer = trainer
        return self.trainer

    def _ref_model(self, cfg: SparkConfig, store: Store, run_id: str) -> Any:
        """The frozen initial model (iteration 0 checkpoint) for the KL penalty, loaded once.

        With LoRA the reference is the live model with its adapters switched off (the frozen base)."""
        from .models import load_model_and_tokenizer

        if cfg.model.lora is not None:
            from .lora import AdapterDisabledReference

            return AdapterDisabledReference(self.get_model(cfg))
        uri = store.stage_uri(run_id, 0, CHECKPOINT)
        _require(store, uri, "the initial checkpoint (KL reference)")
        key = (uri, str(store.manifest(uri).get("token", "")))
        if self._ref is None or self._ref[0] != key:
            ref, _ = load_model_and_tokenizer(
                cfg.model, path=store.download_checkpoint(uri), device=self.device(cfg)
            )
            ref.requires_grad_(False)
            self._ref = (key, ref.eval())
        return self._ref[1]

    def get_engine(self, cfg: SparkConfig) -> Engine:
        """The configured rollout engine for the selected checkpoint (``engines.factory.make_engine``).

        hf samples from the in-process model (shared with the trainer: no reload between phases); vllm
        loads the checkpoint folder in its own process, so the in-process model and trainer are dropped
        first to free the accelerator; openai points its server at the folder (reload hook or LoRA
        adapter) and uses the tokenizer when the server returns no token ids."""
        if self.engine is None:
            if self.engine_factory is not None:
                self.engine = self.engine_factory(cfg, self)
            else:
                from .engines.factory import make_engine

                kind = cfg.sampling.engine
                if kind == "vllm":
                    self._release_accelerator()
                model = self.get_model(cfg) if kind == "hf" else None
                try:
                    self.engine = make_engine(cfg, model, self.get_tokenizer(cfg), self._need_folder())
                except ValueError as err:
                    raise StageError(f"cannot build the {kind!r} engine: {err}") from err
        return self.engine

    def _release_accelerator(self) -> None:
        """Free the GPU for an out-of-process engine: the in-process model, trainer and reference go.

        Safe because the live weights and trainer state equal the selected checkpoint (it was just
        saved or loaded); the trainer reloads them from its folder when the next update needs them."""
        if self.key is None and self.model is not None:
            raise StageError("the live weights match no saved checkpoint; refusing to drop them")
        on_gpu = self.model is not None and any(p.is_cuda for p in self.model.parameters())
        self.model = self.trainer = None
        self._ref = None
        if on_gpu:
            import gc

            import torch

            gc.collect()
            torch.cuda.empty_cache()

    def format_prompt(self, cfg: SparkConfig) -> Callable[[list[dict[str, str]]], str]:
        return formatter(self.get_tokenizer(cfg), cfg.data.use_chat_template)

    def training_questions(self, cfg: SparkConfig) -> list[Any]:
        from .data import load_training_questions

        key = hashlib.sha256(cfg.data.model_dump_json().encode()).hexdigest()
        if key not in self._questions:
            self._questions = {key: load_training_questions(cfg.data)}
        return self._questions[key]


_WORKSPACE = Workspace()


def workspace() -> Workspace:
    """The process-wide workspace every stage uses unless given another."""
    return _WORKSPACE


def _check_sharded_lora(cfg: SparkConfig) -> None:
    """LoRA export reads the full adapter and base weights from the live peft model, which FSDP shards."""
    from .distributed import current

    ctx = current()
    sharded = ctx.enabled and ctx.accelerator is not None and "FSDP" in str(ctx.accelerator.distributed_type)
    if sharded and cfg.model.lora is not None:
        raise StageError(
            "model.lora with FSDP is not supported (the adapter export needs unsharded weights): train LoRA "
            "with train.launcher=torchrun (DDP) or an accelerate config without FSDP"
        )


def _save_live_checkpoint(cfg: SparkConfig, store: Store, ws: Workspace, uri: str,
                          extra: dict[str, Any]) -> dict[str, Any]:
    """Write the live model (+ tokenizer + trainer state) as checkpoint `uri` and adopt it.

    Under several ranks every rank must call this: gathering the full weights and optimizer state is
    collective under FSDP; only rank 0 writes, and every rank returns after the checkpoint exists."""
    from . import distributed

    ctx = distributed.current()
    live = ws.trainer.model if ws.trainer is not None else ws.model
    weights = distributed.full_state_dict(live) if ctx.enabled else None  # collective; None off rank 0
    trainer_state = ws.trainer.state_dict() if ws.trainer is not None else None  # collective under FSDP
    if ctx.is_main:
        model = distributed.unwrap(live) if ctx.enabled else ws.model
        with store.checkpoint_writer(uri, extra) as folder:
            if cfg.model.lora is None:
                from .models import save_checkpoint

                save_checkpoint(model, ws.tokenizer, folder, state_dict=weights)
            else:
                from .lora import export_for_engine

                export_for_engine(model, ws.tokenizer, folder, cfg.model.lora.engine_weights, cfg.model.lora)
            if ws.trainer is not None:
                ws.trainer.save_state(folder / TRAINER_STATE_DIR, state=trainer_state)
        ws.adopt(cfg, store, uri)
    distributed.barrier()  # the other ranks continue once the checkpoint is complete
    return store.manifest(uri)


# --------------------------------------------------------------------------------------- run config


def run_config(store: Store, run_id: str) -> SparkConfig:
    """The config a run was created with (run.json), pointed at `store`."""
    record = store.read_run(run_id)
    if record is None:
        raise StageError(f"run {run_id!r} does not exist in {store.uri}")
    cfg = build_config(record["config"], origin=f"run {run_id} run.json")
    cfg.store.uri = store.uri
    return cfg


def check_run_config(store: Store, run_id: str, cfg: SparkConfig) -> None:
    """Refuse to continue a run with a config that would change its results."""
    record = store.read_run(run_id)
    if record is not None and record.get("config_hash") != cfg.config_hash():
        raise StageError(
            f"run {run_id!r} was created with a different config (hash {record.get('config_hash')} != "
            f"{cfg.config_hash()}); resume it without a config or start a new run id"
        )


# ------------------------------------------------------------------------------------------- stages


def init_run(cfg: SparkConfig, store: Store, run_id: str, ws: Workspace | None = None) -> dict[str, Any]:
    """Iteration 0: write run.json and the initial model as `iter=0000/checkpoint` (the KL reference)."""
    ws = ws or workspace()
    check_run_config(store, run_id, cfg)
    if store.read_run(run_id) is None:
        store.write_run(run_id, cfg)
    uri = store.stage_uri(run_id, 0, CHECKPOINT)
    if (m := store.manifest_or_none(uri)) is not None:
        return _summary(m, skipped=True)
    started = time.time()
    from .models import load_model_and_tokenizer, resolve_device

    ws.reset()
    ws.model, ws.tokenizer = load_model_and_tokenizer(cfg.model, device=resolve_device(cfg.device))
    if cfg.model.lora is not None:
        from .lora import apply_lora

        ws.model = apply_lora(ws.model, cfg.model.lora)  # adapters start as an exact no-op
    n_params = sum(p.numel() for p in ws.model.parameters())
    extra = _extra(cfg, run_id, 0, CHECKPOINT, started, inputs=[f"model.source={cfg.model.source}"],
                   metrics={"parameters": n_params})
    return _summary(_save_live_checkpoint(cfg, store, ws, uri, extra), skipped=False)


def _checkpoint_before(store: Store, run_id: str, iteration: int) -> str:
    if iteration < 1:
        raise StageError(f"training iterations start at 1, got {iteration}")
    return store.stage_uri(run_id, iteration - 1, CHECKPOINT)


def _sample(cfg: SparkConfig, ws: Workspace, prompts: list[str], n: int, max_new_tokens: int,
            seed: int) -> list[list[Any]]:
    params = SamplingParams(
        n=n, temperature=cfg.sampling.temperature, top_p=cfg.sampling.top_p,
        max_new_tokens=max_new_tokens, seed=seed,
    )
    return ws.get_engine(cfg).generate(prompts, params) if prompts else []


def sample_policy(cfg: SparkConfig, store: Store, run_id: str, iteration: int,
                  ws: Workspace | None = None) -> dict[str, Any]:
    """Policy phase: K rollouts for each question of this iteration's batch -> `samples`."""
    out = store.stage_uri(run_id, iteration, SAMPLES)
    if (m := store.manifest_or_none(out)) is not None:
        return _summary(m, skipped=True)
    from .data import batch_for_iteration

    started = time.time()
    ckpt = _checkpoint_before(store, run_id, iteration)
    ws = (ws or workspace()).use(cfg, store, ckpt)
    questions = batch_for_iteration(
        ws.training_questions(cfg), iteration, cfg.sampling.questions_per_iteration, cfg.seed
    )
    fmt = ws.format_prompt(cfg)
    prompts = [fmt(question_messages(cfg.data, q.question)) for q in questions]
    outs = _sample(cfg, ws, prompts, cfg.sampling.n, cfg.sampling.max_new_tokens,
                   stage_seed(cfg.seed, iteration, SAMPLES))
    rows = [
        {
            "question_id": q.question_id,
            "sample_idx": j,
            "prompt": prompt,
            "question": q.question,
            "completion": c.text,
            "completion_ids": list(c.token_ids),
            "label": q.answer,
        }
        for q, prompt, completions in zip(questions, prompts, outs)
        for j, c in enumerate(completions)
    ]
    table = pa.Table.from_pylist(rows, schema=schemas.SAMPLES)
    lengths = [len(c.token_ids) for cs in outs for c in cs]
    truncated = [c.finish_reason == "length" for cs in outs for c in cs]
    metrics = {
        "questions": len(questions),
        "mean_completion_tokens": _mean(lengths),
        "truncated_frac": _mean(truncated),
    }
    m = store.write_table(out, table, _extra(cfg, run_id, iteration, SAMPLES, started, [ckpt], metrics))
    return _summary(m, skipped=False)


def _verify_rows(table: pa.Table, modes: list[str]) -> pa.Table:
    from .verify import verify_batch

    results = verify_batch(
        table.column("completion").to_pylist(), table.column("label").to_pylist(), modes=modes
    )
    return (
        table.append_column("answer", pa.array([r.answer for r in results], pa.string()))
        .append_column("reward", pa.array([r.reward for r in results], pa.float32()))
        .append_column("verify_status", pa.array([r.status for r in results], pa.string()))
    )


def _reward_metrics(table: pa.Table) -> dict[str, Any]:
    df = table.select(["question_id", "reward", "verify_status"]).to_pandas()
    status = df["verify_status"].value_counts().to_dict()
    return {
        "mean_reward": _mean(df["reward"]),
        "status": {str(k): int(v) for k, v in status.items()},
        **_group_stats(df),
    }


def verify_policy(cfg: SparkConfig, store: Store, run_id: str, iteration: int) -> dict[str, Any]:
    """Rule-based rewards for the policy rollouts (last \\boxed{} vs. the label) -> `verified`."""
    out = store.stage_uri(run_id, iteration, VERIFIED)
    if (m := store.manifest_or_none(out)) is not None:
        return _summary(m, skipped=True)
    started = time.time()
    src = store.stage_uri(run_id, iteration, SAMPLES)
    _require(store, src, "samples")
    samples = store.read_table(src)
    verified = _verify_rows(samples, ["math"] * samples.num_rows).select(schemas.VERIFIED.names)
    verified = verified.cast(schemas.VERIFIED)
    m = store.write_table(
        out, verified, _extra(cfg, run_id, iteration, VERIFIED, started, [src], _reward_metrics(verified))
    )
    return _summary(m, skipped=False)


def _previous_pool(store: Store, run_id: str, iteration: int) -> pa.Table | None:
    """Items the previous iteration's pool kept (not popped), in FIFO order."""
    if iteration <= 1:
        return None
    uri = store.stage_uri(run_id, iteration - 1, REWARD_POOL)
    if not store.is_done(uri):
        raise StageError(f"iteration {iteration} needs the previous reward pool, but {uri} is not complete")
    pool = store.read_table(uri)
    return pool.filter(pc.invert(pool.column("popped"))).select(schemas.REWARD_ITEMS.names)


def build_reward_data(cfg: SparkConfig, store: Store, run_id: str, iteration: int,
                      ws: Workspace | None = None) -> dict[str, Any]:
    """Judgment + reflection items from the verified groups (`reward_items`) and the FIFO pool step.

    `reward_pool` holds the pool after this iteration's items were appended, with a `popped` column:
    the popped rows are the reward phase's batch for this iteration, the others carry over.
    """
    from .reward_data import build_reward_items, update_pool

    items_uri = store.stage_uri(run_id, iteration, REWARD_ITEMS)
    pool_uri = store.stage_uri(run_id, iteration, REWARD_POOL)
    if (m := store.manifest_or_none(pool_uri)) is not None:
        return _summary(m, skipped=True)
    started = time.time()
    src = store.stage_uri(run_id, iteration, VERIFIED)
    _require(store, src, "verified rollouts")
    if store.is_done(items_uri):
        items = store.read_table(items_uri)
    else:
        # Prompts are rendered with the policy's tokenizer (the chat template of the model that answers).
        ws = (ws or workspace()).use(cfg, store, _checkpoint_before(store, run_id, iteration))
        verified = store.read_table(src).to_pandas()
        items = build_reward_items(
            verified, cfg.reward_data, ws.format_prompt(cfg), iteration,
            stage_seed(cfg.seed, iteration, REWARD_ITEMS),
        )
        kinds = pd.Series(items.column("kind").to_pylist(), dtype="object").value_counts().to_dict()
        store.write_table(items_uri, items, _extra(
            cfg, run_id, iteration, REWARD_ITEMS, started, [src], {"items": items.num_rows, "kinds": kinds}
        ))
    rd = cfg.reward_data
    popped, remaining = update_pool(
        _previous_pool(store, run_id, iteration), items, rd.reward_batch_size, rd.max_pool_size
    )
    pool = pa.concat_tables([
        popped.append_column("popped", pa.array([True] * popped.num_rows, pa.bool_())),
        remaining.append_column("popped", pa.array([False] * remaining.num_rows, pa.bool_())),
    ])
    prev = f"{store.stage_uri(run_id, iteration - 1, REWARD_POOL)}" if iteration > 1 else None
    metrics = {"new_items": items.num_rows, "pool_size": remaining.num_rows, "popped": popped.num_rows}
    m = store.write_table(pool_uri, pool, _extra(
        cfg, run_id, iteration, REWARD_POOL, started, [items_uri] + ([prev] if prev else []), metrics,
        popped=popped.num_rows, popped_item_ids=popped.column("item_id").to_pylist(),
    ))
    return _summary(m, skipped=False)


def reward_phase_follows(cfg: SparkConfig, store: Store, run_id: str, iteration: int) -> bool:
    """True when this iteration has a reward phase: enabled and the pool popped a batch."""
    if not cfg.reward_data.enabled:
        return False
    m = store.manifest_or_none(store.stage_uri(run_id, iteration, REWARD_POOL))
    if m is None:
        raise StageError(f"iteration {iteration}: build_reward_data has not run (no reward_pool)")
    return int(m.get("popped", 0)) > 0


def _train(cfg: SparkConfig, store: Store, run_id: str, iteration: int, ws: Workspace, *,
           phase: str, rows_uri: str, model_uri: str, out_table: str, out_ckpt: str,
           manifest_more: dict[str, Any]) -> dict[str, Any]:
    """Shared body of both training stages: GRPO on `rows_uri`, then the checkpoint, then the table.

    The checkpoint is written first and carries the TRAIN rows in its manifest, so a crash between the
    two writes is repaired by copying the rows (the weights are never trained twice).

    Under several ranks every rank runs this whole function: all train, all take part in saving, rank 0
    alone writes; the barriers keep every rank on the same branch and the same number of collectives.
    """
    import torch

    from . import distributed

    ctx = distributed.current()
    table_uri = store.stage_uri(run_id, iteration, out_table)
    ckpt_uri = store.stage_uri(run_id, iteration, out_ckpt)
    done, ck = store.manifest_or_none(table_uri), store.manifest_or_none(ckpt_uri)
    distributed.barrier()  # every rank has read the store before rank 0 changes it
    if done is not None:
        return _summary(done, skipped=True)
    started = time.time()
    _require(store, rows_uri, f"{phase}-phase verified rollouts")
    if ck is not None:
        rows = ck["train_rows"]
    else:
        ws.use(cfg, store, model_uri)
        trainer = ws.get_trainer(cfg, store, run_id)
        df = store.read_table(rows_uri).to_pandas()
        torch.manual_seed(stage_seed(cfg.seed, iteration, out_table))
        ws.key = None  # the weights are about to change: match no checkpoint until saved
        try:
            rows = trainer.train_phase(df, phase)
        except BaseException:
            ws.reset()
            raise
        _save_live_checkpoint(cfg, store, ws, ckpt_uri, _extra(
            cfg, run_id, iteration, out_ckpt, started, [model_uri, rows_uri],
            {"global_step": trainer.global_step}, train_rows=rows,
        ))
    if ctx.is_main:
        table = pa.Table.from_pylist(rows, schema=schemas.TRAIN)
        store.write_table(table_uri, table, _extra(
            cfg, run_id, iteration, out_table, started, [rows_uri, model_uri], _train_metrics(rows),
            checkpoint=ckpt_uri, **manifest_more,
        ))
    distributed.barrier()
    return _summary(store.manifest(table_uri), skipped=False)


def train_policy(cfg: SparkConfig, store: Store, run_id: str, iteration: int,
                 ws: Workspace | None = None) -> dict[str, Any]:
    """GRPO on the verified policy rollouts -> `train/phase=policy` and the after-policy checkpoint.

    That checkpoint is `checkpoint` (the iteration's result) when no reward phase follows, else
    `policy_checkpoint` (the model the reward phase samples from, near on-policy as in the reference).
    """
    follows = reward_phase_follows(cfg, store, run_id, iteration)
    return _train(
        cfg, store, run_id, iteration, ws or workspace(), phase="policy",
        rows_uri=store.stage_uri(run_id, iteration, VERIFIED),
        model_uri=_checkpoint_before(store, run_id, iteration),
        out_table=TRAIN_POLICY, out_ckpt=POLICY_CHECKPOINT if follows else CHECKPOINT,
        manifest_more={"reward_phase": follows},
    )


def sample_reward(cfg: SparkConfig, store: Store, run_id: str, iteration: int,
                  ws: Workspace | None = None) -> dict[str, Any]:
    """Reward phase: K samples for each popped pool item, from the after-policy model -> `reward_samples`."""
    out = store.stage_uri(run_id, iteration, REWARD_SAMPLES)
    if (m := store.manifest_or_none(out)) is not None:
        return _summary(m, skipped=True)
    started = time.time()
    pool_uri = store.stage_uri(run_id, iteration, REWARD_POOL)
    model_uri = store.stage_uri(run_id, iteration, POLICY_CHECKPOINT)
    _require(store, pool_uri, "reward pool")
    pool = store.read_table(pool_uri)
    items = pool.filter(pool.column("popped")).to_pylist()
    if not items:
        raise StageError(f"iteration {iteration}: the pool popped no items; there is no reward phase to sample")
    ws = (ws or workspace()).use(cfg, store, model_uri)
    outs = _sample(cfg, ws, [it["prompt"] for it in items], cfg.reward_n, cfg.reward_max_new_tokens,
                   stage_seed(cfg.seed, iteration, REWARD_SAMPLES))
    rows = [
        {
            "question_id": it["item_id"],
            "sample_idx": j,
            "prompt": it["prompt"],
            "completion": c.text,
            "completion_ids": list(c.token_ids),
            "label": it["label"],
            "kind": it["kind"],
        }
        for it, completions in zip(items, outs)
        for j, c in enumerate(completions)
    ]
    table = pa.Table.from_pylist(rows, schema=schemas.REWARD_SAMPLES)
    metrics = {"items": len(items), "mean_completion_tokens": _mean([len(r["completion_ids"]) for r in rows])}
    m = store.write_table(out, table, _extra(
        cfg, run_id, iteration, REWARD_SAMPLES, started, [pool_uri, model_uri], metrics))
    return _summary(m, skipped=False)


def verify_reward(cfg: SparkConfig, store: Store, run_id: str, iteration: int) -> dict[str, Any]:
    """Judgments checked letter-exact, reflections by the math verifier -> `reward_verified`."""
    from .reward_data import verify_mode

    out = store.stage_uri(run_id, iteration, REWARD_VERIFIED)
    if (m := store.manifest_or_none(out)) is not None:
        return _summary(m, skipped=True)
    started = time.time()
    src = store.stage_uri(run_id, iteration, REWARD_SAMPLES)
    _require(store, src, "reward samples")
    samples = store.read_table(src)
    modes = [verify_mode(k) for k in samples.column("kind").to_pylist()]
    verified = _verify_rows(samples, modes).select(schemas.REWARD_VERIFIED.names).cast(schemas.REWARD_VERIFIED)
    metrics = _reward_metrics(verified)
    df = verified.select(["kind", "reward"]).to_pandas()
    metrics["mean_reward_by_kind"] = {str(k): float(v) for k, v in df.groupby("kind")["reward"].mean().items()}
    m = store.write_table(out, verified, _extra(cfg, run_id, iteration, REWARD_VERIFIED, started, [src], metrics))
    return _summary(m, skipped=False)


def train_reward(cfg: SparkConfig, store: Store, run_id: str, iteration: int,
                 ws: Workspace | None = None) -> dict[str, Any]:
    """Second GRPO step (same optimizer) on the judged items -> `train/phase=reward` and `checkpoint`."""
    return _train(
        cfg, store, run_id, iteration, ws or workspace(), phase="reward",
        rows_uri=store.stage_uri(run_id, iteration, REWARD_VERIFIED),
        model_uri=store.stage_uri(run_id, iteration, POLICY_CHECKPOINT),
        out_table=TRAIN_REWARD, out_ckpt=CHECKPOINT, manifest_more={},
    )


def benchmark_config(cfg: SparkConfig, name: str) -> BenchmarkConfig:
    for b in cfg.eval.benchmarks:
        if b.name == name:
            return b
    known = ", ".join(b.name for b in cfg.eval.benchmarks) or "none"
    raise StageError(f"no benchmark named {name!r} in eval.benchmarks (configured: {known})")


def run_benchmark(cfg: SparkConfig, ws: Workspace, bcfg: BenchmarkConfig, seed: int) -> tuple[pa.Table, dict[str, Any]]:
    """Evaluate the workspace's current checkpoint on one benchmark (no store involved)."""
    from .benchmarks import load_benchmark, load_preference_set
    from .evaluation import evaluate_benchmark, evaluate_preference

    fmt = ws.format_prompt(cfg)
    engine = ws.get_engine(cfg)
    if bcfg.source == "preference":
        return evaluate_preference(engine, fmt, load_preference_set(bcfg),
                                   max_new_tokens=cfg.eval_max_new_tokens, seed=seed)
    return evaluate_benchmark(
        engine, fmt, load_benchmark(bcfg, cfg),
        question_messages=lambda q: question_messages(cfg.data, q),
        eval_cfg=cfg.eval, max_new_tokens=cfg.eval_max_new_tokens, seed=seed,
    )


def evaluate(cfg: SparkConfig, store: Store, run_id: str, iteration: int, benchmark: str,
             ws: Workspace | None = None) -> dict[str, Any]:
    """Solver and self-judge quality of the iteration's checkpoint -> `eval/benchmark={name}`."""
    out = store.stage_uri(run_id, iteration, eval_stage(benchmark))
    if (m := store.manifest_or_none(out)) is not None:
        return _summary(m, skipped=True)
    started = time.time()
    bcfg = benchmark_config(cfg, benchmark)
    ckpt = store.stage_uri(run_id, iteration, CHECKPOINT)
    ws = (ws or workspace()).use(cfg, store, ckpt)
    table, summary = run_benchmark(cfg, ws, bcfg, stage_seed(cfg.seed, iteration, eval_stage(benchmark)))
    m = store.write_table(out, table, _extra(
        cfg, run_id, iteration, eval_stage(benchmark), started, [ckpt], summary, benchmark=benchmark,
        benchmark_source=bcfg.source,
    ))
    return _summary(m, skipped=False)


def finish_iteration(cfg: SparkConfig, store: Store, run_id: str, iteration: int) -> dict[str, Any]:
    """Check the iteration is complete, drop the intermediate checkpoint, and advance LATEST."""
    ckpt = store.stage_uri(run_id, iteration, CHECKPOINT)
    _require(store, ckpt, f"iteration {iteration}'s checkpoint")
    if eval_due(cfg, iteration):
        for b in cfg.eval.benchmarks:
            _require(store, store.stage_uri(run_id, iteration, eval_stage(b.name)), f"evaluation {b.name}")
    policy_ckpt = store.stage_uri(run_id, iteration, POLICY_CHECKPOINT)
    if not cfg.store.keep_policy_checkpoints and store.is_done(policy_ckpt) and store.is_done(
        store.stage_uri(run_id, iteration, TRAIN_REWARD)
    ):
        store.delete(policy_ckpt)
    latest = store.latest(run_id)
    if latest is None or iteration > latest:
        store.set_latest(run_id, iteration)
    return {"iteration": iteration, "latest": max(iteration, latest or 0), "checkpoint": ckpt}


# ------------------------------------------------------------------------------------------ reading


def _metric(store: Store, uri: str, name: str) -> Any:
    m = store.manifest_or_none(uri)
    return None if m is None else (m.get("metrics") or {}).get(name)


def iteration_summary(cfg: SparkConfig, store: Store, run_id: str, iteration: int) -> dict[str, Any]:
    """Flat metrics of one iteration, read from the manifests (None where a stage did not run)."""
    s = lambda stage: store.stage_uri(run_id, iteration, stage)  # noqa: E731
    out: dict[str, Any] = {"iteration": iteration}
    if iteration > 0:
        out.update(
            {
                "policy_reward": _metric(store, s(VERIFIED), "mean_reward"),
                "groups_mixed": _metric(store, s(VERIFIED), "groups_mixed"),
                "pool_size": _metric(store, s(REWARD_POOL), "pool_size"),
                "reward_items": _metric(store, s(REWARD_POOL), "popped"),
                "reward_phase_reward": _metric(store, s(REWARD_VERIFIED), "mean_reward"),
                "policy_loss": _metric(store, s(TRAIN_POLICY), "mean_loss"),
                "reward_loss": _metric(store, s(TRAIN_REWARD), "mean_loss"),
                "global_step": _metric(store, s(CHECKPOINT), "global_step"),
            }
        )
    for b in cfg.eval.benchmarks:
        uri = s(eval_stage(b.name))
        for key in ("accuracy", "accuracy_reflect", "judge_f1", "pairwise_accuracy"):
            value = _metric(store, uri, key)
            if value is not None:
                out[f"{b.name}/{key}"] = value
    seconds = 0.0
    for stage in store.list_stages(run_id, iteration):
        m = store.manifest_or_none(s(stage)) or {}
        seconds += float(m.get("seconds") or 0) + float(m.get("write_seconds") or 0)
    out["seconds"] = round(seconds, 1)
    return out


def metrics_frame(cfg: SparkConfig, store: Store, run_id: str) -> pd.DataFrame:
    """Per (iteration, benchmark) eval metrics of a run, in the shape `plots.metrics_plot` draws."""
    rows = []
    for it in store.list_iterations(run_id):
        for b in cfg.eval.benchmarks:
            m = store.manifest_or_none(store.stage_uri(run_id, it, eval_stage(b.name)))
            if m is None:
                continue
            metrics = m.get("metrics") or {}
            rows.append({
                "iteration": it,
                "benchmark": b.name,
                "accuracy": metrics.get("accuracy", metrics.get("pairwise_accuracy")),
                "accuracy_reflect": metrics.get("accuracy_reflect"),
                "judge_f1": metrics.get("judge_f1"),
            })
    return pd.DataFrame(rows, columns=["iteration", "benchmark", "accuracy", "accuracy_reflect", "judge_f1"])


__all__ = [
    "CHECKPOINT", "DISTRIBUTED_READY", "POLICY_CHECKPOINT", "REWARD_ITEMS", "REWARD_POOL", "REWARD_SAMPLES", "REWARD_VERIFIED",
    "SAMPLES", "TRAIN_POLICY", "TRAIN_REWARD", "VERIFIED", "StageError", "StoreError", "Workspace",
    "benchmark_config", "build_reward_data", "check_run_config", "eval_due", "evaluate", "finish_iteration", "init_run",
    "iteration_summary", "metrics_frame", "reward_phase_follows", "run_benchmark", "run_config",
    "sample_policy", "sample_reward", "stage_seed", "train_policy", "train_reward", "verify_policy",
    "verify_reward", "workspace",
]
