"""Prefect tasks: thin wrappers over `spark_core.stages`, one module per stage.

They take the config, the store URI, the run id and the iteration, and return small JSON-able summaries
(URIs, row counts, metrics): tables never travel through Prefect. See `tasks.common` for timeouts, retries
and why tasks carry no tags.
"""
