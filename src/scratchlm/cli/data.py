"""Transitional: the commands still registered by scratchlm.data (to move here)."""

from scratchlm.data import add_commands  # noqa: F401
