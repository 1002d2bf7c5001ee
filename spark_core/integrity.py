"""Part sizes and checksums in stage manifests, and what readers do with them.

Every manifest written by ``Store.write_table`` / ``Store.checkpoint_writer`` carries ``parts``:
``{file name: {"bytes": size, "sha256": hex digest}}``. A reader that finds a part missing, shorter or
longer than recorded, or with other bytes, fails with a StoreError naming the file, instead of a
pyarrow error about a nameless buffer or, worse, a silently different table. Manifests written
before this existed have no ``parts`` and are read as before.

Also here: turning "no space left on device" into an error that says what happened to the stage.
"""

from __future__ import annotations

import errno
import hashlib
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .store_errors import StoreError

_CHUNK = 1 << 20


def describe(data: bytes) -> dict[str, Any]:
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def describe_file(path: Path) -> dict[str, Any]:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}


def describe_folder(folder: Path, workers: int = 1) -> dict[str, dict[str, Any]]:
    """``parts`` of every file under a folder, by path relative to it; ``workers`` files are hashed at
    once (hashlib releases the GIL, so the weights and the optimizer state hash side by side)."""
    files = sorted((p for p in folder.rglob("*") if p.is_file()), key=lambda p: -p.stat().st_size)
    with ThreadPoolExecutor(max(1, min(workers, len(files) or 1))) as pool:
        described = dict(zip(files, pool.map(describe_file, files)))
    return {p.relative_to(folder).as_posix(): described[p] for p in sorted(files)}


def _mismatch(where: str, got: dict[str, Any], want: dict[str, Any]) -> str | None:
    if got["bytes"] != want["bytes"]:
        kind = "truncated" if got["bytes"] < want["bytes"] else "longer than written"
        return f"{where} is {kind}: {got['bytes']} bytes, the manifest records {want['bytes']}"
    if "sha256" in got and got["sha256"] != want["sha256"]:
        return f"{where} is corrupt: its sha256 differs from the one the manifest records"
    return None


def check_bytes(where: str, data: bytes, manifest: dict[str, Any], name: str) -> None:
    """Raise StoreError when a part read back differs from what its manifest recorded."""
    want = (manifest.get("parts") or {}).get(name)
    if want is not None and (problem := _mismatch(where, describe(data), want)):
        raise StoreError(f"{problem}; the stage is damaged: delete it to have it written again")


def check_file(where: str, path: Path, manifest: dict[str, Any], name: str, *, checksum: bool) -> None:
    """Like check_bytes for a file on disk; ``checksum=False`` compares sizes only (cheap, for reloads)."""
    want = (manifest.get("parts") or {}).get(name)
    if want is None:
        return
    if not path.is_file():
        raise StoreError(f"{where} listed in the manifest is missing; the stage is damaged: delete it to "
                         "have it written again")
    got = describe_file(path) if checksum else {"bytes": path.stat().st_size}
    if problem := _mismatch(where, got, want):
        raise StoreError(f"{problem}; the stage is damaged: delete it to have it written again")


def no_space_error(uri: str, err: BaseException, local_path: str | None) -> StoreError | None:
    """A clear StoreError for ENOSPC while writing a stage (None for any other error)."""
    if not (isinstance(err, OSError) and err.errno == errno.ENOSPC):
        return None
    free = ""
    if local_path:
        probe = Path(local_path)
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        try:
            free = f" ({shutil.disk_usage(probe).free:,} bytes free on {probe})"
        except OSError:
            pass
    return StoreError(
        f"no space left on device while writing {uri}{free}: nothing of this stage was committed "
        "(stages finished before it are kept); free some space and re-trigger the run to resume"
    )
