"""Transitional: the commands still registered by scratchlm.finetune.cli (to move here)."""

from scratchlm.finetune.cli import add_commands  # noqa: F401
