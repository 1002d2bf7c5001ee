"""The in-process engine: transformers `generate` on the policy model itself (default on CPU and in tests).

Token ids contract: `Completion.token_ids` are exactly the tokens the model sampled, without any padding,
and include the EOS token when generation stopped on it (the trainer scores these ids, so the stop token
is trained like any other). `Completion.text` is those ids decoded with special tokens skipped. With stop
strings, the ids end with the token that completes the first stop string (the text includes it).
Padding (pad or EOS ids that generate appends after a sequence has finished) is never returned.

Sampling uses transformers' own processors with every knob set explicitly (no top-k, no repetition
penalty) so the model's `generation_config` cannot change what is sampled. Each batch is seeded from
`SamplingParams.seed` and its index inside a forked RNG.

The n samples of a prompt share its prefill: for a text batch whose rows repeat a prompt (and where
that saves enough compute, `prefix_scoring.worth_sharing`), the distinct prompts but their last token
are run once with the KV cache on, the cache rows are repeated for every sample, and `generate`
continues from that cache. The logits equal a full prefill up to float rounding, so a sampled token
can differ from plain `generate` where two candidates are within rounding of each other
(`prefill_prompts_once = False` restores plain `generate`).

Vision-language models (the tokenizer carries an ``image_processor``, `spark_core.models.load_tokenizer`):
``generate(..., images=...)`` takes each prompt's image bytes; the prompt's image placeholders are
expanded and the pixel values and image grids go to ``model.generate`` (`spark_core.vision.VisionInputs`).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from ..prefix_scoring import cache_keyword, worth_sharing
from .base import Completion, SamplingParams


class HFEngine:
    """Batched sampling with `model.generate`: prompts x n sequences, at most `batch_size` per call.

    `device` is where inputs are sent (default: the model's device); the model itself is not moved.
    """

    # Repeated prompts of a batch are prefilled once (see the module docstring); False: plain `generate`.
    prefill_prompts_once = True

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        device: str | torch.device | None = None,
        batch_size: int = 64,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device) if device is not None else model.device
        self.batch_size = batch_size
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token; HFEngine needs one to batch")
        self.pad_token_id: int = pad
        self._num_params = sum(p.numel() for p in model.parameters())
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = tokenizer.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        # Pad also ends a sequence: a model that emits it has nothing more to say, and generate would
        # otherwise keep sampling after it.
        self.stop_token_ids: list[int] = sorted(eos_ids | {pad})
        image_processor = getattr(tokenizer, "image_processor", None)
        self.vision = None
        if image_processor is not None:
            from ..vision import VisionInputs

            self.vision = VisionInputs(tokenizer, image_processor)

    # ------------------------------------------------------------------------------------------ api

    def generate(self, prompts: list[str], params: SamplingParams,
                 images: list[list[bytes]] | None = None) -> list[list[Completion]]:
        """result[i][j] is sample j of prompt i; identical for the same seed, prompts and weights.

        ``images[i]``: the image bytes of prompt i (vision-language models only)."""
        if params.n < 1:
            raise ValueError(f"n must be >= 1, got {params.n}")
        if images is not None and any(images):
            if self.vision is None:
                raise ValueError("images were given but the model has no image processor (not a vision-language model)")
            if len(images) != len(prompts):
                raise ValueError(f"{len(images)} image lists for {len(prompts)} prompts")
        else:
            images = None
        # Sequence k of the flat list is sample k % n of prompt k // n; keeping a prompt's samples
        # adjacent keeps padding within a batch small.
        flat: list[Any] = [p for p in prompts for _ in range(params.n)]
        if images is not None:
            flat = [(p, imgs) for p, imgs in zip(prompts, images) for _ in range(params.n)]
        batches = [flat[i : i + self.batch_size] for i in range(0, len(flat), self.batch_size)]
        out: list[Completion] = []
        was_training = self.model.training
        self.model.eval()
        try:
            bar = tqdm(
                batches,
                desc="generate",
                unit="batch",
                disable=len(batches) < 3 or not sys.stderr.isatty(),
            )
            for index, batch in enumerate(bar):
                out.extend(self._generate_batch(batch, params, seed=_batch_seed(params.seed, index)))
        finally:
            self.model.train(was_training)
        return [out[i * params.n : (i + 1) * params.n] for i in range(len(prompts))]

    def close(self) -> None:
        """Nothing to release: the model belongs to the caller."""

    # ------------------------------------------------------------------------------------ internals

    def _generation_config(self, params: SamplingParams) -> GenerationConfig:
        # Every knob that shapes the distribution is set explicitly: unset ones would be filled from the
        # model's own generation_config or transformers' defaults (top_k=50), changing what is sampled.
        kwargs: dict[str, Any] = dict(
            max_new_tokens=params.max_new_tokens,
            min_new_tokens=0,
            do_sample=not params.greedy,
            repetition_penalty=1.0,
            num_beams=1,
            eos_token_id=self.stop_token_ids,
            pad_token_id=self.pad_token_id,
        )
        if not params.greedy:
            # top_k=0 switches top-k filtering off (SamplingParams has no top-k).
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
        if params.stop:
            kwargs["stop_strings"] = list(params.stop)
        return GenerationConfig(**kwargs)

    def _encode(self, batch: list[Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Left-padded inputs of a batch and the vision tensors (empty for text prompts)."""
        if not batch or isinstance(batch[0], str):
            enc = self.tokenizer(batch, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")
            return dict(enc.to(self.device)), {}
        from ..vision import collate_vision

        assert self.vision is not None
        encoded = [self.vision.encode(text, imgs) for text, imgs in batch]
        width = max(len(ids) for ids, _ in encoded)
        input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (ids, _) in enumerate(encoded):
            input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention[row, width - len(ids):] = 1
        enc = {"input_ids": input_ids.to(self.device), "attention_mask": attention.to(self.device)}
        return enc, collate_vision([v for _, v in encoded], self.device)

    @torch.inference_mode()
    def _generate_batch(self, texts: list[Any], params: SamplingParams, seed: int) -> list[Completion]:
        enc, vision = self._encode(texts)
        extra: dict[str, Any] = {"tokenizer": self.tokenizer} if params.stop else {}
        extra.update(vision)
        if not vision and (cache := self._shared_prefill(enc["input_ids"], enc["attention_mask"])) is not None:
            extra[cache_keyword()] = cache
        devices = [self.device] if self.device.type == "cuda" else []
        # Seed a forked RNG: the batch is reproducible and the caller's random state is left alone.
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            sequences = self.model.generate(
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                generation_config=self._generation_config(params),
                **extra,
            )
        new_tokens = sequences[:, enc["input_ids"].shape[1] :].tolist()
        return [self._completion(row, params) for row in new_tokens]

    def _shared_prefill(self, ids: torch.Tensor, attention: torch.Tensor) -> Any | None:
        """A KV cache of every row's prompt but its last token, computed once per distinct prompt, or None
        where that is not worth it. `generate` runs the last prompt token itself (it needs one uncached
        token to start from)."""
        if not self.prefill_prompts_once or ids.shape[1] < 2:
            return None
        # Same prompt = same left-padded row (ids and mask, so a prompt token equal to the pad id is no match).
        unique, rows = torch.unique(torch.cat([ids, attention], 1), dim=0, return_inverse=True)
        saved = (ids.shape[0] - unique.shape[0]) * (ids.shape[1] - 1)
        if not worth_sharing(self._num_params, saved, self.device):
            return None
        width = ids.shape[1]
        prefix, mask = unique[:, : width - 1], unique[:, width : 2 * width - 1]
        # The positions generate gives these tokens: 0, 1, ... from each row's first real token.
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        out = self.model(input_ids=prefix, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1)
        cache = getattr(out, cache_keyword(), None)
        if not hasattr(cache, "reorder_cache"):  # a model without a row-indexable KV cache: plain generate
            return None
        cache.reorder_cache(rows)
        return cache

    def _completion(self, row: list[int], params: SamplingParams) -> Completion:
        """Cut one generated row at its first stop token (kept) and drop the padding after it."""
        stops = set(self.stop_token_ids)
        end = next((k for k, tok in enumerate(row) if tok in stops), None)
        if end is not None:
            ids, reason = row[: end + 1], "stop"
        else:
            ids, reason = row, "length"
        if params.stop:
            cut = self._stop_string_end(ids if reason == "length" else ids[:-1], params.stop)
            if cut is not None:
                # Stopped by a stop string: the tokens after it are padding generate filled in.
                ids, reason = ids[:cut], "stop"
        return Completion(self.tokenizer.decode(ids, skip_special_tokens=True), ids, reason)

    def _stop_string_end(self, ids: list[int], stop: tuple[str, ...]) -> int | None:
        """Length of the shortest prefix of `ids` whose text contains a stop string, if any."""
        if not any(s in self.tokenizer.decode(ids, skip_special_tokens=True) for s in stop):
            return None
        for k in range(1, len(ids) + 1):
            text = self.tokenizer.decode(ids[:k], skip_special_tokens=True)
            if any(s in text for s in stop):
                return k
        return None


def _batch_seed(seed: int, index: int) -> int:
    # Distinct, reproducible seed per batch; kept in torch's accepted range.
    return (seed * 1_000_003 + index) % (2**63 - 1)
