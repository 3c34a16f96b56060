"""Transitional: the commands still registered by scratchlm.tokenizer.cli (to move here)."""

from scratchlm.tokenizer.cli import add_commands  # noqa: F401
