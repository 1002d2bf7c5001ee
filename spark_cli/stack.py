"""`spark stack up|down|status`: the local S3 + Prefect server + worker stack (see infra/local/README.md).

    spark stack up                      # all three, state in ./.spark-stack
    spark stack up --only s3            # just the S3 server (repeat --only for more)
    . .spark-stack/env.sh               # PREFECT_API_URL and the AWS_* variables for clients
    spark stack status
    spark stack down

The S3 secret key is written only to `.spark-stack/env.sh` (mode 0600); nothing here prints it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from infra.local.stack import COMPONENTS, DEFAULT_STATE_DIR, Stack, StackError, StackSettings

stack_app = typer.Typer(
    help="Local stack: SeaweedFS S3 server, Prefect server and a process worker, on loopback.",
    no_args_is_help=True,
)

_SECRET_VARS = ("AWS_SECRET_ACCESS_KEY",)

StateDir = typer.Option(DEFAULT_STATE_DIR, "--state-dir", help="Pid files, logs, data and credentials.")
Only = typer.Option(None, "--only", help=f"Component(s) to act on: {', '.join(COMPONENTS)} (repeatable).")


def _fail(err: Exception) -> None:
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(1)


def _components(only: Optional[list[str]]) -> list[str]:
    names = only or list(COMPONENTS)
    bad = [n for n in names if n not in COMPONENTS]
    if bad:
        _fail(StackError(f"unknown component(s) {bad}; choose from {', '.join(COMPONENTS)}"))
    return names


def _open(state_dir: Path, changes: dict[str, object]) -> Stack:
    """The stack in `state_dir`, with explicitly given options applied to its saved settings."""
    try:
        stack = Stack(state_dir)
        changes = {k: v for k, v in changes.items() if v is not None and getattr(stack.settings, k) != v}
        if changes:
            running = [st.name for st in stack.status() if st.running]
            if running:
                raise StackError(
                    f"cannot change {', '.join(sorted(changes))} while {', '.join(running)} "
                    f"{'is' if len(running) == 1 else 'are'} running: `spark stack down` first"
                )
            data = {**vars(stack.settings), **changes}
            if "s3_port" in changes or "prefect_port" in changes:
                data["weed_ports"] = {}  # re-pick internal ports away from the new public ones
            stack = Stack(state_dir, StackSettings.from_dict(data))
        return stack
    except StackError as err:
        _fail(err)
        raise  # unreachable: _fail exits


def _print_exports(stack: Stack, env_file: Path) -> None:
    typer.echo(f"\nClient environment (load it with:  . {env_file}):")
    for key, value in stack.env().items():
        shown = f"<in {env_file}>" if key in _SECRET_VARS else value
        typer.echo(f"  export {key}={shown}")
    store = stack.store_uri()
    typer.echo(
        f"Store on this stack: {store} (SPARK_STORE: the default of `spark` commands and deployed flow runs "
        f"once env.sh is loaded); a run lives under {store}/runs/RUN, list them with `spark ls {store}`"
    )


@stack_app.command("up")
def up(
    state_dir: Path = StateDir,
    only: Optional[list[str]] = Only,
    s3_port: Optional[int] = typer.Option(None, help="S3 port (default 8333; saved for next time)."),
    prefect_port: Optional[int] = typer.Option(None, help="Prefect server port (default 4200)."),
    bucket: Optional[str] = typer.Option(None, help="Bucket created on start (default spark)."),
    database_url: Optional[str] = typer.Option(
        None, help="PostgreSQL URL for the Prefect server, e.g. postgresql+asyncpg://u:p@127.0.0.1:5432/prefect "
        "(default: SQLite in the state dir)."
    ),
    pool: Optional[str] = typer.Option(None, help="Process work pool (default spark-process)."),
    worker_name: Optional[str] = typer.Option(None, help="Worker name (default spark-<hostname>)."),
) -> None:
    """Start the stack (or the --only components) and wait until each is healthy."""
    names = _components(only)
    stack = _open(
        state_dir,
        {"s3_port": s3_port, "prefect_port": prefect_port, "bucket": bucket, "database_url": database_url,
         "work_pool": pool, "worker_name": worker_name},
    )
    try:
        env_file = stack.write_env_file()
        for name in sorted(names, key=COMPONENTS.index):
            seconds = stack.start(name)
            note = "already running" if seconds == 0.0 else f"ready in {seconds:.1f} s"
            typer.echo(f"{name:<7} {note:<18} {_where(stack, name)}")
    except StackError as err:
        _fail(err)
    _print_exports(stack, env_file)


@stack_app.command("down")
def down(state_dir: Path = StateDir, only: Optional[list[str]] = Only) -> None:
    """Stop the stack (or the --only components): worker first, S3 last."""
    names = _components(only)
    stack = _open(state_dir, {})
    for name in sorted(names, key=COMPONENTS.index, reverse=True):
        graceful = stack.stop(name)
        typer.echo(f"{name:<7} stopped{'' if graceful else ' (killed after the grace period)'}")


@stack_app.command("status")
def status(state_dir: Path = StateDir) -> None:
    """Show each component's state, address and log (never the secret key). Exit 1 if one is unhealthy."""
    stack = _open(state_dir, {})
    unhealthy = False
    typer.echo(f"state dir: {stack.state_dir}")
    for st in stack.status():
        state = "healthy" if st.healthy else ("UNHEALTHY" if st.running else "stopped")
        unhealthy |= st.running and not st.healthy
        pid = f"pid {st.pid}" if st.pid else ""
        typer.echo(f"{st.name:<7} {state:<10} {pid:<11} {_where(stack, st.name):<45} log {st.log}")
    if (stack.state_dir / "credentials.json").exists():
        key_id = stack.env()["AWS_ACCESS_KEY_ID"]
        typer.echo(f"S3 access key id: {key_id} (secret in {stack.state_dir / 'env.sh'})")
    if unhealthy:
        raise typer.Exit(1)


def _where(stack: Stack, name: str) -> str:
    s = stack.settings
    if name == "s3":
        return f"{stack.s3_endpoint} bucket {s.bucket}"
    if name == "server":
        db = "PostgreSQL" if s.database_url else "SQLite"
        return f"{stack.api_url} ({db})"
    return f"pool {s.work_pool} as {s.worker_name}"
