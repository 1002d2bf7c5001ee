"""Local stack for development and integration tests: SeaweedFS S3, Prefect server, process worker.

See `infra/local/README.md` and `infra.local.stack`.
"""

from infra.local.stack import (
    COMPONENTS,
    DEFAULT_STATE_DIR,
    WORK_POOL,
    ComponentStatus,
    Stack,
    StackError,
    StackSettings,
    ensure_work_pool,
    free_port,
)

__all__ = [
    "COMPONENTS",
    "DEFAULT_STATE_DIR",
    "WORK_POOL",
    "ComponentStatus",
    "Stack",
    "StackError",
    "StackSettings",
    "ensure_work_pool",
    "free_port",
]
