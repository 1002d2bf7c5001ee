"""What the browser tests open: the integration suite's reference tiny iteration, on its stack (conftest.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from deployments.deploy import Deployed
from infra.local import Stack


@dataclass(frozen=True)
class UiRun:
    stack: Stack
    api: str  # http://127.0.0.1:PORT/api
    ui: str  # http://127.0.0.1:PORT
    deployments: dict[str, Deployed]
    run_id: str
    flow_run: dict[str, Any]
