"""Cost of one checkpoint write through the store, against writing the same folder plainly, in one run.

A checkpoint here is what ``Workspace.save_checkpoint`` writes: the model (``save_pretrained``,
safetensors), its tokenizer and the trainer state (AdamW moments after one step, ``write_state``).
Contenders, alternated round by round (order reversed every other round) in one process:

* ``plain``: ``models.save_checkpoint`` + ``write_state`` into a plain folder; no store, no checksums:
  the floor (the bytes must be serialised and written once);
* ``store, as before``: ``Store.checkpoint_writer`` as before issue 15's checkpoint work:
  ``hash_workers`` = ``transfer_workers`` = 1 (one file hashed / uploaded / moved at a time), the
  trainer state written with torch's per-record CRC32, and on S3 the files uploaded under a temporary
  key and then moved into place (a server-side copy; since 2026-12-01 22:30 UTC they go straight to
  their final keys);
* ``store``: ``Store.checkpoint_writer`` and ``write_state`` as they are now.

Both store contenders run on a local store and, unless ``--no-s3``, on a SeaweedFS S3 server started
through ``infra/local/stack.py``. Bytes written/read per write come from ``/proc/self/io`` (``wchar``,
``rchar``: bytes passed to write/read calls, page cache included), so a second local copy would show
as twice the folder's size written.

    python bench/checkpoint_write.py --models smollm2-arith --rounds 3 --threads 1
    python bench/checkpoint_write.py --quick          # tiny, local store, 1 round
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def proc_io() -> tuple[int, int]:
    """(bytes written, bytes read) through read/write calls of this process so far; (0, 0) off Linux."""
    try:
        fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    except OSError:
        return 0, 0
    return int(fields["wchar"]), int(fields["rchar"])


def build_checkpoint(preset: str) -> tuple[Callable[[Path], None], Any]:
    """A function that saves the model + tokenizer + trainer state into a folder, and the config."""
    import torch

    from spark_core.config import load_config
    from spark_core.initial_model import load_initial_model
    from spark_core.models import save_checkpoint
    from spark_core.layout import TRAINER_STATE_DIR
    from spark_core.trainer_state import STATE_FILE, write_state

    cfg = load_config(preset=preset, overrides={"device": "cpu"})
    model, tok = load_initial_model(cfg)
    model.float()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # creates both moments, as after the first training step
    state = {"optimizer": opt.state_dict(), "global_step": 1, "torch_rng": torch.get_rng_state()}

    def save(folder: Path, before: bool = False) -> None:
        save_checkpoint(model, tok, folder)
        path = folder / TRAINER_STATE_DIR / STATE_FILE
        if before:  # write_state as it was: torch.save with its default CRC32 per record
            path.parent.mkdir(parents=True)
            torch.save(state, path)
        else:
            write_state(path, state)

    return save, cfg


def upload_then_move(store: Any) -> Callable[..., list[str]]:
    """A remote checkpoint upload as before: to a temporary key, then moved into place (copy + delete)."""
    import uuid

    from spark_core.layout import TMP_PREFIX

    upload = type(store)._upload_folder

    def run(local: Path, dest: str, hold_uri: str | None = None) -> list[str]:
        tmp = store.join(dest, f"{TMP_PREFIX}{uuid.uuid4().hex}")
        upload(store, local, tmp, hold_uri)
        return store._move_into_place(tmp, dest)

    return run


def measure(preset: str, rounds: int, s3_uri: str | None) -> dict[str, Any]:
    from spark_core import checkpoint_io
    from spark_core.store import Store

    save, _ = build_checkpoint(preset)
    root = Path(tempfile.mkdtemp(prefix="spark-bench-ckpt-"))
    stores = {"local": Store(str(root / "store"), cache_dir=root / "cache")}
    if s3_uri:
        stores["s3"] = Store(s3_uri, cache_dir=root / "cache")
    counter = [0]
    samples: dict[str, list[dict[str, float]]] = {}
    sizes: list[int] = []

    def plain() -> float:
        counter[0] += 1
        folder = root / f"plain-{counter[0]}"
        folder.mkdir()
        w0, r0 = proc_io()
        t = time.perf_counter()
        save(folder)
        sec = time.perf_counter() - t
        w1, r1 = proc_io()
        sizes.append(checkpoint_io.folder_bytes(folder))
        samples.setdefault("plain", []).append({"s": sec, "written": w1 - w0, "read": r1 - r0})
        shutil.rmtree(folder)
        return sec

    def through(kind: str, workers: int | None) -> tuple[str, Callable[[], float]]:
        name = f"{kind} store" + (", as before" if workers == 1 else "")

        def run() -> float:
            store = stores[kind]
            store.hash_workers = workers or checkpoint_io.CheckpointIO.hash_workers
            store.transfer_workers = workers or checkpoint_io.CheckpointIO.transfer_workers
            store.__dict__.pop("_upload_folder", None)
            if workers == 1 and not store.is_local:
                store._upload_folder = upload_then_move(store)  # type: ignore[method-assign]
            counter[0] += 1
            uri = store.stage_uri("bench", counter[0], "checkpoint")
            w0, r0 = proc_io()
            t = time.perf_counter()
            with store.checkpoint_writer(uri) as folder:
                save(folder, before=workers == 1)
            sec = time.perf_counter() - t
            w1, r1 = proc_io()
            samples.setdefault(name, []).append({"s": sec, "written": w1 - w0, "read": r1 - r0})
            store.delete(uri)
            shutil.rmtree(root / "cache", ignore_errors=True)
            return sec

        return name, run

    contenders: dict[str, Callable[[], float]] = {"plain": plain}
    for kind in stores:
        for workers in (1, None):
            name, fn = through(kind, workers)
            contenders[name] = fn
    common.alternate(rounds, contenders)
    shutil.rmtree(root, ignore_errors=True)
    return {"bytes": max(sizes), "samples": samples}


def main() -> int:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,smollm2-arith", help="comma list of presets")
    parser.add_argument("--rounds", type=int, default=3, help="writes per contender")
    parser.add_argument("--no-s3", action="store_true", help="local store only")
    args = parser.parse_args()
    common.apply_threads(args)
    common.quiet_libraries()
    common.set_threads()
    presets = ["tiny"] if args.quick else args.models.split(",")
    rounds = 1 if args.quick else args.rounds
    info = common.machine_info()
    results: dict[str, Any] = {}
    use_s3 = not (args.no_s3 or args.quick)
    if use_s3:
        import iteration  # the SeaweedFS stack helper of bench/iteration.py

        ctx: Any = iteration.s3_stack()
    else:
        ctx = contextlib.nullcontext(None)
    with ctx as env:
        if env:
            import os

            os.environ.update({k: v for k, v in env.items() if not k.startswith("SPARK_BENCH")})
        s3_uri = env.get("SPARK_BENCH_STORE") if env else None
        for preset in presets:
            results[preset] = measure(preset, rounds, s3_uri)
    rows = []
    for preset, res in results.items():
        size, samples = res["bytes"], res["samples"]
        base = common.median([x["s"] for x in samples["plain"]])
        seq = {k: common.median([x["s"] for x in v]) for k, v in samples.items()}
        for name, runs in samples.items():
            sec = seq[name]
            seq_name = name if name == "plain" or name.endswith("as before") else f"{name}, as before"
            rows.append([preset, name, f"{size / 1e9:.3f}", sec, f"{size / 1e9 / sec:.2f}",
                         common.median([x["written"] for x in runs]) / size,
                         common.median([x["read"] for x in runs]) / size,
                         common.ratio(sec, base), common.ratio(sec, seq.get(seq_name, float("nan")))])
    table = common.markdown_table(
        ["model", "contender", "checkpoint GB", "s/write (median)", "GB/s", "bytes written / size",
         "bytes read / size", "vs plain", "vs as before"], rows)
    notes = [f"{rounds} writes per contender, alternated; medians.",
             "bytes written/read: /proc/self/io wchar/rchar deltas (page cache included; S3 uploads "
             "go through sockets and read the staged files once, a second local copy would show as 2.0 "
             "written).",
             "store = plain + sha256 of every file + rename into place (local) or upload to the final keys "
             "(S3; as before: to a temporary key, then a server-side move) + manifest."]
    print(common.report("Checkpoint write: the store vs a plain folder", info, [("", table)], notes))
    common.write_json(args.json, {"benchmark": "checkpoint_write", "machine": info, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
