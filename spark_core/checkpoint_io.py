"""Checkpoint folders in the store: atomic save, upload and cached download (a part of ``Store``).

A checkpoint is a folder (an HF ``save_pretrained`` folder plus trainer state); its ``_SUCCESS.json``,
written last, lists every file with size and checksum (``spark_core.integrity``) and is what makes it
exist. On a local store it is written under a temporary key and renamed into place, like a table. On a
remote store the files go straight to their final keys: S3 has no rename (a move is a server-side copy
of every byte, about 28% of a SeaweedFS write), and nothing reads a checkpoint's files except through
its manifest (no hive glob covers checkpoints), so keys without a manifest are invisible; the next
write of the same checkpoint removes them first (``Store._prepare``). Remote checkpoints are downloaded
once into a local cache keyed by the manifest's write token, so a process never downloads the same
write twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from . import faults, integrity
from .layout import TMP_PREFIX
from .store_errors import StoreError


def folder_bytes(folder: Path) -> int:
    """Total size of the files under `folder`."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


class CheckpointIO:
    """The checkpoint half of :class:`spark_core.store.Store` (it relies on the store's retrying I/O,
    ``_prepare``/``_finish`` manifests and ``_move_into_place``)."""

    #: Files hashed at once when a checkpoint is described (sha256 is CPU-bound; hashlib frees the GIL).
    hash_workers: int = 2
    #: Files uploaded / moved at once on a remote store (each is one retried call; s3fs also sends the
    #: parts of one large file concurrently).
    transfer_workers: int = 4

    def _each(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> None:
        """``fn`` on every item, ``transfer_workers`` at a time on a remote store; the first error is
        raised after every started call has ended (so none still writes when the caller cleans up)."""
        items = list(items)
        if self.is_local or self.transfer_workers <= 1 or len(items) <= 1:
            for item in items:
                fn(item)
            return
        with ThreadPoolExecutor(min(self.transfer_workers, len(items))) as pool:
            list(pool.map(fn, items))

    @contextmanager
    def checkpoint_writer(
        self, uri: str, manifest_extra: dict[str, Any] | None = None, *, overwrite: bool = False
    ) -> Iterator[Path]:
        """Yield a local folder to save a checkpoint into; on success it becomes `uri`, atomically.

        Local store: the folder is the temporary key itself, renamed into place file by file (the
        bytes are written once). Remote store: a temporary folder in the download cache, uploaded to the
        final keys (``transfer_workers`` files at once) when the block ends, then kept as the cached
        copy. On error nothing becomes visible, and what was uploaded is removed.
        """
        started = time.time()
        faults.hold_point(uri, "before_write")
        self._prepare(uri, overwrite)
        if self.is_local:
            tmp = self.join(uri, f"{TMP_PREFIX}{uuid.uuid4().hex}")
            folder = Path(self._p(tmp))
            folder.mkdir(parents=True)
            try:
                yield folder
                total = folder_bytes(folder)
                parts = integrity.describe_folder(folder, self.hash_workers)
                # Local: the caller saved straight into the temporary key; none of it is moved yet.
                faults.hold_point(uri, "mid_write")
                files = self._move_into_place(tmp, uri)
            except BaseException as err:
                shutil.rmtree(folder, ignore_errors=True)
                if (full := integrity.no_space_error(uri, err, str(folder))) is not None:
                    self._rm(uri)
                    raise full from None
                raise
        else:
            # Stage the folder inside the download cache: once uploaded it becomes this checkpoint's
            # cached copy, so the process that wrote it never downloads it again.
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            folder = self.cache_dir / f"{TMP_PREFIX}{uuid.uuid4().hex}"
            folder.mkdir()
            try:
                yield folder
                total = folder_bytes(folder)
                parts = integrity.describe_folder(folder, self.hash_workers)
                files = self._upload_folder(folder, uri, hold_uri=uri)
            except BaseException as err:
                shutil.rmtree(folder, ignore_errors=True)
                # No manifest was written, so the keys uploaded so far are invisible; remove them, or (the
                # store unreachable) leave them to the next write of this checkpoint, which removes them first.
                with contextlib.suppress(StoreError):
                    self._rm(uri)
                if (full := integrity.no_space_error(uri, err, str(folder))) is not None:
                    raise full from None
                raise
        faults.hold_point(uri, "before_manifest")
        try:
            manifest = self._finish(uri, files, started, manifest_extra, kind="checkpoint", bytes=total,
                                    parts=parts)
        except OSError as err:
            if (full := integrity.no_space_error(uri, err, self._p(uri) if self.is_local else None)) is not None:
                self._rm(uri)
                raise full from None
            raise
        if not self.is_local:
            dest = self._cache_path(uri, manifest, self.cache_dir)
            (folder / ".complete").write_text(uri + "\n")
            if dest.exists():
                shutil.rmtree(folder, ignore_errors=True)
            else:
                os.replace(folder, dest)
        faults.hold_point(uri, "after_write")

    @staticmethod
    def _cache_path(uri: str, manifest: dict[str, Any], cache: Path) -> Path:
        key = hashlib.sha256(f"{uri}\n{manifest.get('token', '')}".encode()).hexdigest()[:20]
        return cache / key

    def _upload_folder(self, local: Path, dest: str, hold_uri: str | None = None) -> list[str]:
        """Upload every file under `local` to the same relative path under `dest`; return those paths."""
        def upload(rel: str) -> None:
            target = self.join(dest, rel)
            self._io(f"upload {target}", self.fs.put_file, str(local / rel), self._p(target))

        files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
        if not files:
            return []
        upload(files[0])
        if hold_uri is not None:
            faults.hold_point(hold_uri, "mid_write")  # one file uploaded, the rest not
        self._each(upload, files[1:])
        return files

    def upload_checkpoint(
        self, local_dir: str | Path, uri: str, manifest_extra: dict[str, Any] | None = None,
        *, overwrite: bool = False,
    ) -> dict[str, Any]:
        """Copy an existing local checkpoint folder to `uri` atomically; return the manifest."""
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise StoreError(f"checkpoint folder not found: {local_dir}")
        with self.checkpoint_writer(uri, manifest_extra, overwrite=overwrite) as folder:
            shutil.copytree(local_dir, folder, dirs_exist_ok=True)
        return self.manifest(uri)

    def download_checkpoint(self, uri: str, local_cache: str | Path | None = None) -> Path:
        """A local folder holding the complete checkpoint at `uri`.

        Local store: the folder itself. Remote: downloaded once into the cache, keyed by URI and the
        manifest's write token, so repeated loads are free and a rewritten checkpoint is fetched anew.
        """
        manifest = self.manifest(uri)
        if manifest.get("kind") != "checkpoint":
            raise StoreError(f"{uri} is not a checkpoint")
        if self.is_local:
            folder = Path(self._p(uri))
            for rel in manifest["files"]:  # sizes only: a reload must stay cheap
                integrity.check_file(self.join(uri, rel), folder / rel, manifest, rel, checksum=False)
            return folder
        cache = Path(local_cache) if local_cache else self.cache_dir
        dest = self._cache_path(uri, manifest, cache)
        if (dest / ".complete").exists():
            return dest
        partial = cache / f"{TMP_PREFIX}{dest.name}-{uuid.uuid4().hex[:8]}"
        partial.mkdir(parents=True)
        try:
            for rel in manifest["files"]:
                target = partial / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                src = self.join(uri, rel)
                self._io(f"download {src}", self.fs.get_file, self._p(src), str(target))
                integrity.check_file(src, target, manifest, rel, checksum=True)
            (partial / ".complete").write_text(uri + "\n")
            if dest.exists():  # another process finished first
                shutil.rmtree(partial, ignore_errors=True)
            else:
                os.replace(partial, dest)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        return dest
