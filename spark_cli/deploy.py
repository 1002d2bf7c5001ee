"""`spark deploy`: register the `spark-run` and `spark-iteration` deployments on the current Prefect server.

    . .spark-stack/env.sh        # PREFECT_API_URL of the local stack (see `spark stack up`)
    spark deploy                 # both deployments; the work pool is created if missing
    spark deploy --name spark-iteration
"""

from __future__ import annotations

import os
from typing import Optional

import typer

from deployments.deploy import PREFECT_FILE, DeployError, deploy
from flows.common import STORE_ENV

deploy_app = typer.Typer(help="Register the SPARK deployments (deployments/prefect.yaml) on a Prefect server.")


@deploy_app.callback(invoke_without_command=True)
def deploy_command(
    name: Optional[list[str]] = typer.Option(None, "--name", help="Only this deployment (repeatable)."),
    api_url: Optional[str] = typer.Option(None, help="Prefect API URL (default: $PREFECT_API_URL)."),
) -> None:
    """Create the process work pool if missing and register the deployments against PREFECT_API_URL."""
    try:
        deployed = deploy(api_url=api_url, names=name)
    except DeployError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    for d in deployed:
        params = ", ".join(d.parameter_schema.get("properties", {}))
        typer.echo(f"{d.name:<34} id {d.id}  pool {d.work_pool}  schedules {d.schedules}  parameters: {params}")
    store = os.environ.get(STORE_ENV)
    where = (f"their store is the worker's SPARK_STORE={store}" if store else
             "their store is the worker's $SPARK_STORE (unset here: load the stack's env.sh), else ./spark-store")
    typer.echo(
        f"Registered from {PREFECT_FILE}; {where}.\n"
        "Start a run in the UI: Run > Custom run, choose a preset, change only what you need under overrides.\n"
        "Continue an existing run with just its id: "
        "prefect deployment run spark-iteration/spark-iteration --param run_id=RUN"
    )
