"""tuneloop — the shared core: CLI, typed config, settings, DuckDB schema and registry."""

__version__ = "0.1.0"
