"""``python -m spark_cli ...`` is the `spark` command."""

from spark_cli.main import app

app()
