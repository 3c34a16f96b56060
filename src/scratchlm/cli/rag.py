"""Transitional: the commands still registered by scratchlm.rag.cli (to move here)."""

from scratchlm.rag.cli import add_commands  # noqa: F401
