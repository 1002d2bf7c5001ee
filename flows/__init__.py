"""Prefect flows: one SPARK iteration (`flows.iteration.spark_iteration`), a whole resumable run
(`flows.run.spark_run`), and the plain resolving and guarding they share; the `spark` command line is `spark_cli`."""
