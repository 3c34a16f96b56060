"""Transitional: the commands still registered by scratchlm.train (to move here)."""

from scratchlm.train import add_commands  # noqa: F401
