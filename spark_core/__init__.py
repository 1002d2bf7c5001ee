"""SPARK science and data plane. Pure Python + torch/transformers/pyarrow: no Prefect import here."""

__version__ = "0.1.0"
