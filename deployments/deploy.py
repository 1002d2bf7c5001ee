"""Register the SPARK deployments (`deployments/prefect.yaml`) with a Prefect server.

`deploy()` checks the server answers, creates the process work pool if it is missing, runs
`prefect --no-prompt deploy` on the YAML from the repository root (so entrypoints resolve against this
checkout and the pull step changes into it), then reads every deployment back from the API and checks
that its parameter schema is one the UI's form can use (`check_parameter_schema`). Nothing is built or pushed: a process worker runs the checkout in its own environment.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from infra.local.stack import StackError, ensure_work_pool, http_json

REPO_DIR = Path(__file__).resolve().parent.parent
PREFECT_FILE = Path(__file__).resolve().parent / "prefect.yaml"


class DeployError(RuntimeError):
    """Deploying failed; the message says which step and why."""


@dataclass(frozen=True)
class Deployed:
    """One registered deployment as the server reports it."""

    name: str  # "flow-name/deployment-name", what `prefect deployment run` takes
    id: str
    work_pool: str
    parameter_schema: dict[str, Any]
    schedules: int


def deployment_specs(prefect_file: Path = PREFECT_FILE) -> list[dict[str, Any]]:
    """The deployment entries of the YAML file."""
    data = yaml.safe_load(prefect_file.read_text()) or {}
    specs = data.get("deployments") or []
    if not specs:
        raise DeployError(f"{prefect_file}: no deployments")
    return specs


def flow_name(entrypoint: str) -> str:
    """The Prefect flow name behind an entrypoint, read from its `@flow(name=...)` without importing it."""
    path, func = entrypoint.split(":")
    tree = ast.parse((REPO_DIR / path).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == func:
            for deco in node.decorator_list:
                if isinstance(deco, ast.Call):
                    for kw in deco.keywords:
                        if kw.arg == "name" and isinstance(kw.value, ast.Constant):
                            return str(kw.value.value)
            return func.replace("_", "-")  # Prefect's default flow name
    raise DeployError(f"entrypoint {entrypoint}: no function {func} in {path}")


def _api_url(api_url: str | None) -> str:
    url = api_url or os.environ.get("PREFECT_API_URL")
    if not url:
        raise DeployError(
            "PREFECT_API_URL is not set: start the local stack (`spark stack up`) and load its environment "
            "(`. .spark-stack/env.sh`), or pass --api-url"
        )
    return url.rstrip("/")


def read_deployment(api_url: str, name: str) -> dict[str, Any]:
    """GET a deployment by `flow/deployment` name."""
    flow, dep = name.split("/", 1)
    url = f"{api_url}/deployments/name/{urllib.parse.quote(flow)}/{urllib.parse.quote(dep)}"
    status, body = http_json("GET", url, retries=4)
    if status != 200:
        raise DeployError(f"deployment {name} not found on {api_url} (HTTP {status})")
    return body


def form_defaults(schema: dict[str, Any], node: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the UI's Custom-run form submits when nothing is typed: every property at its schema default,
    and every object-typed property opened and filled the same way (the worst case: each section clicked)."""
    definitions = schema.get("definitions") or schema.get("$defs") or {}

    def deref(n: dict[str, Any]) -> dict[str, Any]:
        return definitions[n["$ref"].rsplit("/", 1)[-1]] if "$ref" in n else n

    out = {}
    for name, prop in (node or schema).get("properties", {}).items():
        value = prop.get("default")
        if value is None:
            objects = [c for c in map(deref, prop.get("anyOf", [prop])) if "properties" in c]
            if objects:
                value = form_defaults(schema, objects[0])
        out[name] = value
    return out


def check_parameter_schema(schema: dict[str, Any], name: str) -> None:
    """The form the UI builds from the schema: every parameter described, `preset` a choice of the packaged
    presets, and `overrides` typed by SparkConfigOverrides (every field null by default, so a filled-in
    form keeps the preset's values)."""
    from spark_core.config import PRESETS

    props = schema.get("properties", {})
    undescribed = sorted(p for p, prop in props.items() if not prop.get("description"))
    if undescribed:
        raise DeployError(f"deployment {name}: parameters without a description: {undescribed}")
    if "preset" in props:
        choices = {v for c in props["preset"].get("anyOf", [props["preset"]]) for v in c.get("enum", [])}
        if choices != set(PRESETS):
            raise DeployError(f"deployment {name}: parameter `preset` offers {sorted(choices)}, not {list(PRESETS)}")
    if "overrides" in props:
        definitions = schema.get("definitions") or schema.get("$defs") or {}
        spark = definitions.get("SparkConfigOverrides")
        if spark is None or "SparkConfigOverrides" not in repr(props["overrides"]):
            raise DeployError(f"deployment {name}: parameter `overrides` is not typed by SparkConfigOverrides")
        missing = {"model", "sampling", "train", "store"} - set(spark.get("properties", {}))
        if missing:
            raise DeployError(f"deployment {name}: SparkConfigOverrides lacks sections {sorted(missing)}")
        defaulted = sorted(k for k, v in spark["properties"].items() if v.get("default") is not None)
        if defaulted:
            raise DeployError(f"deployment {name}: overrides with a non-null default would replace the "
                              f"preset's values in the form: {defaulted}")


def deploy(
    api_url: str | None = None,
    names: list[str] | None = None,
    prefect_file: Path = PREFECT_FILE,
    repo_dir: Path = REPO_DIR,
    timeout_s: float = 600,
) -> list[Deployed]:
    """Register the deployments of `prefect_file` (all, or those named) on the server at `api_url`."""
    api = _api_url(api_url)
    try:
        status, healthy = http_json("GET", f"{api}/health", timeout=5)
    except OSError as err:
        raise DeployError(f"no Prefect server answers at {api}: {err}") from None
    if status != 200 or healthy is not True:
        raise DeployError(f"Prefect server at {api} is not healthy (HTTP {status})")

    specs = [s for s in deployment_specs(prefect_file) if not names or s["name"] in names]
    unknown = set(names or []) - {s["name"] for s in specs}
    if unknown:
        raise DeployError(f"no deployment named {sorted(unknown)} in {prefect_file}")
    env = dict(os.environ, PREFECT_API_URL=api, SPARK_REPO_DIR=str(repo_dir))
    try:
        for pool in sorted({s["work_pool"]["name"] for s in specs}):
            ensure_work_pool(api, pool, env=env)
    except StackError as err:
        raise DeployError(str(err)) from None

    argv = [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--prefect-file", str(prefect_file)]
    argv += ["--all"] if not names else [a for s in specs for a in ("--name", s["name"])]
    done = subprocess.run(argv, cwd=repo_dir, env=env, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        output = done.stdout[-4000:] + done.stderr[-4000:]
        raise DeployError(f"`prefect deploy` failed (exit {done.returncode}):\n{output}")

    out = []
    for spec in specs:
        full = f"{flow_name(spec['entrypoint'])}/{spec['name']}"
        body = read_deployment(api, full)
        schema = body.get("parameter_openapi_schema") or {}
        check_parameter_schema(schema, full)
        schedules = len(body.get("schedules") or [])
        out.append(Deployed(full, str(body["id"]), str(body.get("work_pool_name")), schema, schedules))
    return out
