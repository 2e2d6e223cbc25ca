"""The package version: pyproject.toml reads it, every config absvl writes carries it (``absvl_version``)."""

__version__ = "0.3.0"
