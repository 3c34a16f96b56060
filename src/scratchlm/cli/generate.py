"""Transitional: the commands still registered by scratchlm.generate (to move here)."""

from scratchlm.generate import add_commands  # noqa: F401
