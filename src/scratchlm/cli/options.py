"""Command-line options generated from a config dataclass: one ``--option`` per field.

Every field ``some_name`` is ``--some_name`` and ``--some-name`` (plus the aliases its
``option(...)`` names); a bool is ``--flag`` (true), ``--flag false`` and ``--no-flag``
(in a command with a positional argument, only ``--flag`` and ``--no-flag``, so that
``--lora MODEL`` does not read MODEL as the flag's value);
an optional value takes ``none``; a dict takes JSON. Defaults stay out of the namespace
(``SUPPRESS``), so that a ``--config`` file's value is overridden only by an option that
was actually given; the config class then checks every value (config.py), so a bad value
is the same one-line ConfigError from a file or from the command line.

>>> import argparse
>>> from scratchlm.train import LoopConfig
>>> p = argparse.ArgumentParser()
>>> add_config_options(p, LoopConfig)
>>> cfg = config_from_args(LoopConfig, p.parse_args(["--max-steps", "5", "--no-progress", "--lr", "0.01"]))
>>> cfg.max_steps, cfg.progress, cfg.lr
(5, False, 0.01)
"""

from __future__ import annotations

import argparse
import json
import types
from dataclasses import MISSING, fields
from typing import Any, Literal, Union, get_args, get_origin

from ..train.config import field_aliases, field_help, field_types


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _text_parser(annotation: Any) -> tuple[Any, str]:
    """(function from the option's text to a value, metavar) for a field's annotation."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        parse, metavar = _text_parser(inner[0]) if len(inner) == 1 else (str, "VALUE")

        def parse_or_none(text: str):
            return None if text.lower() == "none" else parse(text)

        parse_or_none.__name__ = getattr(parse, "__name__", "value")  # argparse names it in errors
        return parse_or_none, metavar
    if origin is Literal:
        return str, "{" + ",".join(str(a) for a in args) + "}"
    kind = {int: int, float: float, str: str, bool: parse_bool, dict: parse_dict}.get(origin or annotation, str)
    return kind, getattr(origin or annotation, "__name__", "value").upper()


def add_config_options(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One option (or positional argument) per field of config class ``cls``."""
    hints = field_types(cls)
    plain_flags = any(f.metadata.get("positional") for f in fields(cls))
    for f in fields(cls):
        if f.name in skip:
            continue
        annotation = hints[f.name]
        parse, metavar = _text_parser(annotation)
        default = f.default if f.default is not MISSING else None
        text = field_help(cls, f.name).replace("%", "%%")
        if f.metadata.get("positional"):
            parser.add_argument(f.name, nargs="?", type=parse, default=argparse.SUPPRESS, metavar=f.name.upper(),
                                help=text)
            continue
        names = [f.name, *[a.lstrip("-") for a in field_aliases(cls, f.name)]]
        flags = []
        for name in names:
            flags += [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        help_text = f"{text} (default: {default!r})"
        if annotation is bool and plain_flags:
            parser.add_argument(*flags, dest=f.name, action="store_true", default=argparse.SUPPRESS, help=help_text)
            parser.add_argument(f"--no-{f.name.replace('_', '-')}", dest=f.name, action="store_false",
                                default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        elif annotation is bool:
            parser.add_argument(*flags, dest=f.name, type=parse_bool, nargs="?", const=True, default=argparse.SUPPRESS,
                                metavar="BOOL", help=help_text)
            parser.add_argument(f"--no-{f.name.replace('_', '-')}", dest=f.name, action="store_false",
                                default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        else:
            parser.add_argument(*flags, dest=f.name, type=parse, default=argparse.SUPPRESS, metavar=metavar,
                                help=help_text)


def config_from_args(cls: type, args: argparse.Namespace, **fixed):
    """The config: the class's defaults, then ``--config FILE``, then the options given."""
    names = {f.name for f in fields(cls)}
    given = {k: v for k, v in vars(args).items() if k in names}
    given.update(fixed)
    if getattr(args, "config", None):
        return cls.from_file(args.config, **given)
    return cls.from_dict(given, source="command line")


def add_config_file_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="YAML or TOML file of options; options given here override it (default: none)")


__all__ = ["add_config_options", "add_config_file_option", "config_from_args", "parse_bool", "parse_dict"]
