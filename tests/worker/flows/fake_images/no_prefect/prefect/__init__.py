"""Stands in for an image without Prefect: importing it fails as a missing package would."""

raise ModuleNotFoundError("No module named 'prefect'")
