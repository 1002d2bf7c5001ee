"""The layers import only downwards: spark_core never imports Prefect (or tasks/flows/the CLI/deployments/
infra), tasks never import flows, the CLI, deployments or infra, flows never import the CLI, deployments or
infra. The `spark` command line (spark_cli/) is the front door over every layer (`spark deploy`, `spark
stack`): it may import anything below it, and nothing imports it. And no module imports itself through
others: the import graph of the project's packages has no cycle. Checked on the source with `ast`, so a
lazy import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# package -> top-level modules it must not import
FORBIDDEN = {
    "spark_core": {"prefect", "tasks", "flows", "spark_cli", "deployments", "infra"},
    "tasks": {"flows", "spark_cli", "deployments", "infra"},
    "flows": {"spark_cli", "deployments", "infra"},
    "deployments": {"spark_cli"},
    "infra": {"spark_cli"},
    "spark_cli": {"bench", "tests"},  # the top layer: everything of the project below it
}
PACKAGES = sorted(FORBIDDEN)


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
    return sorted((ROOT / package).rglob("*.py"))


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path, packages: list[str]) -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its source (top level, functions, dynamic).

    ``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg``; targets
    outside the project are dropped, and a dotted target that is not a module counts as its longest
    module prefix."""
    files = {module_name(p, root): p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))}

    def known(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base)
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "__import__"
            ) and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                targets.add(node.args[0].value)
        graph[mod] = {t for t in map(known, targets) if t is not None and t != mod}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


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


def test_no_import_cycle_anywhere() -> None:
    graph = import_graph(ROOT, PACKAGES)
    assert "spark_core.stages.train" in graph and "spark_cli.main" in graph  # the walk saw the packages
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_checker_sees_lazy_relative_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from .c import g\n")
    (pkg / "c.py").write_text("def g():\n    import pkg.a\n")
    graph = import_graph(tmp_path, ["pkg"])
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.c"} and graph["pkg.c"] == {"pkg.a"}
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]
    (pkg / "c.py").write_text("def g():\n    import os\n")
    assert find_cycle(import_graph(tmp_path, ["pkg"])) is None


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
        # publish, assets, events: what Prefect shows and announces (artifacts, assets, events), no stage
        if f.name in ("__init__.py", "common.py", "publish.py", "assets.py", "events.py"):
            continue
        assert "stages" in f.read_text(), f"{f.name} should delegate to spark_core.stages"
    flow = (ROOT / "flows" / "iteration.py").read_text()
    for name in ("sample_policy_task", "verify_policy_task", "build_reward_data_task", "train_policy_task",
                 "sample_reward_task", "verify_reward_task", "train_reward_task", "evaluate_task"):
        assert f"{name}(" in flow, name
