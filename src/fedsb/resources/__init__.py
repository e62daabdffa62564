"""Embedded default configs (read with importlib.resources)."""
