"""Prefect flows: one SPARK iteration (`flows.iteration.spark_iteration`), a whole resumable run
(`flows.run.spark_run`), and the `spark` command line (`flows.cli`)."""
