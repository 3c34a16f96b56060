"""The CLI's error rule: a ScratchLMError (a user mistake) is one line on stderr and exit
code 2; any other exception is a bug and keeps its traceback."""

import argparse

import pytest

import scratchlm.cli as cli
from scratchlm.errors import NotFound, ScratchLMError


def _parser_raising(error: BaseException):
    def build():
        parser = cli.OneLineErrorParser(prog="scratchlm")
        sub = parser.add_subparsers(dest="command")
        p = sub.add_parser("boom")

        def run(args: argparse.Namespace):
            raise error
        p.set_defaults(func=run)
        return parser
    return build


@pytest.mark.parametrize("error", [ScratchLMError("bad value for --x\nsecond line"), NotFound("no such model: m")])
def test_user_mistake_is_one_line_and_exit_2(monkeypatch, capsys, error):
    monkeypatch.setattr(cli, "build_parser", _parser_raising(error))
    assert cli.main(["boom"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("scratchlm: error: ") and str(error).splitlines()[0] in err


@pytest.mark.parametrize("error", [ValueError("a bug"), TypeError("a bug"), KeyError("a bug")])
def test_a_bug_keeps_its_traceback(monkeypatch, error):
    monkeypatch.setattr(cli, "build_parser", _parser_raising(error))
    with pytest.raises(type(error)):
        cli.main(["boom"])


def test_every_domain_error_is_a_scratchlm_error():
    from scratchlm.chat import PromptFormatError
    from scratchlm.checkpoint import CheckpointError
    from scratchlm.config import ConfigError
    from scratchlm.finetune.instruct_data import DataError
    from scratchlm.lora import LoRAError
    from scratchlm.rag.errors import RagError
    from scratchlm.tokenizer.base import TokenizerError

    for cls in (PromptFormatError, CheckpointError, ConfigError, DataError, LoRAError, RagError, TokenizerError):
        assert issubclass(cls, ScratchLMError), cls
