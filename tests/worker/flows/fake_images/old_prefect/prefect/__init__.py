"""Stands in for an image whose Prefect is of another minor version."""

__version__ = "2.20.0"
