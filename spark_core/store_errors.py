"""Errors of the object store and its run lease, and the credential redaction every message goes through."""

from __future__ import annotations

import os
import re


class StoreError(RuntimeError):
    """A storage problem, with any credential redacted from the message."""


class RunLockedError(StoreError):
    """Another process holds the run's lease."""


def redact(text: str) -> str:
    """Remove credential values (from the AWS_* environment) and URL user-info from a message."""
    for var in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN"):
        value = os.environ.get(var)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    # scheme://user:password@host -> scheme://***@host
    return re.sub(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@]+@", r"\1***@", text)
