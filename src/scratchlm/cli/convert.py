"""Transitional: the commands still registered by scratchlm.hf (to move here)."""

from scratchlm.hf import add_commands  # noqa: F401
