"""The object store: atomic Parquet and checkpoint writes, manifests, LATEST, and the run lease.

The store is the source of truth between stages. It works on any fsspec URI: a local folder (the
default, nothing to start) or ``s3://bucket/prefix`` via s3fs. S3 credentials and endpoint come only
from the standard ``AWS_*`` environment variables; they are never written anywhere and are redacted
from every error this module raises. Where each output lives is ``spark_core.layout``'s business; the
run lease is ``spark_core.lock``.

Visibility rule: a stage exists only once its ``_SUCCESS.json`` manifest does. Parts are first written
under ``{stage}/_tmp-<uuid>/`` (a remote checkpoint's go straight to their keys: ``checkpoint_io``),
moved into place, and the manifest is written last; readers read exactly the files it lists.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, TypeVar

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from . import faults, integrity
from .layout import (
    ITER_RE, LATEST, LOCK_NAME, RUN_ID_RE, RUN_RECORD, RUNS, STEP, STEP_RE, SUCCESS, TMP_PREFIX, hive_partitions,
    iter_name, stage_parts,
)
from .checkpoint_io import CheckpointIO
from .lock import RunLock
from .store_errors import RunLockedError, StoreError, redact

__all__ = ["RunLock", "RunLockedError", "SUCCESS", "Store", "StoreError", "redact", "validate_run_id"]

_ROWS_PER_PART = 500_000

T = TypeVar("T")


# ------------------------------------------------------------------------------------------ helpers


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def validate_run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not RUN_ID_RE.match(run_id):
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




def _is_transient(err: BaseException) -> bool:
    """Errors worth retrying on a remote store (connection drops, 5xx, throttling, server restart)."""
    return not isinstance(err, _NOT_TRANSIENT)


def _drop_partition_columns(uri: str, table: pa.Table) -> tuple[pa.Table, dict[str, Any]]:
    """Drop the columns the folder names supply (`phase` under `phase=policy/`, see layout.hive_partitions);
    return what `read_table` needs to add them back. A value that disagrees with its folder is an error."""
    folders = hive_partitions(uri)
    dropped: dict[str, Any] = {}
    for index, field in enumerate(table.schema):
        if field.name not in folders:
            continue
        value = folders[field.name]
        found = {str(v) for v in table.column(field.name).to_pylist()}
        if found - {value}:
            raise StoreError(
                f"{uri}: column {field.name!r} holds {sorted(found)[:5]} but the folder says {field.name}={value}"
            )
        dropped[field.name] = {"index": index, "value": value, "type": str(field.type)}
    return table.drop_columns(list(dropped)), dropped


# -------------------------------------------------------------------------------------------- store


class Store(CheckpointIO):
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
        return self.join(self.uri, RUNS, validate_run_id(run_id))

    def iter_uri(self, run_id: str, iteration: int) -> str:
        if int(iteration) < 0:
            raise StoreError(f"iteration must be >= 0, got {iteration}")
        return self.join(self.run_uri(run_id), iter_name(iteration))

    def stage_uri(self, run_id: str, iteration: int, stage: str) -> str:
        """`runs/{run_id}/iter=NNNN/{stage}`; stage may be nested (`train/phase=policy`)."""
        parts = stage_parts(stage)
        if parts is None:
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
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)  # a full disk must not leave half a file behind
                raise
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
        moved = [src[len(tmp_p) + 1:] for src in self._find(tmp)]

        def move(rel: str) -> None:  # local: a rename; S3: a server-side copy + delete, several at once
            src, dst = f"{tmp_p}/{rel}", f"{final_p}/{rel}"
            if self.is_local:
                Path(dst).parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dst)
            else:
                self._io(f"move {self._u(src)}", self.fs.mv, src, dst)

        self._each(move, moved)
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
        columns = table.schema.names
        table, partition_columns = _drop_partition_columns(uri, table)
        faults.hold_point(uri, "before_write")
        self._prepare(uri, overwrite)
        tmp = self.join(uri, f"{TMP_PREFIX}{uuid.uuid4().hex}")
        n_parts = max(1, -(-table.num_rows // rows_per_part))
        parts: dict[str, dict[str, Any]] = {}
        try:
            for i in range(n_parts):
                part = table.slice(i * rows_per_part, rows_per_part)
                buf = io.BytesIO()
                pq.write_table(part, buf, compression="zstd")
                name = f"part-{i:05d}.parquet"
                parts[name] = integrity.describe(buf.getvalue())
                self._write_bytes(self.join(tmp, name), buf.getvalue())
                if i == 0:
                    faults.hold_point(uri, "mid_write")
            files = self._move_into_place(tmp, uri)
            faults.hold_point(uri, "before_manifest")
            extra = dict(manifest_extra or {})
            if partition_columns:
                extra["partition_columns"] = partition_columns
            manifest = self._finish(
                uri,
                files,
                started,
                extra,
                rows=table.num_rows,
                columns=columns,
                kind="table",
                parts=parts,
            )
        except BaseException as err:
            self._rm(tmp)  # best effort; `cleanup_tmp` removes what a killed process leaves
            if (full := integrity.no_space_error(uri, err, self._p(uri) if self.is_local else None)) is not None:
                self._rm(uri)  # parts already moved in are invisible without a manifest; drop them too
                raise full from None
            raise
        faults.hold_point(uri, "after_write")
        return manifest

    def read_table(self, uri: str, columns: list[str] | None = None) -> pa.Table:
        """Read a complete table (exactly the parts its manifest lists), with its partition columns.

        A per-step stage of a multi-step iteration (`iter=0001/samples` holding `rl_step=01/`...)
        reads as one table of its committed steps, in step order, with an `rl_step` column."""
        if not self.is_done(uri) and (steps := self.step_partitions(uri)):
            own = None if columns is None else [c for c in columns if c != STEP]
            tables = [self.read_table(part, own) for _, part in steps]
            tables = [t.append_column(STEP, pa.array([k] * t.num_rows, pa.int32())) for (k, _), t in zip(steps, tables)]
            table = pa.concat_tables(tables, promote_options="default")
            return table if columns is None else table.select(columns)
        manifest = self.manifest(uri)
        if manifest.get("kind") != "table":
            raise StoreError(f"{uri} is a {manifest.get('kind', 'non-table')}, not a table")
        partition: dict[str, Any] = manifest.get("partition_columns") or {}
        stored = None if columns is None else [c for c in columns if c not in partition]
        tables = []
        for name in manifest["files"]:
            where = self.join(uri, name)
            data = self._read_bytes(where)
            if data is None:
                raise StoreError(f"{uri}: part {name} listed in the manifest is missing")
            integrity.check_bytes(where, data, manifest, name)
            try:
                tables.append(pq.read_table(pa.BufferReader(data), columns=stored))
            except (pa.ArrowException, OSError) as err:
                raise StoreError(f"{where}: not a readable Parquet part ({type(err).__name__}: {err})") from None
        table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
        for name, info in sorted(partition.items(), key=lambda kv: kv[1]["index"]):
            if columns is None or name in columns:
                values = pa.array([info["value"]] * table.num_rows, pa.string()).cast(pa.type_for_alias(info["type"]))
                table = table.add_column(min(info["index"], table.num_columns), name, values)
        if columns is not None:
            table = table.select(columns)
        return table

    def step_partitions(self, uri: str) -> list[tuple[int, str]]:
        """(step, uri) of every committed `rl_step=SS` partition directly below `uri`, in step order."""
        return [(int(m.group(1)), self.join(uri, n)) for n in self._ls(uri)
                if (m := STEP_RE.match(n)) and self.is_done(self.join(uri, n))]

    def read_stage_across_iterations(
        self, run_id: str, stage: str, columns: list[str] | None = None
    ) -> pa.Table:
        """One stage of every iteration that completed it, with an `iteration` column added."""
        tables = []
        for it in self.list_iterations(run_id):
            uri = self.stage_uri(run_id, it, stage)
            if self.is_done(uri) or self.step_partitions(uri):
                t = self.read_table(uri, columns=columns)
                tables.append(t.append_column("iteration", pa.array([it] * t.num_rows, pa.int32())))
        if not tables:
            raise StoreError(f"run {run_id}: no iteration has a complete {stage!r} stage")
        return pa.concat_tables(tables, promote_options="default")

    # ------------------------------------------------------------------------------ small files

    def write_bytes(self, uri: str, data: bytes) -> None:
        """Write one small object atomically (reports, plots); `remove_bytes` removes it (if there)."""
        self._write_bytes(uri, data)

    def remove_bytes(self, uri: str) -> None:
        self._rm(uri)

    def exists(self, uri: str) -> bool:
        """Whether anything (an object or a folder/prefix) is at `uri`."""
        return self._exists(uri)

    def read_bytes(self, uri: str) -> bytes:
        if (data := self._read_bytes(uri)) is None:
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
        self._write_json(self.join(self.run_uri(run_id), RUN_RECORD), record)
        return record

    def read_run(self, run_id: str) -> dict[str, Any] | None:
        return self._read_json(self.join(self.run_uri(run_id), RUN_RECORD))

    def latest(self, run_id: str) -> int | None:
        """The last completed iteration, or None before iteration 0 completes."""
        data = self._read_bytes(self.join(self.run_uri(run_id), LATEST))
        if data is None:
            return None
        text = data.decode().strip()
        if not text.isdigit():
            raise StoreError(f"run {run_id}: LATEST holds {text!r}, not an iteration number")
        return int(text)

    def set_latest(self, run_id: str, iteration: int) -> None:
        uri = self.join(self.run_uri(run_id), LATEST)
        faults.hold_point(uri, "before_write")  # every stage of the iteration committed, LATEST not
        self._write_bytes(uri, f"{int(iteration)}\n".encode())
        faults.hold_point(uri, "after_write")

    def list_runs(self) -> list[str]:
        runs = self.join(self.uri, RUNS)
        return [r for r in self._ls(runs) if RUN_ID_RE.match(r) and self._exists(self.join(runs, r, RUN_RECORD))]

    def stores_nearby(self) -> list[str]:
        """Store URIs next to this one that hold runs: the parent when this URI ends in `runs` (a store URI
        is the prefix ABOVE runs/), and prefixes one or two levels below. For "no runs here" hints."""
        found = []
        if self.root.rstrip("/").endswith("/" + RUNS):
            found.append(self.root.rstrip("/")[: -len(RUNS) - 1])
        for depth in ("*", "*/*"):
            pattern = f"{self.root.rstrip('/')}/{depth}/{RUNS}/*/{RUN_RECORD}"
            try:
                hits = self._io(f"list {self.uri}", self.fs.glob, pattern)
            except FileNotFoundError:
                hits = []
            found += [h.rsplit(f"/{RUNS}/", 1)[0] for h in hits if f"/{TMP_PREFIX}" not in h]
        stores = []
        for path in found:
            uri = self._u(path)
            if uri != self.uri and uri not in stores and Store(uri).list_runs():
                stores.append(uri)
        return stores

    def remove_run(self, run_id: str) -> int:
        """Delete a whole run (everything under `runs/{id}/`); returns the objects removed.

        Refuses (RunLockedError naming the holder) while another process holds the run's lease: the run
        lease is taken for the removal, run.json goes first (the run stops being listed), the lease last.
        """
        run = self.run_uri(run_id)
        if self.read_run(run_id) is None and not self._find(run):
            raise StoreError(f"no run {run_id!r} in {self.uri}")
        removed = len(self._find(run))
        with self.run_lock(run_id, ttl_s=120):
            self._rm(self.join(run, RUN_RECORD))
            for name in self._ls(run):
                if name != LOCK_NAME:
                    self._rm(self.join(run, name))
        self._rm(run)
        return removed

    def list_iterations(self, run_id: str) -> list[int]:
        names = self._ls(self.run_uri(run_id))
        return sorted(int(m.group(1)) for n in names if (m := ITER_RE.match(n)))

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

    def cleanup_tmp(self, run_id: str | None = None, iteration: int | None = None) -> int:
        """Remove `_tmp-*` leftovers of crashed or failed writers (call while holding the run lock), in
        the whole store, one run, or one iteration of a run."""
        base_uri = (self.iter_uri(run_id, iteration) if run_id and iteration is not None
                    else self.run_uri(run_id) if run_id else self.join(self.uri, RUNS))
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

    def run_lock(self, run_id: str, *, ttl_s: float = 600.0, wait_s: float = 0.0, poll_s: float = 2.0) -> "RunLock":
        """A lease on the run so two triggers never run the same iteration at once."""
        return RunLock(self, run_id, ttl_s=ttl_s, wait_s=wait_s, poll_s=poll_s)
