"""`scratchlm <command>`: one argparse parser; every command's parsing lives in this package.

Each module here is one command group (``cli/train.py``: train, demo; ``cli/generate.py``:
generate, chat; ...). It defines ``add_commands(subparsers)``, which adds its sub-parsers
and sets ``func`` on each to the function that runs it (taking the parsed args and
returning an exit code or None). Library code lives outside this package and holds no
argparse; the modules here import it inside those functions, so `scratchlm --help` stays
fast.

A user mistake (a ``ScratchLMError``: missing file, bad value, unknown preset...) ends with
one line on stderr and exit code 2, never a traceback (set SCRATCHLM_DEBUG=1 to see one).
Any other exception is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Modules that register commands, in the order they appear in --help.
COMMAND_MODULES = [
    "scratchlm.cli.tokenizer",  # tokenizer train / encode
    "scratchlm.cli.data",  # prepare
    "scratchlm.cli.train",  # train, demo
    "scratchlm.cli.generate",  # generate, chat
    "scratchlm.cli.convert",  # convert, export
    "scratchlm.cli.finetune",  # finetune instruct|classify, classify, merge-lora
    "scratchlm.cli.posttrain",  # posttrain dpo | grpo
    "scratchlm.cli.serve",  # serve
    "scratchlm.cli.rag",  # rag index|ask
    "scratchlm.cli.eval",  # eval
]


class UsageError(Exception):  # noqa: N818
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
    from .. import __version__

    return __version__


def _report_native_crashes() -> None:
    """A crash in native code (SIGSEGV; SIGBUS from a memory-mapped file that shrank) prints
    the Python stack where it happened instead of nothing."""
    import faulthandler

    try:
        faulthandler.enable()
    except (AttributeError, ValueError, OSError):  # stderr is not a real file (captured, closed)
        pass


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean the user asked for something that cannot be done."""
    from ..errors import ScratchLMError

    # An OSError (permission denied, no space left, a path that vanished) is the file
    # system's answer about the user's files, not a bug: one line too. A plain ValueError,
    # TypeError, ... is a bug and shows its traceback.
    return (UsageError, ScratchLMError, OSError)


def main(argv: list[str] | None = None) -> int:
    _report_native_crashes()
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

