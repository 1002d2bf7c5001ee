"""The layers import only downwards: spark_core never imports Prefect (or tasks/flows/deployments/infra),
tasks never import flows, deployments or infra, flows never import deployments or infra. Checked on the
source with `ast`, so a lazy import inside a function counts too.

The `spark` command line (flows/cli.py and the `*_cli.py` sub-command modules it mounts) is the front
door over every layer (`spark deploy`, `spark stack`), so it is exempt; the flows themselves are not."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# package -> top-level modules it must not import
FORBIDDEN = {
    "spark_core": {"prefect", "tasks", "flows", "deployments", "infra"},
    "tasks": {"flows", "deployments", "infra"},
    "flows": {"deployments", "infra"},
}


def is_cli(path: Path) -> bool:
    return path.parent.name == "flows" and (path.name == "cli.py" or path.name.endswith("_cli.py"))


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
            "import_module", "__import__"
        ) and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            roots.add(node.args[0].value.split(".")[0])
    return roots


def sources(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if not is_cli(p))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layers_import_only_downwards(package: str) -> None:
    files = sources(package)
    assert files, f"no sources found for {package}"
    bad = {
        str(f.relative_to(ROOT)): sorted(imported_roots(f) & FORBIDDEN[package])
        for f in files
        if imported_roots(f) & FORBIDDEN[package]
    }
    assert bad == {}, f"{package} imports a higher layer: {bad}"


def test_flows_do_not_depend_on_the_cli() -> None:
    for f in sources("flows"):
        tree = ast.parse(f.read_text())
        modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not any(m == "cli" or m.endswith("_cli") or m.startswith("flows.cli") for m in modules), f.name


def test_the_checker_sees_lazy_and_dynamic_imports(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import os\n"
        "def f():\n    from prefect import flow\n"
        "def g():\n    import importlib\n    importlib.import_module('flows.cli')\n"
    )
    assert {"prefect", "flows", "os", "importlib"} <= imported_roots(probe)


def test_tasks_are_thin_and_flows_use_tasks() -> None:
    """Tasks call spark_core.stages (the science stays out of Prefect code); the iteration flow calls
    the stage tasks rather than spark_core directly."""
    for f in sources("tasks"):
        if f.name in ("__init__.py", "common.py", "publish.py"):
            continue
        assert "stages" in f.read_text(), f"{f.name} should delegate to spark_core.stages"
    flow = (ROOT / "flows" / "iteration.py").read_text()
    for name in ("sample_policy_task", "verify_policy_task", "build_reward_data_task", "train_policy_task",
                 "sample_reward_task", "verify_reward_task", "train_reward_task", "evaluate_task"):
        assert f"{name}(" in flow, name
