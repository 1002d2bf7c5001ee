"""The `spark` command line: run the pipeline, look into the store, try a checkpoint.

    spark run --preset tiny --iterations 2 --store ./spark-store      # runs on Prefect's ephemeral API
    spark ls ./spark-store                                            # runs
    spark ls ./spark-store/runs/RUN                                   # iterations
    spark ls ./spark-store/runs/RUN/iter=0001                         # stages with row counts
    spark show ./spark-store/runs/RUN/iter=0001/verified --where "reward == 1" --columns question,answer
    spark reflect --checkpoint ./spark-store/runs/RUN/iter=0002/checkpoint --question "What is 2 + 3?"
    spark eval --checkpoint ./spark-store/runs/RUN/iter=0002/checkpoint --benchmark arithmetic

Bad input (unknown preset, bad config key, missing store path, locked run) prints ONE line on stderr
and exits with code 2. `spark stack ...` and `spark deploy ...` appear when their modules are installed.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

# Before Prefect is imported anywhere: no telemetry from a local run.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from spark_core.config import ConfigError, SparkConfig, load_config, parse_override  # noqa: E402
from spark_core.stages import StageError  # noqa: E402
from spark_core.store import Store, StoreError, iter_name  # noqa: E402

app = typer.Typer(
    name="spark",
    help="SPARK-Flow: a policy and its generative reward model co-evolving in one LLM, on Prefect.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console(highlight=False, soft_wrap=True)

USER_ERRORS = (ConfigError, StoreError, StageError, FileNotFoundError, NotADirectoryError)
EXIT_BAD_INPUT = 2


def fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    """One line on stderr, then exit."""
    line = " ".join(str(message).split())
    typer.echo(f"error: {line}", err=True)
    raise typer.Exit(code)


@contextmanager
def user_errors() -> Iterator[None]:
    try:
        yield
    except USER_ERRORS as err:
        fail(str(err))


# ------------------------------------------------------------------------------- store addresses


@dataclass
class Target:
    """A store address split into its parts: root[/runs/RUN[/iter=NNNN[/stage]]]."""

    store: Store
    run_id: str | None = None
    iteration: int | None = None
    stage: str | None = None


_ADDRESS = re.compile(r"^(?P<root>.*?)/runs/(?P<run>[^/]+)(?:/iter=(?P<iter>\d+)(?:/(?P<stage>.+?))?)?/*$")


def parse_target(uri: str) -> Target:
    m = _ADDRESS.match(uri.rstrip("/"))
    if not m:
        return Target(Store(uri))
    return Target(
        Store(m["root"] or "/"),
        m["run"],
        int(m["iter"]) if m["iter"] is not None else None,
        m["stage"],
    )


def _require_store(store: Store) -> None:
    if not store.exists(store.uri):
        raise StoreError(f"no store at {store.uri}")


def _require_run(t: Target) -> dict[str, Any]:
    _require_store(t.store)
    assert t.run_id is not None
    record = t.store.read_run(t.run_id)
    if record is None:
        known = ", ".join(t.store.list_runs()) or "none"
        raise StoreError(f"no run {t.run_id!r} in {t.store.uri} (runs: {known})")
    return record


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, (list, dict)):
        text = json.dumps(value, ensure_ascii=False, default=str)
        return text if len(text) <= 60 else f"{text[:57]}..."
    return str(value)


# ----------------------------------------------------------------------------------------- run


def _build_config(preset: str | None, config: str | None, sets: list[str], store: str | None) -> SparkConfig | None:
    overrides: dict[str, Any] = {}
    for expr in sets:
        overrides = _merge(overrides, parse_override(expr))
    if store:
        overrides = _merge(overrides, {"store": {"uri": store}})
    if preset is None and config is None:
        if overrides and set(overrides) != {"store"}:
            raise ConfigError("--set needs --preset or --config (a resumed run keeps its recorded config)")
        return None
    return load_config(config, preset=preset, overrides=overrides or None)


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    merged = dict(a)
    for key, value in b.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


class ProgressPrinter:
    """Prints one metrics line per completed iteration by watching LATEST in the store.

    The store is the source of truth, so this works the same whichever process runs the flow."""

    def __init__(self, cfg: SparkConfig, store: Store, run_id: str, console: Console, poll_s: float = 1.0) -> None:
        from spark_core.stages import iteration_summary

        self._summary = iteration_summary
        self.cfg, self.store, self.run_id, self.console, self.poll_s = cfg, store, run_id, console, poll_s
        self.printed = -1 if store.latest(run_id) is None else store.latest(run_id)
        self.columns = ["iteration", "policy_reward", "groups_mixed", "reward_items", "reward_phase_reward",
                        "policy_loss", "reward_loss"]
        for b in cfg.eval.benchmarks:
            self.columns += [f"{b.name}/{k}" for k in ("accuracy", "accuracy_reflect", "judge_f1")]
        self.columns.append("seconds")
        self.widths = [max(9, len(c)) for c in self.columns]
        self._header = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _line(self, cells: list[str]) -> str:
        return "  ".join(c.rjust(w) for c, w in zip(cells, self.widths))

    def flush(self) -> None:
        try:
            latest = self.store.latest(self.run_id)
        except StoreError:
            return
        while latest is not None and self.printed < latest:
            self.printed += 1
            row = self._summary(self.cfg, self.store, self.run_id, self.printed)
            if not self._header:
                self.console.print(f"[bold]{self._line(self.columns)}[/bold]")
                self._header = True
            self.console.print(self._line([_fmt(row.get(c)) for c in self.columns]))

    def start(self) -> "ProgressPrinter":
        def loop() -> None:
            while not self._stop.wait(self.poll_s):
                self.flush()

        self._thread = threading.Thread(target=loop, name="spark-progress", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.flush()


@app.command()
def run(
    preset: Optional[str] = typer.Option(None, "--preset", "-p", help="Packaged preset: tiny, smollm2-arith, qwen2.5-7b."),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="YAML config file (may name a preset)."),
    iterations: Optional[int] = typer.Option(None, "--iterations", "-n", min=1, help="Iterations to complete (default: the config's)."),
    store: Optional[str] = typer.Option(None, "--store", "-s", help="Store URI: a folder or s3://bucket/prefix (default: the config's)."),
    run_id: Optional[str] = typer.Option(None, "--run-id", help="Run to create or resume (default: {preset}-{timestamp})."),
    sets: list[str] = typer.Option([], "--set", help="Override a config value: key.path=value (repeatable)."),
    lock_wait: float = typer.Option(150.0, "--lock-wait", min=0, help="Seconds to wait if another process runs this run."),
) -> None:
    """Create or resume a run and run it to --iterations, printing metrics per iteration."""
    from flows.common import resolve

    with user_errors():
        cfg = _build_config(preset, config, sets, store)
        cfg, st, rid = resolve(cfg, store, run_id, iterations)
    out.print(f"run [bold]{rid}[/bold] in {st.uri}: {cfg.iterations} iterations (preset {cfg.preset or '-'})")

    from flows.run import spark_run  # Prefect is imported only when a run starts

    printer = ProgressPrinter(cfg, st, rid, out).start()
    try:
        spark_run(config=cfg, iterations=cfg.iterations, run_id=rid, store=st.uri, lock_wait_s=lock_wait)
    except USER_ERRORS as err:  # a locked run, a missing input, a store that went away
        printer.stop()
        fail(str(err))
    except Exception as err:  # noqa: BLE001 - Prefect has logged the traceback above
        printer.stop()
        fail(f"{type(err).__name__}: {err} (the flow log above has the details)", code=1)
    printer.stop()
    out.print(f"done: run {rid} is at iteration {st.latest(rid)}; look inside with: spark ls {st.run_uri(rid)}")


# ------------------------------------------------------------------------------------------ ls


@app.command("ls")
def ls(target: str = typer.Argument(..., help="STORE, STORE/runs/RUN, STORE/runs/RUN/iter=NNNN, or a stage.")) -> None:
    """List runs, a run's iterations, an iteration's stages (row counts), or a stage's manifest."""
    with user_errors():
        t = parse_target(target)
        if t.run_id is None:
            _require_store(t.store)
            _ls_runs(t.store)
        elif t.iteration is None:
            _ls_iterations(t, _require_run(t))
        elif t.stage is None:
            _require_run(t)
            _ls_stages(t)
        else:
            _require_run(t)
            uri = t.store.stage_uri(t.run_id, t.iteration, t.stage)
            manifest = t.store.manifest_or_none(uri)
            if manifest is None:
                raise StoreError(f"{uri} is not a complete stage (no _SUCCESS.json)")
            manifest.pop("train_rows", None)  # long; `spark show` the train table instead
            out.print_json(json.dumps(manifest, default=str))


def _ls_runs(store: Store) -> None:
    table = Table(title=f"runs in {store.uri}")
    for col in ("run", "LATEST", "created", "preset", "target"):
        table.add_column(col)
    for rid in store.list_runs():
        rec = store.read_run(rid) or {}
        cfg = rec.get("config", {})
        table.add_row(rid, _fmt(store.latest(rid)), str(rec.get("created_at", "-"))[:19],
                      str(cfg.get("preset") or "-"), _fmt(cfg.get("iterations")))
    out.print(table)


def _ls_iterations(t: Target, record: dict[str, Any]) -> None:
    assert t.run_id is not None
    latest = t.store.latest(t.run_id)
    table = Table(title=f"run {t.run_id} (LATEST={_fmt(latest)}, config {record.get('config_hash')})")
    for col in ("iteration", "complete", "stages"):
        table.add_column(col)
    for it in t.store.list_iterations(t.run_id):
        stages = t.store.list_stages(t.run_id, it)
        listing = ", ".join(s if rows is None else f"{s} ({rows})" for s, rows in stages.items())
        table.add_row(iter_name(it), "yes" if latest is not None and it <= latest else "no", listing or "-")
    out.print(table)


def _ls_stages(t: Target) -> None:
    assert t.run_id is not None and t.iteration is not None
    if t.iteration not in t.store.list_iterations(t.run_id):
        raise StoreError(f"run {t.run_id} has no {iter_name(t.iteration)}")
    table = Table(title=t.store.iter_uri(t.run_id, t.iteration))
    for col in ("stage", "rows", "seconds", "written"):
        table.add_column(col)
    for stage, rows in t.store.list_stages(t.run_id, t.iteration).items():
        m = t.store.manifest(t.store.stage_uri(t.run_id, t.iteration, stage))
        table.add_row(stage, _fmt(rows), _fmt(m.get("seconds")), str(m.get("written_at", "-"))[:19])
    out.print(table)


# ---------------------------------------------------------------------------------------- show


def _read_any(target: str) -> Any:
    """A complete stage of a store (its manifest's parts), or a single Parquet file."""
    import pyarrow.parquet as pq

    if target.rstrip("/").endswith(".parquet"):
        import fsspec

        try:
            with fsspec.open(target, "rb") as f:
                return pq.read_table(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"no such Parquet file: {target}") from None
    t = parse_target(target)
    if t.run_id is None or t.iteration is None or t.stage is None:
        raise StoreError(f"{target} is not a stage (STORE/runs/RUN/iter=NNNN/STAGE) or a .parquet file")
    _require_run(t)
    return t.store.read_table(t.store.stage_uri(t.run_id, t.iteration, t.stage))


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@app.command()
def show(
    target: str = typer.Argument(..., help="A stage (STORE/runs/RUN/iter=NNNN/STAGE) or a .parquet file."),
    head: int = typer.Option(10, "--head", min=0, help="Rows to print."),
    where: Optional[str] = typer.Option(None, "--where", help='SQL filter (DuckDB), e.g. "reward == 1".'),
    columns: Optional[str] = typer.Option(None, "--columns", help="Comma-separated columns to show."),
    max_chars: int = typer.Option(80, "--max-chars", min=8, help="Cut longer cells."),
) -> None:
    """Pretty-print rows of a Parquet table (local or s3)."""
    import duckdb

    with user_errors():
        data = _read_any(target)
    names = [c.strip() for c in columns.split(",") if c.strip()] if columns else data.column_names
    unknown = [c for c in names if c not in data.column_names]
    if unknown:
        fail(f"unknown column(s) {', '.join(unknown)}; the table has: {', '.join(data.column_names)}")
    con = duckdb.connect()
    con.register("t", data)
    sql = f"SELECT {', '.join(_quote(c) for c in names)} FROM t"
    if where:
        sql += f" WHERE {where}"
    try:
        total = con.execute(f"SELECT count(*) FROM ({sql})").fetchone()[0]
        rows = con.execute(f"{sql} LIMIT {head}").fetchall()
    except duckdb.Error as err:
        fail(f"--where {where!r}: {str(err).splitlines()[0]}")
    table = Table(title=f"{target} ({min(head, total)} of {total} rows)")
    for name in names:
        table.add_column(name, overflow="fold")
    for row in rows:
        cells = []
        for v in row:
            text = _fmt(v) if not isinstance(v, str) else v
            cells.append(text if len(text) <= max_chars else text[: max_chars - 3] + "...")
        table.add_row(*cells)
    out.print(table)


# ----------------------------------------------------------------------------- reflect and eval


def _checkpoint_workspace(checkpoint: str) -> tuple[SparkConfig, Any]:
    from spark_core.stages import Workspace, run_config

    t = parse_target(checkpoint)
    if t.run_id is None or t.iteration is None or t.stage not in ("checkpoint", "policy_checkpoint"):
        raise StoreError(f"{checkpoint} is not a run checkpoint (STORE/runs/RUN/iter=NNNN/checkpoint)")
    _require_run(t)
    cfg = run_config(t.store, t.run_id)
    ws = Workspace().use(cfg, t.store, t.store.stage_uri(t.run_id, t.iteration, t.stage))
    return cfg, ws


@app.command()
def reflect(
    checkpoint: str = typer.Option(..., "--checkpoint", help="STORE/runs/RUN/iter=NNNN/checkpoint"),
    question: str = typer.Option(..., "--question", "-q", help="The question to answer."),
    rounds: Optional[int] = typer.Option(None, "--rounds", min=0, help="Judge/revise rounds (default: the run's eval.max_rounds)."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", min=1),
) -> None:
    """Answer a question, judge the answer, revise it: the test-time self-reflection trace."""
    from spark_core.chat import question_messages
    from spark_core.reflection import self_reflect_batch

    with user_errors():
        cfg, ws = _checkpoint_workspace(checkpoint)
        trace = self_reflect_batch(
            ws.get_engine(cfg), ws.format_prompt(cfg), [question],
            question_messages=lambda q: question_messages(cfg.data, q),
            max_rounds=cfg.eval.max_rounds if rounds is None else rounds,
            judge_context=cfg.eval.judge_context,
            max_new_tokens=max_new_tokens or cfg.eval_max_new_tokens,
        )[0]
    for rnd in trace.rounds:
        label = "answer" if rnd["round"] == 0 else f"revision {rnd['round']}"
        out.rule(f"{label}: {rnd.get('answer')!r}")
        out.print(rnd["completion"], markup=False)
        if rnd.get("judgment_completion") is not None:
            out.print(f"[bold]self-judgment[/bold] -> {rnd.get('verdict')!r}")
            out.print(rnd["judgment_completion"], markup=False)
    out.rule()
    out.print(f"final answer: {trace.final_answer!r} ({trace.stopped_because}, {trace.n_revisions} revision(s))")


@app.command("eval")
def eval_(
    checkpoint: str = typer.Option(..., "--checkpoint", help="STORE/runs/RUN/iter=NNNN/checkpoint"),
    benchmark: str = typer.Option(..., "--benchmark", "-b", help="A benchmark named in the run's eval.benchmarks."),
) -> None:
    """Evaluate a checkpoint on one benchmark and print the summary (nothing is written)."""
    from spark_core.stages import benchmark_config, run_benchmark

    with user_errors():
        cfg, ws = _checkpoint_workspace(checkpoint)
        bcfg = benchmark_config(cfg, benchmark)
        _, summary = run_benchmark(cfg, ws, bcfg, seed=cfg.seed)
    table = Table(title=f"{benchmark} on {checkpoint}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        table.add_row(key, _fmt(value))
    out.print(table)


# ----------------------------------------------------------------------------- optional groups


def _mount(module: str, attr: str, name: str) -> None:
    """Add `spark stack` / `spark deploy` when their modules exist (they live beside this one)."""
    if importlib.util.find_spec(module) is None:
        return
    sub = getattr(importlib.import_module(module), attr)
    app.add_typer(sub, name=name)


_mount("flows.stack_cli", "stack_app", "stack")
_mount("flows.deploy_cli", "deploy_app", "deploy")


if __name__ == "__main__":
    app()
