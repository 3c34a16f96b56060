"""`scratchlm <command>`: one argparse parser; each feature module registers its own commands.

A module that offers commands defines ``add_commands(subparsers)``, which adds its
sub-parsers and sets ``func`` on each to the function that runs it (taking the parsed
args and returning an exit code or None). Modules import their heavy or optional
dependencies inside those functions, so `scratchlm --help` stays fast.

A user mistake (missing file, bad value, unknown preset...) ends with one line on stderr
and exit code 2, never a traceback (set SCRATCHLM_DEBUG=1 to see one).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Modules that register commands, in the order they appear in --help.
COMMAND_MODULES = [
    "scratchlm.tokenizer.cli",  # tokenizer train / encode
    "scratchlm.data",  # prepare
    "scratchlm.train",  # train, demo
    "scratchlm.generate",  # generate, chat
    "scratchlm.hf",  # convert, export
    "scratchlm.finetune",  # finetune instruct|classify, merge-lora
    "scratchlm.serve",  # serve
    "scratchlm.rag.cli",  # rag index|ask
]


class UsageError(Exception):
    """A mistake in how the command was called: reported in one line, exit code 2."""


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr (and exit code 2), not usage + error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    # Sub-parsers are made with the class of their parent, so every command gets one-line errors.
    parser = OneLineErrorParser(prog="scratchlm", description="GPT-2 and Llama from scratch: "
                                     "tokenize, train, generate, fine-tune, serve, retrieve.")
    parser.add_argument("--version", action="version", version=f"scratchlm {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("scratchlm"):
                continue  # that part of scratchlm is not there (yet)
            raise
        if hasattr(module, "add_commands"):
            module.add_commands(sub)
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean the user asked for something that cannot be done."""
    from .checkpoint import CheckpointError
    from .config import ConfigError

    return (UsageError, ConfigError, CheckpointError, FileNotFoundError, NotADirectoryError,
            IsADirectoryError, PermissionError, ValueError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        code = args.func(args)
    except KeyboardInterrupt:
        print("scratchlm: interrupted", file=sys.stderr)
        return 130
    except user_errors() as e:
        if os.environ.get("SCRATCHLM_DEBUG"):
            raise  # the full traceback, for developers
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"scratchlm: error: {message}", file=sys.stderr)
        return 2
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
