"""Transitional: the commands still registered by scratchlm.serve (to move here)."""

from scratchlm.serve import add_commands  # noqa: F401
