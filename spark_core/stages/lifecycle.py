"""The workspace: what one process keeps loaded between stages (model, tokenizer, trainer, engine, KL
reference) and the checkpoint write of the live weights, collective under several ranks.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any, Callable

from ..chat import formatter
from ..config import SparkConfig
from ..engines.base import Engine, sleep, supports_weight_update
from ..engines.factory import keeps_engine, needs_free_accelerator, uses_live_model
from ..layout import CHECKPOINT, TRAINER_STATE_DIR
from ..store import Store
from .common import StageError, require_done


class Workspace:
    """What one process keeps loaded between stages: the policy whose weights equal one checkpoint.

    ``use(checkpoint_uri)`` is free when the live weights already are that checkpoint (the usual case
    within an iteration: training updates the model in place and the new checkpoint is adopted), and
    otherwise drops everything and points at the new checkpoint; model, trainer and engine load lazily
    from its local folder. The frozen reference model (iteration 0) is kept separately.

    Inside an iteration the weights move on without a store checkpoint: ``applied`` lists the TRAIN
    tables of the updates trained on top of the checkpoint ``key`` names (``stages.replay``).
    """

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.key: tuple[str, str, str] | None = None
        self.applied: tuple[str, ...] = ()  # updates trained on top of `key` since it was loaded or saved
        self.folder: Path | None = None
        self._spilled: Path | None = None  # a local folder of live weights that match no store checkpoint
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
            require_done(store, uri, "checkpoint")
            key = self._key(cfg, store, uri)
            if key != self.key or self.applied:
                self.reset()
                self.folder = store.download_checkpoint(uri)
                self.key = key
            return self

    def holds(self, cfg: SparkConfig, store: Store, uri: str) -> bool:
        """Whether the live weights are checkpoint `uri` (plus the updates in ``applied``)."""
        return self.key is not None and self.key == self._key(cfg, store, uri)

    def adopt(self, cfg: SparkConfig, store: Store, uri: str) -> None:
        """The live weights were just saved as `uri`: remember that instead of reloading."""
        with self.lock:
            self.key, self.applied = self._key(cfg, store, uri), ()
            self.folder = store.download_checkpoint(uri)
            self._drop_spill()

    def before_training(self, cfg: SparkConfig) -> None:
        """The trainer is about to need the accelerator: an out-of-process engine sleeps where it is kept
        for the whole iteration (``factory.keeps_engine``), else it stops (and restarts on new weights)."""
        if self.engine is None or uses_live_model(cfg.sampling.engine):
            return
        if keeps_engine(cfg):
            sleep(self.engine)
        else:
            self.engine.close()
            self.engine = None

    def weights_changed(self, cfg: SparkConfig) -> None:
        """The live weights were just trained: an out-of-process engine serves the old ones. It gets the
        new weights in place where it can (``Engine.update_weights``), else it is stopped."""
        if self.engine is None or uses_live_model(cfg.sampling.engine):
            return
        if supports_weight_update(self.engine):
            self.engine.update_weights(self._live_state_dict(cfg))  # type: ignore[attr-defined]
        else:
            self.engine.close()
            self.engine = None

    def _live_state_dict(self, cfg: SparkConfig) -> dict[str, Any]:
        model = self.trainer.raw_model if self.trainer is not None else self.model
        if cfg.model.lora is not None:
            from ..lora import merged_state_dict

            return merged_state_dict(model)
        return {k: v.detach() for k, v in model.state_dict().items()}

    def _spill(self, cfg: SparkConfig) -> None:
        """Write the live weights (+ trainer state) to a local folder, not the store, and load from it from
        now on: an engine that reads a folder, or dropping the in-process model, needs them on disk."""
        import tempfile

        if not self.applied or self.model is None:
            return
        folder = Path(tempfile.mkdtemp(prefix="spark-live-"))
        state = self.trainer.state_dict() if self.trainer is not None else None
        self._save_into(cfg, folder, None, state)
        self._drop_spill()
        self.folder = self._spilled = folder

    def _drop_spill(self) -> None:
        if self._spilled is not None:
            import shutil

            shutil.rmtree(self._spilled, ignore_errors=True)
            self._spilled = None

    def reset(self) -> None:
        """Forget the live weights (after a failure mid-training they match no checkpoint)."""
        with self.lock:
            if self.engine is not None:
                self.engine.close()
            self.key = self.folder = None
            self.applied = ()
            self._drop_spill()
            self.model = self.tokenizer = self.trainer = self.engine = None

    def close(self) -> None:
        self.reset()
        self._ref = None

    # -- lazily loaded parts
    @staticmethod
    def device(cfg: SparkConfig) -> Any:
        """Where this process computes: its rank's device under a launcher, else ``cfg.device``."""
        from .. import distributed
        from ..models import resolve_device

        ctx = distributed.current()
        return ctx.device if ctx.enabled else resolve_device(cfg.device)

    def _need_folder(self) -> Path:
        if self.folder is None:
            raise StageError("workspace has no checkpoint selected (call use() first)")
        return self.folder

    def get_tokenizer(self, cfg: SparkConfig) -> Any:
        if self.tokenizer is None:
            from ..models import load_tokenizer

            self.tokenizer = load_tokenizer(self._need_folder())
        return self.tokenizer

    def get_model(self, cfg: SparkConfig) -> Any:
        if self.model is None:
            from ..models import load_model_and_tokenizer

            self.before_training(cfg)  # free the accelerator before the in-process model needs it
            folder, device = self._need_folder(), self.device(cfg)
            if cfg.model.lora is None:
                self.model, self.tokenizer = load_model_and_tokenizer(cfg.model, path=folder, device=device)
            else:
                from ..lora import base_weights_folder, load_lora_checkpoint

                # Adapter-mode checkpoints hold the base weights; merged ones need the original base.
                from ..initial_model import load_initial_model

                base, self.tokenizer = load_initial_model(cfg, device=device, path=base_weights_folder(folder))
                self.model = load_lora_checkpoint(base, folder, is_trainable=True).to(device)
        return self.model

    def get_trainer(self, cfg: SparkConfig, store: Store, run_id: str) -> Any:
        if self.trainer is None:
            from ..trainer import Trainer, planned_optimizer_steps
            from ..trainer_state import STATE_FILE

            check_sharded_lora(cfg)
            model = self.get_model(cfg)
            ref = self._ref_model(cfg, store, run_id) if cfg.train.kl_coef > 0 else None
            trainer = Trainer(
                model, self.tokenizer, cfg.train, self.device(cfg),
                total_steps=planned_optimizer_steps(cfg), ref_model=ref,
                # log-probs of the distribution that was sampled (both phases sample at this temperature)
                temperature=cfg.sampling.temperature,
            )
            if (image_processor := getattr(self.tokenizer, "image_processor", None)) is not None:
                from ..images import ImageCache
                from ..vision import VisionInputs

                # rows name their images by reference: the trainer reads them from the run's store
                trainer.vision = VisionInputs(self.tokenizer, image_processor, ImageCache(store, run_id))
            state = self._need_folder() / TRAINER_STATE_DIR
            if (state / STATE_FILE).exists():
                trainer.load_state(state)
            self.trainer = trainer
        return self.trainer

    def _ref_model(self, cfg: SparkConfig, store: Store, run_id: str) -> Any:
        """The frozen initial model (iteration 0 checkpoint) for the KL penalty, loaded once.

        With LoRA the reference is the live model with its adapters switched off (the frozen base)."""
        from ..models import load_model_and_tokenizer

        if cfg.model.lora is not None:
            from ..lora import AdapterDisabledReference

            return AdapterDisabledReference(self.get_model(cfg))
        uri = store.stage_uri(run_id, 0, CHECKPOINT)
        require_done(store, uri, "the initial checkpoint (KL reference)")
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
                from ..engines.factory import make_engine

                kind = cfg.sampling.engine
                if not uses_live_model(kind):
                    self._spill(cfg)  # the engine reads the weights from a folder
                if needs_free_accelerator(kind) and not keeps_engine(cfg):
                    self._release_accelerator()
                model = self.get_model(cfg) if uses_live_model(kind) else None
                try:
                    self.engine = make_engine(cfg, model, self.get_tokenizer(cfg), self._need_folder())
                except ValueError as err:
                    raise StageError(f"cannot build the {kind!r} engine: {err}") from err
        return self.engine

    def _release_accelerator(self) -> None:
        """Free the GPU for an out-of-process engine: the in-process model, trainer and reference go.

        Safe because the live weights and trainer state equal the selected checkpoint (it was just
        saved or loaded); the trainer reloads them from its folder when the next update needs them."""
        if self.model is not None and (self.key is None or (self.applied and self._spilled is None)):
            raise StageError("the live weights match no saved checkpoint; refusing to drop them")
        on_gpu = self.model is not None and any(p.is_cuda for p in self.model.parameters())
        self.model = self.trainer = None
        self._ref = None
        if on_gpu:
            import gc

            import torch

            gc.collect()
            torch.cuda.empty_cache()

    def save_checkpoint(self, cfg: SparkConfig, store: Store, uri: str, extra: dict[str, Any]) -> dict[str, Any]:
        """Write the live model (+ tokenizer + trainer state) as checkpoint `uri` and adopt it.

        Under several ranks every rank must call this: gathering the full weights and optimizer state is
        collective under FSDP; only rank 0 writes, and every rank returns after the checkpoint exists."""
        from .. import distributed

        ctx = distributed.current()
        live = self.trainer.model if self.trainer is not None else self.model
        weights = distributed.full_state_dict(live) if ctx.enabled else None  # collective; None off rank 0
        trainer_state = self.trainer.state_dict() if self.trainer is not None else None  # collective under FSDP
        if ctx.is_main:
            with store.checkpoint_writer(uri, extra) as folder:
                self._save_into(cfg, folder, weights, trainer_state)
            self.adopt(cfg, store, uri)
        distributed.barrier()  # the other ranks continue once the checkpoint is complete
        return store.manifest(uri)

    def _save_into(self, cfg: SparkConfig, folder: Path, weights: Any, trainer_state: Any) -> None:
        """The live model, tokenizer and trainer state as a checkpoint folder (rank 0)."""
        from .. import distributed

        live = self.trainer.model if self.trainer is not None else self.model
        model = distributed.unwrap(live) if distributed.current().enabled else self.model
        if cfg.model.lora is None:
            from ..models import save_checkpoint

            save_checkpoint(model, self.tokenizer, folder, state_dict=weights)
        else:
            from ..lora import export_for_engine

            export_for_engine(model, self.tokenizer, folder, cfg.model.lora.engine_weights, cfg.model.lora)
        if self.trainer is not None:
            self.trainer.save_state(folder / TRAINER_STATE_DIR, state=trainer_state)

    def format_prompt(self, cfg: SparkConfig) -> Callable[[list[dict[str, str]]], str]:
        return formatter(self.get_tokenizer(cfg), cfg.data.use_chat_template)

    def training_questions(self, cfg: SparkConfig) -> list[Any]:
        from ..data import load_training_questions

        key = hashlib.sha256(cfg.data.model_dump_json().encode()).hexdigest()
        if key not in self._questions:
            self._questions = {key: load_training_questions(cfg.data)}
        return self._questions[key]


_WORKSPACE = Workspace()


def workspace() -> Workspace:
    """The process-wide workspace every stage uses unless given another."""
    return _WORKSPACE


def check_sharded_lora(cfg: SparkConfig) -> None:
    """LoRA export reads the full adapter and base weights from the live peft model, which FSDP shards."""
    from .. import distributed

    ctx = distributed.current()
    sharded = ctx.enabled and ctx.accelerator is not None and "FSDP" in str(ctx.accelerator.distributed_type)
    if sharded and cfg.model.lora is not None:
        raise StageError(
            "model.lora with FSDP is not supported (the adapter export needs unsharded weights): train LoRA "
            "with train.launcher=torchrun (DDP) or an accelerate config without FSDP"
        )
