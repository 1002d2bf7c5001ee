"""The `spark` command line: run the pipeline, look into the store, try a checkpoint.

    spark run --preset tiny --iterations 2 --store ./spark-store      # runs on Prefect's ephemeral API
    spark ls ./spark-store                                            # runs
    spark ls ./spark-store/runs/RUN                                   # iterations
    spark ls ./spark-store/runs/RUN/iter=0001                         # stages with row counts
    spark show ./spark-store/runs/RUN/iter=0001/verified --where "reward == 1" --columns question,answer
    spark reflect --checkpoint ./spark-store/runs/RUN/iter=0002/checkpoint --question "What is 2 + 3?"
    spark eval --checkpoint ./spark-store/runs/RUN/iter=0002/checkpoint --benchmark arithmetic
    spark eval --checkpoint ... --benchmark-file qs.jsonl --question-column problem --answer-column solution
    spark rm ./spark-store/runs/RUN                                   # asks first (or --yes)

Bad input (unknown preset, bad config key, missing store path, locked run) prints ONE line on stderr
and exits with code 2. `spark stack ...` and `spark deploy ...` appear when their modules are installed.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

# Before Prefect is imported anywhere: no telemetry from a local run.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from spark_core.config import ConfigError, SparkConfig, _deep_merge, load_config  # noqa: E402
from spark_core.overrides import parse_override  # noqa: E402
from spark_core.data_checks import DataError  # noqa: E402
from spark_core.layout import CHECKPOINT, POLICY_CHECKPOINT, iter_name, split_address  # noqa: E402
from spark_core.stages import StageError  # noqa: E402
from spark_core.store import Store, StoreError  # noqa: E402

app = typer.Typer(
    name="spark",
    help="SPARK-Flow: a policy and its generative reward model co-evolving in one LLM, on Prefect.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console(highlight=False, soft_wrap=True)

USER_ERRORS = (ConfigError, StoreError, StageError, DataError, FileNotFoundError, NotADirectoryError)
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


def parse_target(uri: str) -> Target:
    root, run_id, iteration, stage = split_address(uri)
    return Target(Store(root), run_id, iteration, stage)


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
        overrides = _deep_merge(overrides, parse_override(expr))
    if store:
        overrides = _deep_merge(overrides, {"store": {"uri": store}})
    if preset is None and config is None:
        if overrides and set(overrides) != {"store"}:
            raise ConfigError("--set needs --preset or --config (a resumed run keeps its recorded config)")
        return None
    return load_config(config, preset=preset, overrides=overrides or None)


# Columns of the per-iteration table `spark run` prints: (iteration_summary key, header).
PROGRESS_COLUMNS = (
    ("iteration", "iter"), ("policy_reward", "policy_rwd"), ("groups_mixed", "mixed"),
    ("reward_items", "rw_items"), ("reward_phase_reward", "rw_reward"),
    ("reward_verdict_parse_rate", "rw_parse"), ("reward_yes_share", "rw_yes"),
    ("reward_zero_adv_share", "rw_zero_adv"), ("policy_loss", "policy_loss"), ("reward_loss", "reward_loss"),
)
PROGRESS_EVAL_COLUMNS = (
    ("accuracy", "acc"), ("accuracy_reflect", "acc_reflect"), ("judge_accuracy", "judge_acc"),
    ("judge_balanced_accuracy", "judge_bal_acc"), ("verdict_parse_rate", "verdict_parse"), ("judge_f1", "judge_f1"),
)


def progress_columns(cfg: SparkConfig) -> tuple[list[str], list[str]]:
    """Summary keys and headers of the progress table (eval columns per benchmark, named when several)."""
    keys = [k for k, _ in PROGRESS_COLUMNS]
    headers = [h for _, h in PROGRESS_COLUMNS]
    several = len(cfg.eval.benchmarks) > 1
    for b in cfg.eval.benchmarks:
        keys += [f"{b.name}/{k}" for k, _ in PROGRESS_EVAL_COLUMNS]
        headers += [f"{b.name}/{h}" if several else h for _, h in PROGRESS_EVAL_COLUMNS]
    return keys + ["seconds"], headers + ["seconds"]


def _names_store(config: str | None, sets: list[str]) -> bool:
    """Whether the --config file or a --set gives the store URI (then it wins over $SPARK_STORE)."""
    import yaml

    if any(expr.split("=", 1)[0].strip() == "store.uri" for expr in sets):
        return True
    if config is None:
        return False
    loaded = yaml.safe_load(open(config).read()) or {}
    return isinstance(loaded, dict) and isinstance(loaded.get("store"), dict) and "uri" in loaded["store"]


class ProgressPrinter:
    """Prints one metrics line per completed iteration by watching LATEST in the store.

    The store is the source of truth, so this works the same whichever process runs the flow."""

    def __init__(self, cfg: SparkConfig, store: Store, run_id: str, console: Console, poll_s: float = 1.0) -> None:
        from spark_core.stages import iteration_summary

        self._summary = iteration_summary
        self.cfg, self.store, self.run_id, self.console, self.poll_s = cfg, store, run_id, console, poll_s
        self.printed = -1 if store.latest(run_id) is None else store.latest(run_id)
        self.columns, self.headers = progress_columns(cfg)
        self.widths = [max(7, len(h)) for h in self.headers]
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
                self.console.print(f"[bold]{self._line(self.headers)}[/bold]")
                self._header = True
            self.console.print(self._line([_fmt(row.get(c)) for c in self.columns]))
            if row.get("reward_no_signal"):
                self.console.print(f"[bold red]WARNING[/bold red] iteration {self.printed}: the reward phase "
                                   "carried no signal (every item group had equal rewards, advantage 0)")

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
    preset: Optional[str] = typer.Option(None, "--preset", "-p", help="Packaged preset: tiny, tiny-vl, smollm2-arith, qwen2.5-7b, qwen2.5-vl-7b."),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="YAML config file (may name a preset)."),
    iterations: Optional[int] = typer.Option(None, "--iterations", "-n", min=1, help="Iterations to complete (default: the config's)."),
    store: Optional[str] = typer.Option(None, "--store", "-s", help="Store URI above runs/: a folder or s3://bucket/prefix (default: the --config file's store.uri, else $SPARK_STORE, else the preset's)."),
    run_id: Optional[str] = typer.Option(None, "--run-id", help="Run to create or resume (default: {preset}-{timestamp})."),
    sets: list[str] = typer.Option([], "--set", help="Override a config value: key.path=value (repeatable)."),
    lock_wait: float = typer.Option(150.0, "--lock-wait", min=0, help="Seconds to wait if another process runs this run."),
) -> None:
    """Create or resume a run and run it to --iterations, printing metrics per iteration."""
    from flows.common import STORE_ENV, resolve

    with user_errors():
        cfg = _build_config(preset, config, sets, store)
        if store is None and not _names_store(config, sets):
            store = os.environ.get(STORE_ENV)  # the local stack's store once its env.sh is loaded
        cfg, st, rid = resolve(cfg, store, run_id, iterations)
    out.print(f"run [bold]{rid}[/bold] in {st.uri}: {cfg.iterations} iterations (preset {cfg.preset or '-'})")
    if (problem := cfg.pool_balance_problem()) is not None:
        out.print(f"[bold red]WARNING[/bold red] {problem}")

    from flows.common import embedded_prefect
    from flows.run import spark_run  # Prefect is imported only when a run starts

    printer = ProgressPrinter(cfg, st, rid, out).start()
    try:
        with embedded_prefect():  # no heartbeats on the temporary API (nothing could read them)
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
            if manifest is None and _print_partitions(t):
                return
            if manifest is None:
                raise StoreError(f"{uri} is not a complete stage (no _SUCCESS.json)")
            manifest.pop("train_rows", None)  # long; `spark show` the train table instead
            out.print_json(json.dumps(manifest, default=str))


def _partitions(t: Target) -> dict[str, int | None]:
    """The complete stages below a partition parent (`train` -> `train/phase=policy`, ...): name -> rows."""
    assert t.run_id is not None and t.iteration is not None and t.stage is not None
    prefix = t.stage.strip("/") + "/"
    return {s: rows for s, rows in t.store.list_stages(t.run_id, t.iteration).items() if s.startswith(prefix)}


def _print_partitions(t: Target) -> bool:
    """List the partitions of a partition parent; False when `t` is not one."""
    parts = _partitions(t)
    if not parts:
        return False
    assert t.run_id is not None and t.iteration is not None
    base = t.store.stage_uri(t.run_id, t.iteration, t.stage or "")
    table = Table(title=f"{base}: {len(parts)} partitions (spark show one of them, or read the folder as one table)")
    for col in ("partition", "rows", "address"):
        table.add_column(col, overflow="fold")
    for stage, rows in parts.items():
        table.add_row(stage.rsplit("/", 1)[-1], _fmt(rows), t.store.stage_uri(t.run_id, t.iteration, stage))
    out.print(table)
    return True


def _ls_runs(store: Store) -> None:
    if not store.list_runs():
        out.print(f"no runs in {store.uri} (looked for {store.join(store.uri, 'runs')}/RUN/run.json; "
                  "a store URI is the prefix above runs/)")
        for other in store.stores_nearby():
            out.print(f"runs found in {other}: spark ls {other}")
        return
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


# ------------------------------------------------------------------------------------------ rm


@app.command("rm")
def rm(
    target: str = typer.Argument(..., help="The run to remove: STORE/runs/RUN."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
) -> None:
    """Remove a whole run (every iteration, checkpoint and table under STORE/runs/RUN).

    Refused while another process runs it (its run lease is held). Frees the run id for a new config."""
    with user_errors():
        t = parse_target(target)
        if t.run_id is None or t.iteration is not None:
            raise StoreError(f"{target} is not a run (STORE/runs/RUN); `spark ls STORE` lists them")
        record = _require_run(t)
        uri = t.store.run_uri(t.run_id)
        latest = t.store.latest(t.run_id)
        if not yes:
            question = (f"Remove run {t.run_id} ({uri}, LATEST={_fmt(latest)}, created "
                        f"{str(record.get('created_at', '-'))[:19]}) and everything in it?")
            if not typer.confirm(question, default=False):
                typer.echo("nothing removed", err=True)
                raise typer.Exit(1)
        removed = t.store.remove_run(t.run_id)
    out.print(f"removed run {t.run_id}: {removed} objects under {uri}")


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
    image: Optional[str] = typer.Option(None, "--image", help="With a run (STORE/runs/RUN): write the image of this "
                                        "reference (an `images` cell, <sha256>.<ext>) to --out."),
    out_path: Optional[str] = typer.Option(None, "--out", help="Where --image writes (default: the reference's name)."),
) -> None:
    """Pretty-print rows of a Parquet table (local or s3); on a partition parent, list its partitions."""
    import duckdb

    with user_errors():
        if image is not None:
            from spark_core.images import ImageError, get_image

            t = parse_target(target)
            if t.run_id is None:
                raise StoreError(f"--image needs a run address (STORE/runs/RUN), got {target}")
            _require_run(t)
            try:
                data = get_image(t.store, t.run_id, image)
            except (ImageError, ValueError) as err:
                raise StoreError(str(err)) from None
            path = out_path or image
            with open(path, "wb") as fh:
                fh.write(data)
            out.print(f"{path}: {len(data):,} bytes")
            return
        t = None if target.rstrip("/").endswith(".parquet") else parse_target(target)
        if t is not None and t.stage is not None and t.run_id is not None and t.iteration is not None:
            _require_run(t)
            if not t.store.is_done(t.store.stage_uri(t.run_id, t.iteration, t.stage)) and _print_partitions(t):
                return
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


def _checkpoint_config(checkpoint: str) -> tuple[SparkConfig, Store, str]:
    """The run's config, its store and the checkpoint URI (nothing loaded yet)."""
    from spark_core.stages import run_config

    t = parse_target(checkpoint)
    if t.run_id is None or t.iteration is None or t.stage not in (CHECKPOINT, POLICY_CHECKPOINT):
        raise StoreError(f"{checkpoint} is not a run checkpoint (STORE/runs/RUN/iter=NNNN/checkpoint)")
    _require_run(t)
    return run_config(t.store, t.run_id), t.store, t.store.stage_uri(t.run_id, t.iteration, t.stage)


def _checkpoint_workspace(checkpoint: str) -> tuple[SparkConfig, Any]:
    from spark_core.stages import Workspace

    cfg, store, uri = _checkpoint_config(checkpoint)
    return cfg, Workspace().use(cfg, store, uri)


@app.command()
def reflect(
    checkpoint: str = typer.Option(..., "--checkpoint", help="STORE/runs/RUN/iter=NNNN/checkpoint"),
    question: str = typer.Option(..., "--question", "-q", help="The question to answer."),
    rounds: Optional[int] = typer.Option(None, "--rounds", min=0, help="Judge/revise rounds (default: the run's eval.max_rounds)."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", min=1),
) -> None:
    """Answer a question, judge the answer, revise it: the test-time self-reflection trace."""
    from spark_core.chat import question_messages
    from spark_core.demonstrations import role_prompts
    from spark_core.reflection import self_reflect_batch

    with user_errors():
        cfg, ws = _checkpoint_workspace(checkpoint)
        trace = self_reflect_batch(
            ws.get_engine(cfg), ws.format_prompt(cfg), [question],
            question_messages=lambda q: question_messages(cfg.data, q),
            max_rounds=cfg.eval.max_rounds if rounds is None else rounds,
            judge_context=cfg.eval.judge_context,
            max_new_tokens=max_new_tokens or cfg.eval_max_new_tokens,
            roles=role_prompts(cfg),
            judge_max_new_tokens=max_new_tokens or cfg.eval_judge_max_new_tokens,
            revision_max_new_tokens=max_new_tokens or cfg.eval_revision_max_new_tokens,
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


def _adhoc_benchmark(cfg: SparkConfig, name: str | None, path: str | None, question_column: str,
                     answer_column: str, answer_format: str, limit: int | None) -> Any:
    """The benchmark to evaluate: one of the run's eval.benchmarks, the packaged `arithmetic` test split of
    the run's task, or a Parquet/JSONL file with its column mapping."""
    from spark_core.config import BenchmarkConfig
    from spark_core.stages import benchmark_config

    if (name is None) == (path is None):
        raise ConfigError("give --benchmark NAME (configured, or the packaged 'arithmetic') or --benchmark-file PATH")
    if path is not None:
        if "://" not in path and not os.path.exists(path):
            raise FileNotFoundError(f"benchmark file not found: {path}")
        stem = os.path.basename(path.rstrip("/")).split(".")[0] or "file"
        bcfg = BenchmarkConfig(name=stem, source="file", path=path, question_column=question_column,
                               answer_column=answer_column, answer_format=answer_format)
    elif name in {b.name for b in cfg.eval.benchmarks}:
        bcfg = benchmark_config(cfg, name)
    elif name == "arithmetic":
        bcfg = BenchmarkConfig(name="arithmetic", source="arithmetic")
    else:
        benchmark_config(cfg, name)  # raises, naming the configured ones
    return bcfg.model_copy(update={"limit": limit}) if limit is not None else bcfg


@app.command("eval")
def eval_(
    checkpoint: str = typer.Option(..., "--checkpoint", help="STORE/runs/RUN/iter=NNNN/checkpoint"),
    benchmark: Optional[str] = typer.Option(
        None, "--benchmark", "-b",
        help="A benchmark of the run's eval.benchmarks, or 'arithmetic' (the synthetic test split)."),
    benchmark_file: Optional[str] = typer.Option(
        None, "--benchmark-file", help="A Parquet/JSONL file (local or s3://) of questions and answers."),
    question_column: str = typer.Option("question", help="Question column of --benchmark-file."),
    answer_column: str = typer.Option("answer", help="Answer column of --benchmark-file."),
    answer_format: str = typer.Option("plain", help="plain | gsm8k | boxed (how --benchmark-file's answers read)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Evaluate at most this many items."),
) -> None:
    """Evaluate a checkpoint on one benchmark and print the summary (nothing is written)."""
    from spark_core.benchmarks import load_benchmark, load_preference_set
    from spark_core.stages import Workspace, run_benchmark

    with user_errors():
        if answer_format not in ("plain", "gsm8k", "boxed"):
            raise ConfigError(f"--answer-format {answer_format!r}: choose plain, gsm8k or boxed")
        cfg, store, uri = _checkpoint_config(checkpoint)
        bcfg = _adhoc_benchmark(cfg, benchmark, benchmark_file, question_column, answer_column,
                                answer_format, limit)
        try:  # read the items first: a wrong column fails before the model loads
            (load_preference_set(bcfg) if bcfg.source == "preference" else load_benchmark(bcfg, cfg))
        except ValueError as err:  # the loader names the column or row
            raise ConfigError(str(err)) from None
        ws = Workspace().use(cfg, store, uri)
        _, summary = run_benchmark(cfg, ws, bcfg, seed=cfg.seed)
    table = Table(title=f"{bcfg.name} on {checkpoint}")
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


_mount("spark_cli.stack", "stack_app", "stack")
_mount("spark_cli.deploy", "deploy_app", "deploy")


if __name__ == "__main__":
    app()
