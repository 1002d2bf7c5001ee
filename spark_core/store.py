"""The object store: run layout, atomic Parquet and checkpoint writes, manifests, LATEST, run lock.

The store is the source of truth between stages (DESIGN.md). It works on any fsspec URI: a local folder
(the default, nothing to start) or ``s3://bucket/prefix`` via s3fs. S3 credentials and endpoint come only
from the standard ``AWS_*`` environment variables; they are never written anywhere and are redacted
from every error this module raises.

Layout under the root::

    runs/{run_id}/run.json                     resolved config, created_at, code version, config hash
    runs/{run_id}/LATEST                       last completed iteration (an int as text)
    runs/{run_id}/_LOCK.json                   lease of the process currently running the run
    runs/{run_id}/iter=NNNN/{stage}/part-00000.parquet + _SUCCESS.json
    runs/{run_id}/iter=NNNN/train/phase={policy|reward}/...
    runs/{run_id}/iter=NNNN/checkpoint/        save_pretrained files + trainer_state/ + _SUCCESS.json
    runs/{run_id}/iter=NNNN/eval/benchmark={name}/...

Visibility rule: a stage exists only once its ``_SUCCESS.json`` manifest does. Parts are first written
under ``{stage}/_tmp-<uuid>/``, moved into place, and the manifest is written last; readers read exactly
the files the manifest lists, so nobody sees half a table or half a checkpoint. Names starting with ``_``
are also skipped by pyarrow/DuckDB hive readers, so ``runs/{id}/iter=*/samples/*.parquet`` can be read
as one dataset with an ``iter`` column.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

SUCCESS = "_SUCCESS.json"
TMP_PREFIX = "_tmp-"
LOCK_NAME = "_LOCK.json"
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_ITER_RE = re.compile(r"^iter=(\d{4,})$")
_STAGE_PART_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.=-]*$")
_ROWS_PER_PART = 500_000

T = TypeVar("T")


class StoreError(RuntimeError):
    """A storage problem, with any credential redacted from the message."""


class RunLockedError(StoreError):
    """Another process holds the run's lease."""


# ------------------------------------------------------------------------------------------ helpers


def redact(text: str) -> str:
    """Remove credential values (from the AWS_* environment) and URL user-info from a message."""
    for var in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN"):
        value = os.environ.get(var)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    # scheme://user:password@host -> scheme://***@host
    return re.sub(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@]+@", r"\1***@", text)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def iter_name(iteration: int) -> str:
    return f"iter={int(iteration):04d}"


def train_stage(phase: str) -> str:
    """Stage name of a training phase's metrics table (`train/phase=policy`)."""
    return f"train/phase={phase}"


def eval_stage(benchmark: str) -> str:
    """Stage name of one benchmark's evaluation table (`eval/benchmark=arithmetic`)."""
    return f"eval/benchmark={benchmark}"


def validate_run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not _RUN_ID_RE.match(run_id):
        raise StoreError(
            f"invalid run id {run_id!r}: use letters, digits, '.', '_' or '-' (at most 128, no '/')"
        )
    return run_id


def code_version() -> str:
    """Package version plus the git commit of the checkout, when there is one."""
    from . import __version__

    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__


_NOT_TRANSIENT = (
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    ValueError,
    TypeError,
    KeyError,
    pa.ArrowInvalid,
)


def _pid_alive(pid: Any) -> bool:
    """Whether a process of this machine is still running (a killed holder frees its lease at once)."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError, OverflowError):
        return True  # someone else's process, or no pid recorded: assume alive, wait for expiry
    return True


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _is_transient(err: BaseException) -> bool:
    """Errors worth retrying on a remote store (connection drops, 5xx, throttling, server restart)."""
    return not isinstance(err, _NOT_TRANSIENT)


# -------------------------------------------------------------------------------------------- store


class Store:
    """A run store on an fsspec URI (local folder or s3://bucket/prefix).

    Public methods take and return URIs (strings) so they can cross process and Prefect boundaries.
    Operations on a remote store retry transient errors with exponential backoff.
    """

    def __init__(
        self,
        uri: str,
        *,
        retries: int | None = None,
        backoff_s: float = 0.5,
        max_backoff_s: float = 15.0,
        cache_dir: str | Path | None = None,
    ) -> None:
        if not uri or not isinstance(uri, str):
            raise StoreError("store URI is empty")
        options: dict[str, Any] = {}
        if uri.startswith("s3://") or uri.startswith("s3a://"):
            uri = "s3://" + uri.split("://", 1)[1]
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            if endpoint:
                options["endpoint_url"] = endpoint
            # Several processes write the same prefix: a cached listing would hide their files.
            options["use_listings_cache"] = False
            options["skip_instance_cache"] = True
        try:
            fs, root = fsspec.core.url_to_fs(uri, **options)
        except (ImportError, ValueError) as err:
            raise StoreError(redact(f"cannot open store {uri}: {err}")) from None
        self.fs = fs
        self.is_local = isinstance(fs, LocalFileSystem)
        self.root = root.rstrip("/") if not self.is_local else str(Path(root).resolve())
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        self._scheme = "" if self.is_local else f"{protocol}://"
        self.uri = self._u(self.root)
        self.retries = int(os.environ.get("SPARK_STORE_RETRIES", "6")) if retries is None else retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.cache_dir = Path(
            cache_dir
            or os.environ.get("SPARK_CACHE_DIR")
            or Path.home() / ".cache" / "spark-flow" / "checkpoints"
        )

    def __repr__(self) -> str:
        return f"Store({self.uri!r})"

    # ---------------------------------------------------------------------------------- paths

    def _p(self, uri: str) -> str:
        """URI -> path inside the filesystem (the filesystem's own normal form)."""
        return self.fs._strip_protocol(uri).rstrip("/") or "/"

    def _u(self, path: str) -> str:
        """Path inside the filesystem -> URI."""
        return path if self.is_local else self._scheme + path.lstrip("/")

    @staticmethod
    def join(uri: str, *parts: str) -> str:
        return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])

    def run_uri(self, run_id: str) -> str:
        return self.join(self.uri, "runs", validate_run_id(run_id))

    def iter_uri(self, run_id: str, iteration: int) -> str:
        if int(iteration) < 0:
            raise StoreError(f"iteration must be >= 0, got {iteration}")
        return self.join(self.run_uri(run_id), iter_name(iteration))

    def stage_uri(self, run_id: str, iteration: int, stage: str) -> str:
        """`runs/{run_id}/iter=NNNN/{stage}`; stage may be nested (`train/phase=policy`)."""
        parts = stage.strip("/").split("/")
        if not parts or any(not _STAGE_PART_RE.match(p) or p.startswith(TMP_PREFIX) for p in parts):
            raise StoreError(f"invalid stage name {stage!r}")
        return self.join(self.iter_uri(run_id, iteration), *parts)

    # ------------------------------------------------------------------------- retrying I/O

    def _io(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run one filesystem call; retry transient errors on remote stores; redact failures.

        FileNotFoundError passes through unchanged: callers use it to mean "absent".
        """
        attempts = 1 if self.is_local else self.retries + 1
        delay = self.backoff_s
        for attempt in range(1, attempts + 1):
            try:
                return fn(*args, **kwargs)
            except FileNotFoundError:
                raise
            except Exception as err:  # noqa: BLE001 - classified below, re-raised redacted
                if attempt < attempts and _is_transient(err):
                    time.sleep(delay)
                    delay = min(delay * 2, self.max_backoff_s)
                    continue
                tries = f" after {attempt} attempts" if attempt > 1 else ""
                raise StoreError(redact(f"{what} failed{tries}: {type(err).__name__}: {err}")) from None
        raise AssertionError("unreachable")

    def _exists(self, uri: str) -> bool:
        return self._io(f"exists {uri}", self.fs.exists, self._p(uri))

    def _read_bytes(self, uri: str) -> bytes | None:
        try:
            return self._io(f"read {uri}", self.fs.cat_file, self._p(uri))
        except FileNotFoundError:
            return None

    def _write_bytes(self, uri: str, data: bytes) -> None:
        """Write a whole object. Local: temp file + rename (atomic); S3: a single PUT (atomic)."""
        path = self._p(uri)
        if self.is_local:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            tmp = f"{path}.{TMP_PREFIX}{uuid.uuid4().hex}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            self._io(f"write {uri}", self.fs.pipe_file, path, data)

    def _read_json(self, uri: str) -> dict[str, Any] | None:
        data = self._read_bytes(uri)
        if data is None:
            return None
        try:
            return json.loads(data)
        except json.JSONDecodeError as err:
            raise StoreError(f"{uri} is not valid JSON: {err}") from None

    def _write_json(self, uri: str, obj: Any) -> None:
        self._write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def _ls(self, uri: str) -> list[str]:
        """Names (basenames) directly under a folder; [] if it does not exist."""
        try:
            entries = self._io(f"list {uri}", self.fs.ls, self._p(uri), detail=False)
        except FileNotFoundError:
            return []
        base = self._p(uri).rstrip("/")
        return sorted({e.rstrip("/").rsplit("/", 1)[-1] for e in entries if e.rstrip("/") != base})

    def _find(self, uri: str) -> list[str]:
        """Every file path under a folder (filesystem paths, not URIs)."""
        try:
            return sorted(self._io(f"list {uri}", self.fs.find, self._p(uri)))
        except FileNotFoundError:
            return []

    def _rm(self, uri: str) -> None:
        try:
            self._io(f"delete {uri}", self.fs.rm, self._p(uri), recursive=True)
        except FileNotFoundError:
            pass

    def _move_into_place(self, tmp: str, final: str) -> list[str]:
        """Move every file under `tmp` to the same relative path under `final`; return those paths."""
        tmp_p, final_p = self._p(tmp).rstrip("/"), self._p(final).rstrip("/")
        moved = []
        for src in self._find(tmp):
            rel = src[len(tmp_p) + 1:]
            dst = f"{final_p}/{rel}"
            if self.is_local:
                Path(dst).parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dst)
            else:
                self._io(f"move {self._u(src)}", self.fs.mv, src, dst)
            moved.append(rel)
        self._rm(tmp)
        return sorted(moved)

    # ----------------------------------------------------------------------------- manifests

    def is_done(self, uri: str) -> bool:
        """True once the stage/checkpoint at `uri` is complete (its manifest exists)."""
        return self._exists(self.join(uri, SUCCESS))

    def manifest(self, uri: str) -> dict[str, Any]:
        m = self._read_json(self.join(uri, SUCCESS))
        if m is None:
            raise StoreError(f"{uri} is not complete (no {SUCCESS})")
        return m

    def manifest_or_none(self, uri: str) -> dict[str, Any] | None:
        return self._read_json(self.join(uri, SUCCESS))

    def delete(self, uri: str) -> None:
        """Remove a stage: the manifest first, so readers stop seeing it before its parts go."""
        self._rm(self.join(uri, SUCCESS))
        self._rm(uri)

    def _prepare(self, uri: str, overwrite: bool) -> None:
        if self.is_done(uri):
            if not overwrite:
                raise StoreError(f"{uri} is already complete; refusing to write it again")
            self.delete(uri)
        elif self._exists(uri):
            # Leftovers of a crashed writer (parts moved, no manifest): invisible, but would be stale.
            self._rm(uri)

    def _finish(self, uri: str, files: list[str], started: float, extra: dict[str, Any] | None,
                **facts: Any) -> dict[str, Any]:
        manifest: dict[str, Any] = dict(extra or {})
        manifest.update(facts)
        manifest.update(
            {
                "uri": uri,
                "files": files,
                "written_at": now_iso(),
                "write_seconds": round(time.time() - started, 3),
                "token": uuid.uuid4().hex,  # identifies this exact write (checkpoint cache key)
            }
        )
        self._write_json(self.join(uri, SUCCESS), manifest)  # LAST: makes the stage visible
        return manifest

    # -------------------------------------------------------------------------------- tables

    def write_table(
        self,
        uri: str,
        table: pa.Table,
        manifest_extra: dict[str, Any] | None = None,
        *,
        rows_per_part: int = _ROWS_PER_PART,
        overwrite: bool = False,
    ) -> dict[str, Any]:
        """Write `table` as Parquet parts under `uri`, atomically; return the manifest.

        The manifest records rows, columns, files and timing plus `manifest_extra` (input URIs, config
        hash, metrics, stage seconds...). A complete stage is never rewritten unless `overwrite`.
        """
        started = time.time()
        self._prepare(uri, overwrite)
        tmp = self.join(uri, f"{TMP_PREFIX}{uuid.uuid4().hex}")
        n_parts = max(1, -(-table.num_rows // rows_per_part))
        try:
            for i in range(n_parts):
                part = table.slice(i * rows_per_part, rows_per_part)
                buf = io.BytesIO()
                pq.write_table(part, buf, compression="zstd")
                self._write_bytes(self.join(tmp, f"part-{i:05d}.parquet"), buf.getvalue())
            files = self._move_into_place(tmp, uri)
        except BaseException:
            self._rm(tmp)  # best effort; `cleanup_tmp` removes what a killed process leaves
            raise
        return self._finish(
            uri,
            files,
            started,
            manifest_extra,
            rows=table.num_rows,
            columns=table.schema.names,
            kind="table",
        )

    def read_table(self, uri: str, columns: list[str] | None = None) -> pa.Table:
        """Read a complete table (exactly the parts its manifest lists)."""
        manifest = self.manifest(uri)
        if manifest.get("kind") != "table":
            raise StoreError(f"{uri} is a {manifest.get('kind', 'non-table')}, not a table")
        tables = []
        for name in manifest["files"]:
            data = self._read_bytes(self.join(uri, name))
            if data is None:
                raise StoreError(f"{uri}: part {name} listed in the manifest is missing")
            tables.append(pq.read_table(pa.BufferReader(data), columns=columns))
        return pa.concat_tables(tables) if len(tables) > 1 else tables[0]

    def read_stage_across_iterations(
        self, run_id: str, stage: str, columns: list[str] | None = None
    ) -> pa.Table:
        """One stage of every iteration that completed it, with an `iteration` column added."""
        tables = []
        for it in self.list_iterations(run_id):
            uri = self.stage_uri(run_id, it, stage)
            if self.is_done(uri):
                t = self.read_table(uri, columns=columns)
                tables.append(t.append_column("iteration", pa.array([it] * t.num_rows, pa.int32())))
        if not tables:
            raise StoreError(f"run {run_id}: no iteration has a complete {stage!r} stage")
        return pa.concat_tables(tables, promote_options="default")

    # --------------------------------------------------------------------------- checkpoints

    @contextmanager
    def checkpoint_writer(
        self, uri: str, manifest_extra: dict[str, Any] | None = None, *, overwrite: bool = False
    ) -> Iterator[Path]:
        """Yield a local folder to save a checkpoint into; on success it becomes `uri`, atomically.

        Local store: the folder is the temporary key itself (no copy). Remote store: a temporary folder
        in the download cache, uploaded file by file when the block ends, then kept as the cached copy.
        On error nothing becomes visible.
        """
        started = time.time()
        self._prepare(uri, overwrite)
        tmp = self.join(uri, f"{TMP_PREFIX}{uuid.uuid4().hex}")
        if self.is_local:
            folder = Path(self._p(tmp))
            folder.mkdir(parents=True)
            try:
                yield folder
                total = _folder_bytes(folder)
                files = self._move_into_place(tmp, uri)
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)
                raise
        else:
            # Stage the folder inside the download cache: once uploaded it becomes this checkpoint's
            # cached copy, so the process that wrote it never downloads it again.
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            folder = self.cache_dir / f"{TMP_PREFIX}{uuid.uuid4().hex}"
            folder.mkdir()
            try:
                yield folder
                total = _folder_bytes(folder)
                self._upload_folder(folder, tmp)
                files = self._move_into_place(tmp, uri)
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)
                self._rm(tmp)
                raise
        manifest = self._finish(uri, files, started, manifest_extra, kind="checkpoint", bytes=total)
        if not self.is_local:
            dest = self._cache_path(uri, manifest, self.cache_dir)
            (folder / ".complete").write_text(uri + "\n")
            if dest.exists():
                shutil.rmtree(folder, ignore_errors=True)
            else:
                os.replace(folder, dest)

    @staticmethod
    def _cache_path(uri: str, manifest: dict[str, Any], cache: Path) -> Path:
        key = hashlib.sha256(f"{uri}\n{manifest.get('token', '')}".encode()).hexdigest()[:20]
        return cache / key

    def _upload_folder(self, local: Path, dest: str) -> None:
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            rel = path.relative_to(local).as_posix()
            target = self.join(dest, rel)
            self._io(f"upload {target}", self.fs.put_file, str(path), self._p(target))

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
            return Path(self._p(uri))
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
            (partial / ".complete").write_text(uri + "\n")
            if dest.exists():  # another process finished first
                shutil.rmtree(partial, ignore_errors=True)
            else:
                os.replace(partial, dest)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        return dest

    # ------------------------------------------------------------------------------ small files

    def write_bytes(self, uri: str, data: bytes) -> None:
        """Write one small object atomically (reports, plots)."""
        self._write_bytes(uri, data)

    def exists(self, uri: str) -> bool:
        """Whether anything (an object or a folder/prefix) is at `uri`."""
        return self._exists(uri)

    def read_bytes(self, uri: str) -> bytes:
        data = self._read_bytes(uri)
        if data is None:
            raise StoreError(f"{uri} does not exist")
        return data

    # ------------------------------------------------------------------------------------ runs

    def write_run(self, run_id: str, config: Any, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write run.json (config without credentials, created_at, code version, config hash)."""
        if hasattr(config, "model_dump"):
            cfg_dict = config.model_dump(mode="json")
            cfg_hash = config.config_hash() if hasattr(config, "config_hash") else None
        else:
            cfg_dict = dict(config)
            cfg_hash = None
        # A store URI could carry user-info; never persist it.
        if isinstance(cfg_dict.get("store"), dict) and "uri" in cfg_dict["store"]:
            cfg_dict["store"]["uri"] = redact(str(cfg_dict["store"]["uri"]))
        record = {
            "run_id": validate_run_id(run_id),
            "created_at": now_iso(),
            "code_version": code_version(),
            "config_hash": cfg_hash
            or hashlib.sha256(json.dumps(cfg_dict, sort_keys=True).encode()).hexdigest()[:16],
            "config": cfg_dict,
            **(extra or {}),
        }
        self._write_json(self.join(self.run_uri(run_id), "run.json"), record)
        return record

    def read_run(self, run_id: str) -> dict[str, Any] | None:
        return self._read_json(self.join(self.run_uri(run_id), "run.json"))

    def latest(self, run_id: str) -> int | None:
        """The last completed iteration, or None before iteration 0 completes."""
        data = self._read_bytes(self.join(self.run_uri(run_id), "LATEST"))
        if data is None:
            return None
        text = data.decode().strip()
        if not text.isdigit():
            raise StoreError(f"run {run_id}: LATEST holds {text!r}, not an iteration number")
        return int(text)

    def set_latest(self, run_id: str, iteration: int) -> None:
        self._write_bytes(self.join(self.run_uri(run_id), "LATEST"), f"{int(iteration)}\n".encode())

    def list_runs(self) -> list[str]:
        runs = self.join(self.uri, "runs")
        return [r for r in self._ls(runs) if _RUN_ID_RE.match(r) and self._exists(self.join(runs, r, "run.json"))]

    def list_iterations(self, run_id: str) -> list[int]:
        names = self._ls(self.run_uri(run_id))
        return sorted(int(m.group(1)) for n in names if (m := _ITER_RE.match(n)))

    def list_stages(self, run_id: str, iteration: int) -> dict[str, int | None]:
        """Complete stages of an iteration -> row count (None for checkpoints)."""
        base = self._p(self.iter_uri(run_id, iteration)).rstrip("/")
        out: dict[str, int | None] = {}
        for path in self._find(self.iter_uri(run_id, iteration)):
            rel = path[len(base) + 1:]
            if not rel.endswith("/" + SUCCESS) or f"/{TMP_PREFIX}" in "/" + rel:
                continue
            stage = rel[: -len(SUCCESS) - 1]
            manifest = self._read_json(self._u(path)) or {}
            out[stage] = manifest.get("rows")
        return dict(sorted(out.items()))

    def cleanup_tmp(self, run_id: str | None = None) -> int:
        """Remove `_tmp-*` leftovers of crashed writers (call while holding the run lock)."""
        base_uri = self.run_uri(run_id) if run_id else self.join(self.uri, "runs")
        base = self._p(base_uri).rstrip("/")
        tmp_dirs: set[str] = set()
        for path in self._find(base_uri):
            parts = path[len(base) + 1:].split("/")
            for i, part in enumerate(parts[:-1]):
                if part.startswith(TMP_PREFIX):
                    tmp_dirs.add("/".join([base, *parts[: i + 1]]))
                    break
        for d in sorted(tmp_dirs):
            self._rm(self._u(d))
        return len(tmp_dirs)

    # ------------------------------------------------------------------------------------ lock

    def run_lock(self, run_id: str, *, ttl_s: float = 600.0, wait_s: float = 0.0,
                 poll_s: float = 2.0) -> "RunLock":
        """A lease on the run so two triggers never run the same iteration at once."""
        return RunLock(self, run_id, ttl_s=ttl_s, wait_s=wait_s, poll_s=poll_s)


class RunLock:
    """A lease file `runs/{run_id}/_LOCK.json`: owner token + expiry, renewed by a heartbeat thread.

    Acquire: if there is no lease, or it expired (its holder died: the heartbeat stopped; a holder on
    this machine whose process has exited counts as expired at once), write ours
    and read it back to confirm. On a local store the create is atomic (O_EXCL); on S3 there is no
    conditional create, so the writer waits `settle_s` before reading back, which makes two near-
    simultaneous writers both see the later write and only its author proceed. If the lease is lost
    (expired while we hung, taken over), `check()` raises so the holder stops before publishing.
    """

    def __init__(self, store: Store, run_id: str, *, ttl_s: float = 600.0, wait_s: float = 0.0,
                 poll_s: float = 2.0, settle_s: float | None = None) -> None:
        if ttl_s <= 0:
            raise StoreError("lock ttl must be > 0")
        self.store = store
        self.run_id = validate_run_id(run_id)
        self.uri = store.join(store.run_uri(run_id), LOCK_NAME)
        self.ttl_s = ttl_s
        self.wait_s = wait_s
        self.poll_s = poll_s
        self.settle_s = (0.0 if store.is_local else 1.0) if settle_s is None else settle_s
        self.token = uuid.uuid4().hex
        self.held = False
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lease records
    def _record(self) -> dict[str, Any]:
        now = time.time()
        return {
            "owner": self.token,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "acquired_at": now,
            "expires_at": now + self.ttl_s,
        }

    def read(self) -> dict[str, Any] | None:
        """The current lease, or None when there is none."""
        try:
            return self.store._read_json(self.uri)
        except StoreError:
            # A damaged lease (written by hand, truncated disk): treat it as expired so it can be taken.
            return {"owner": None, "expires_at": 0, "corrupt": True}

    @staticmethod
    def _expired(rec: dict[str, Any] | None) -> bool:
        """No lease, a lease past its expiry, or one whose holder on this machine has exited."""
        if rec is None or float(rec.get("expires_at", 0)) <= time.time():
            return True
        return rec.get("host") == socket.gethostname() and not _pid_alive(rec.get("pid"))

    def _create_local(self, stale: dict[str, Any] | None) -> bool:
        path = Path(self.store._p(self.uri))
        path.parent.mkdir(parents=True, exist_ok=True)
        if stale is not None and path.exists():
            # Move the stale lease aside (atomic); then check it was the one we judged stale.
            aside = path.with_name(f"{LOCK_NAME}.stale-{uuid.uuid4().hex}")
            try:
                os.replace(path, aside)
            except FileNotFoundError:
                return False
            try:
                moved = json.loads(aside.read_text())
            except (OSError, json.JSONDecodeError):
                moved = None
            if moved is not None and moved.get("owner") != stale.get("owner"):
                # We moved someone's fresh lease: put it back unless yet another one appeared.
                try:
                    os.link(aside, path)
                except FileExistsError:
                    pass
                aside.unlink(missing_ok=True)
                return False
            aside.unlink(missing_ok=True)
        # Write the whole record aside, then hard-link it into place: the link is atomic and fails
        # when a lease exists, so the lease file is never seen half-written.
        draft = path.with_name(f"{LOCK_NAME}.{TMP_PREFIX}{uuid.uuid4().hex}")
        draft.write_text(json.dumps(self._record()))
        try:
            os.link(draft, path)
        except FileExistsError:
            return False
        finally:
            draft.unlink(missing_ok=True)
        return True

    def _try_take(self, current: dict[str, Any] | None) -> bool:
        if self.store.is_local:
            if not self._create_local(current):
                return False
        else:
            self.store._write_json(self.uri, self._record())
            time.sleep(self.settle_s)
        confirmed = self.read()
        return confirmed is not None and confirmed.get("owner") == self.token

    def _describe(self, rec: dict[str, Any]) -> str:
        left = max(0.0, float(rec.get("expires_at", 0)) - time.time())
        since = datetime.fromtimestamp(float(rec.get("acquired_at", 0)), timezone.utc).isoformat(
            timespec="seconds"
        )
        return f"host {rec.get('host')} pid {rec.get('pid')} since {since} (lease expires in {left:.0f} s)"

    # -- public
    def acquire(self) -> "RunLock":
        deadline = time.time() + self.wait_s
        while True:
            current = self.read()
            if self._expired(current) or (current or {}).get("owner") == self.token:
                if self._try_take(current):
                    self.held, self.lost = True, False
                    self._start_heartbeat()
                    return self
                current = self.read()
            if time.time() >= deadline:
                who = self._describe(current) if current else "another process"
                raise RunLockedError(
                    f"run {self.run_id} is being run by {who}; waited {self.wait_s:g} s. "
                    f"Retry later, or delete {redact(self.uri)} if that process is dead."
                )
            time.sleep(max(0.01, min(self.poll_s, deadline - time.time())))

    def renew(self) -> bool:
        """Extend the lease; False (and `lost`) when it is no longer ours."""
        current = self.read()
        if current is None or current.get("owner") != self.token:
            self.lost = True
            return False
        record = dict(current, expires_at=time.time() + self.ttl_s)
        self.store._write_json(self.uri, record)
        return True

    def check(self) -> None:
        """Raise if the lease was lost, so the holder stops before publishing anything."""
        if not self.held or self.lost:
            raise RunLockedError(f"run {self.run_id}: this process no longer holds the run lock")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self.held:
            current = self.read()
            if current is not None and current.get("owner") == self.token:
                self.store._rm(self.uri)
        self.held = False

    def _start_heartbeat(self) -> None:
        self._stop.clear()

        def beat() -> None:
            while not self._stop.wait(self.ttl_s / 3):
                try:
                    if not self.renew():
                        return
                except StoreError:
                    continue  # transient; the next beat retries before the lease runs out

        self._thread = threading.Thread(target=beat, name=f"spark-lock-{self.run_id}", daemon=True)
        self._thread.start()

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
