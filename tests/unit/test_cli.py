"""The `spark` command line without Prefect: bad input gives one line and exit code 2; `ls`, `show`,
`reflect` and `eval` read a small store (the tiny initial checkpoint plus hand-written tables).
(`spark run` end to end is in test_flow_local.py, which has a Prefect API.)"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from spark_cli.main import app, parse_target
from spark_core import stages as S
from spark_core.config import SparkConfig
from spark_core.store import Store

RUN = "cli"


@pytest.fixture(scope="module")
def store(tiny_cfg: SparkConfig, tmp_path_factory: pytest.TempPathFactory) -> Store:
    root = tmp_path_factory.mktemp("cli-store")
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.store.uri = str(root)
    cfg.eval.benchmarks[0].limit = 2
    cfg.eval.max_rounds = 1
    cfg.eval.pairwise = False
    st = Store(str(root))
    S.init_run(cfg, st, RUN, S.Workspace())
    st.set_latest(RUN, 0)
    verified = pa.table({
        "question_id": ["q1", "q1", "q2"],
        "completion": ["so \\boxed{3}", "\\boxed{4}", "long " * 40],
        "reward": [1.0, 0.0, 0.0],
    })
    st.write_table(st.stage_uri(RUN, 1, "verified"), verified, {"metrics": {"mean_reward": 1 / 3}})
    st.write_table(st.stage_uri(RUN, 1, "train/phase=policy"), pa.table({"step": [1], "loss": [0.5]}))
    return st


def invoke(*args: str, input: str | None = None):
    return CliRunner().invoke(app, list(args), input=input)


def one_error_line(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["run", "--preset", "nope"], "unknown preset 'nope'"),
        (["run", "--preset", "tiny", "--set", "train.nope=1"], "train.nope: unknown key"),
        (["run", "--preset", "tiny", "--set", "sampling.n=1"], "sampling.n"),
        (["run", "--preset", "tiny", "--set", "novalue"], "expected key.path=value"),
        (["run", "--config", "/nonexistent/spark.yaml"], "config file not found"),
        (["run"], "give a preset or a config to start a run"),
        (["run", "--preset", "tiny", "--run-id", "bad/id"], "invalid run id"),
        (["ls", "/nonexistent/spark-store"], "no store at"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(args: list[str], expected: str) -> None:
    assert expected in one_error_line(invoke(*args))


def test_bad_store_addresses(store: Store) -> None:
    assert "no run 'zz'" in one_error_line(invoke("ls", f"{store.uri}/runs/zz"))
    assert "has no iter=0007" in one_error_line(invoke("ls", f"{store.uri}/runs/{RUN}/iter=0007"))
    assert "not complete" in one_error_line(invoke("show", f"{store.uri}/runs/{RUN}/iter=0001/samples"))
    assert "not a stage" in one_error_line(invoke("show", f"{store.uri}/runs/{RUN}"))
    assert "no such Parquet file" in one_error_line(invoke("show", "/nonexistent/x.parquet"))
    verified = f"{store.uri}/runs/{RUN}/iter=0001/verified"
    assert "unknown column(s) nope" in one_error_line(invoke("show", verified, "--columns", "nope"))
    assert "--where" in one_error_line(invoke("show", verified, "--where", "nope = 1"))
    assert "not a run checkpoint" in one_error_line(
        invoke("reflect", "--checkpoint", verified, "--question", "What is 1 + 1?"))
    ckpt = f"{store.uri}/runs/{RUN}/iter=0000/checkpoint"
    assert "no benchmark named 'x'" in one_error_line(invoke("eval", "--checkpoint", ckpt, "--benchmark", "x"))
    # A resumed run keeps its recorded config: overrides need a preset or config.
    assert "--set needs" in one_error_line(invoke("run", "--store", store.uri, "--run-id", RUN, "--set", "seed=3"))


def test_ls_lists_runs_iterations_stages_and_manifests(store: Store) -> None:
    runs = invoke("ls", store.uri)
    assert runs.exit_code == 0 and RUN in runs.stdout and "tiny" in runs.stdout
    iters = invoke("ls", f"{store.uri}/runs/{RUN}")
    assert iters.exit_code == 0
    assert "iter=0000" in iters.stdout and "iter=0001" in iters.stdout and "verified (3)" in iters.stdout
    stage_rows = invoke("ls", f"{store.uri}/runs/{RUN}/iter=0001/")
    assert stage_rows.exit_code == 0
    text = stage_rows.stdout
    assert "verified" in text and "train/phase=policy" in text and " 3 " in text
    manifest = invoke("ls", f"{store.uri}/runs/{RUN}/iter=0001/verified")
    assert manifest.exit_code == 0 and '"rows": 3' in manifest.stdout and "mean_reward" in manifest.stdout


def test_show_filters_and_selects(store: Store, tmp_path: Path) -> None:
    verified = f"{store.uri}/runs/{RUN}/iter=0001/verified"
    res = invoke("show", verified, "--where", "reward = 1", "--columns", "question_id,completion")
    assert res.exit_code == 0, res.output
    assert "1 of 1 rows" in res.stdout and "\\boxed{3}" in res.stdout and "\\boxed{4}" not in res.stdout
    header = next(ln for ln in res.stdout.splitlines() if "question_id" in ln)
    assert "completion" in header and "reward" not in header  # only the selected columns
    cut = invoke("show", verified, "--head", "5", "--max-chars", "20", "--columns", "completion")
    assert "3 of 3 rows" in cut.stdout and "long long long lo..." in cut.stdout
    path = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"a": [1, 2, 3]}), path)
    plain = invoke("show", str(path), "--where", "a >= 2")
    assert plain.exit_code == 0 and "2 of 2 rows" in plain.stdout


def test_reflect_and_eval_on_a_checkpoint(store: Store) -> None:
    ckpt = f"{store.uri}/runs/{RUN}/iter=0000/checkpoint"
    res = invoke("reflect", "--checkpoint", ckpt, "--question", "What is 2 + 3?", "--rounds", "1",
                 "--max-new-tokens", "4")
    assert res.exit_code == 0, res.output
    assert "answer:" in res.stdout and "final answer:" in res.stdout
    ev = invoke("eval", "--checkpoint", ckpt, "--benchmark", "arithmetic")
    assert ev.exit_code == 0, ev.output
    assert "accuracy" in ev.stdout and "judge_f1" in ev.stdout
    assert not Path(store.stage_uri(RUN, 0, "eval/benchmark=arithmetic")).exists(), "eval writes nothing"


def test_eval_on_a_benchmark_the_run_did_not_configure(store: Store, tmp_path: Path) -> None:
    ckpt = f"{store.uri}/runs/{RUN}/iter=0000/checkpoint"
    questions = tmp_path / "qs.jsonl"
    questions.write_text('{"problem": "What is 2 + 2?", "solution": "4"}\n{"problem": "What is 1 + 5?", "solution": "6"}\n')
    res = invoke("eval", "--checkpoint", ckpt, "--benchmark-file", str(questions), "--question-column", "problem",
                 "--answer-column", "solution", "--limit", "2")
    assert res.exit_code == 0, res.output
    assert "qs on" in res.stdout and "accuracy" in res.stdout
    assert "column" in one_error_line(invoke("eval", "--checkpoint", ckpt, "--benchmark-file", str(questions)))
    assert "give --benchmark NAME" in one_error_line(invoke("eval", "--checkpoint", ckpt))
    assert "not found" in one_error_line(invoke("eval", "--checkpoint", ckpt, "--benchmark-file", "/no/such.jsonl"))


def test_ls_says_where_runs_are_when_a_prefix_holds_none(store: Store, tmp_path: Path) -> None:
    doubled = invoke("ls", f"{store.uri}/runs")  # the store URI is the prefix above runs/
    assert doubled.exit_code == 0
    assert "no runs in" in doubled.stdout and f"spark ls {store.uri}" in doubled.stdout
    above = invoke("ls", str(Path(store.uri).parent))  # runs one level below the prefix given
    assert f"spark ls {store.uri}" in above.stdout
    (tmp_path / "empty").mkdir()
    empty = invoke("ls", str(tmp_path / "empty"))
    assert empty.exit_code == 0 and f"looked for {tmp_path / 'empty'}/runs/RUN/run.json" in empty.stdout


def test_show_on_a_partition_parent_lists_its_partitions(store: Store) -> None:
    for command in ("show", "ls"):
        res = invoke(command, f"{store.uri}/runs/{RUN}/iter=0001/train")
        assert res.exit_code == 0, res.output
        assert "1 partitions" in res.stdout and "phase=policy" in res.stdout and "not complete" not in res.output


def test_rm_asks_and_refuses_while_the_run_is_held(store: Store, tiny_cfg: SparkConfig) -> None:
    doomed = "doomed"
    store.write_run(doomed, tiny_cfg)
    store.write_table(store.stage_uri(doomed, 1, "verified"), pa.table({"a": [1]}))
    address = f"{store.uri}/runs/{doomed}"
    kept = invoke("rm", address, input="n\n")
    assert kept.exit_code == 1 and "nothing removed" in kept.stderr and store.read_run(doomed) is not None
    with store.run_lock(doomed, ttl_s=60):  # another holder (a flow run) has the run lease
        assert "is being run by host" in one_error_line(invoke("rm", address, "--yes"))
    assert store.read_run(doomed) is not None
    gone = invoke("rm", address, input="y\n")
    assert gone.exit_code == 0 and f"removed run {doomed}" in gone.stdout, gone.output
    assert store.read_run(doomed) is None and not Path(store.run_uri(doomed)).exists()
    assert doomed not in store.list_runs() and RUN in store.list_runs()
    assert "no run 'doomed'" in one_error_line(invoke("rm", address, "--yes"))


def test_parse_target() -> None:
    t = parse_target("s3://bucket/prefix/runs/r1/iter=0003/train/phase=policy")
    assert (t.store.uri, t.run_id, t.iteration, t.stage) == ("s3://bucket/prefix", "r1", 3, "train/phase=policy")
    t = parse_target("/x/store/runs/r1/")
    assert (t.store.uri, t.run_id, t.iteration, t.stage) == ("/x/store", "r1", None, None)
    assert parse_target("/x/store").run_id is None
