"""The one config mechanism of every command: typed dataclasses, filled from a YAML/TOML
file and ``--key value`` options.

A config is a dataclass deriving from ``Config``. Each field's type annotation is the
check: ``int``, ``float`` (finite: ``nan`` and ``inf`` are refused), ``bool``, ``str``,
``dict``, ``list``, ``Literal[...]`` and optional forms (``int | None``, ``Optional[int]``).
``from_dict`` refuses unknown keys; every construction checks types and then runs the
config's own ``validate``. ``LoopConfig`` holds the fields every training loop has; a task
config extends it and sets its own defaults by declaring a field again.

>>> from typing import Literal
>>> @dataclass
... class Toy(Config):
...     steps: int | None = option(None, "steps, or none")
...     kind: Literal["a", "b"] = option("a", "which kind")
>>> Toy.from_dict({"steps": 3, "kind": "b"})
Toy(steps=3, kind='b')
>>> Toy.from_dict({"kind": "c"})
Traceback (most recent call last):
...
scratchlm.errors.ConfigError: config: kind must be one of 'a', 'b', got 'c'
>>> LoopConfig.from_dict({"lr": float("inf")})
Traceback (most recent call last):
...
scratchlm.errors.ConfigError: config: lr must be a finite number, got inf
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from ..errors import ConfigError, NotFound

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as a package
    import tomli as tomllib  # type: ignore[no-redef]


def option(default: Any, help: str | None = None, *, aliases: tuple[str, ...] = (), positional: bool = False):
    """A config field with its command-line help. A subclass that only changes the default
    may leave ``help`` out: the help of the base class's field is used."""
    metadata = {"aliases": tuple(aliases), "positional": positional}
    if help is not None:
        metadata["help"] = help
    return field(default=default, metadata=metadata)


def field_types(cls: type) -> dict[str, Any]:
    """The evaluated annotation of every field (``from __future__ import annotations``
    leaves strings; ``get_type_hints`` turns them into types, base classes included)."""
    return get_type_hints(cls, include_extras=False)


def field_help(cls: type, name: str) -> str:
    """The help line of a field: the first class in the MRO that gives one."""
    for klass in cls.__mro__:
        f = getattr(klass, "__dataclass_fields__", {}).get(name)
        if f is not None and "help" in f.metadata:
            return f.metadata["help"]
    return ""


def field_aliases(cls: type, name: str) -> tuple[str, ...]:
    """The other option names of a field: the first class in the MRO that gives some."""
    for klass in cls.__mro__:
        f = getattr(klass, "__dataclass_fields__", {}).get(name)
        if f is not None and f.metadata.get("aliases"):
            return f.metadata["aliases"]
    return ()


def describe_type(annotation: Any) -> str:
    """int, float, str, bool, dict, 'a' | 'b', int or none, ..."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):
        inner = [describe_type(a) for a in args if a is not type(None)]
        return " or ".join(inner) + (" or none" if type(None) in args else "")
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is not None:
        return getattr(origin, "__name__", str(origin))
    return getattr(annotation, "__name__", str(annotation))


def check_value(key: str, annotation: Any, value: Any, source: str = "config") -> Any:
    """``value`` if it is of type ``annotation`` (an int is accepted, and converted, where
    a float is wanted); otherwise a ConfigError naming the source and the key."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return check_value(key, arg, value, source)
            except ConfigError as e:
                if "finite" in str(e):  # the right type, a bad value: say that, not "must be float or none"
                    raise
        raise ConfigError(f"{source}: {key} must be {describe_type(annotation)}, got {value!r}")
    if origin is Literal:
        if value in args and not isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: {key} must be one of {', '.join(repr(a) for a in args)}, got {value!r}")
    base = origin or annotation
    if base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{source}: {key} must be a finite number, got {value!r}")
            return float(value)
    elif base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif base in (bool, str, dict, list):
        if isinstance(value, base):
            return value
    elif base is Any:
        return value
    else:  # an annotation this mechanism does not know: a bug in the config class
        raise TypeError(f"config field {key}: unsupported annotation {annotation!r}")
    raise ConfigError(f"{source}: {key} must be {describe_type(annotation)}, got {value!r}")


def read_config_file(path: str | os.PathLike) -> dict:
    """A YAML (.yaml/.yml) or TOML (.toml) file as a dict."""
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"config file not found: {path}")
    if path.suffix not in (".toml", ".yaml", ".yml"):
        raise ConfigError(f"{path}: config files are .yaml, .yml or .toml")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text (byte {e.start}): not a config file") from None
    if path.suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: {e}".splitlines()[0]) from None
    elif path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    else:
        raise ConfigError(f"{path}: config files are .yaml, .yml or .toml")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value")
    return data


class Config:
    """Base of every config dataclass: type checks at construction, dict and file I/O."""

    command: typing.ClassVar[str] = "scratchlm"  # named in the "unknown option" message

    def __post_init__(self):
        hints = field_types(type(self))
        for f in fields(self):
            setattr(self, f.name, check_value(f.name, hints[f.name], getattr(self, f.name)))
        self.validate()

    def validate(self) -> None:
        """Checks that need more than one field; raise ConfigError."""

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config"):
        """Build from a mapping; unknown keys and values of the wrong type are ConfigErrors."""
        data, known = dict(data), {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown option(s): {', '.join(unknown)} (see `{cls.command} --help`)")
        hints = field_types(cls)
        for key, value in data.items():
            data[key] = check_value(key, hints[key], value, source)
        try:
            return cls(**data)
        except ConfigError as e:
            message = str(e)
            raise ConfigError(message if message.startswith(source) else f"{source}: {message}") from None

    @classmethod
    def from_file(cls, path: str | os.PathLike, **overrides):
        """The file's options, then ``overrides`` (e.g. the command line) on top."""
        return cls.from_dict({**read_config_file(path), **overrides}, source=str(path))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


def task_list(text: str | None) -> list[str]:
    """The task specs of an ``eval_tasks`` option: comma-separated, blanks dropped.

    >>> task_list("python-docs:val, tasks/yesno.jsonl,")
    ['python-docs:val', 'tasks/yesno.jsonl']
    """
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def need(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def positive_ints(config, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        need(value is None or value > 0, f"{name} must be a positive integer, got {value!r}")


Precision = Literal["auto", "bf16", "fp32"]
MAX_THREADS = 1024  # OpenMP allocates per thread: a typo of 10**9 threads asks for 216 GB
MAX_GRAD_ACCUM = 2**16  # far past any real run (a step of 65,536 micro-batches); a typo beyond it never ends


@dataclass
class LoopConfig(Config):
    """What every training loop reads (train/core.py). Task configs extend it."""

    out_dir: str = option("runs/train", "run folder: metrics.jsonl, loss.png, latest/ and best/ checkpoints",
                          aliases=("--out",))
    # how long
    max_steps: int | None = option(None, "optimizer steps; the cosine schedule ends here (wins over epochs)")
    epochs: float | None = option(None, "passes over the training set, when max_steps is none")
    max_minutes: float | None = option(None, "time budget: stop after this many minutes; the schedule "
                                       "then runs on elapsed time (whichever of steps/time ends first)")
    stop_at_step: int | None = option(None, "stop (with a checkpoint) after this step, keeping the schedule "
                                      "of max_steps: a run in several pieces")
    # optimization
    batch_size: int = option(16, "examples (windows) per micro-batch, per process")
    grad_accum: int = option(1, "micro-batches per optimizer step (gradient accumulation)")
    lr: float = option(1e-3, "peak learning rate, reached after warmup")
    min_lr: float = option(1e-4, "learning rate at the end of the cosine decay")
    warmup_steps: int = option(100, "steps of linear warmup from lr/warmup_steps to lr")
    weight_decay: float = option(0.1, "AdamW weight decay on matrices (never on biases, norms, embeddings)")
    beta1: float = option(0.9, "AdamW beta1 (momentum)")
    beta2: float = option(0.95, "AdamW beta2 (second-moment decay)")
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0: no clipping)")
    # precision, devices, processes
    precision: Precision = option("auto", "'auto' (bf16 autocast where the hardware has fast bf16, else fp32), "
                                  "'bf16' or 'fp32'")
    device: str = option("auto", "'auto' (cuda if present, else cpu), 'cpu', 'cuda', 'cuda:1', 'mps'")
    compile: bool = option(False, "torch.compile the model")
    threads: int | None = option(None, "CPU threads for torch (default: torch's choice)")
    distributed: Literal["ddp", "fsdp"] = option("ddp", "under torchrun: 'ddp' (replicate the model) or "
                                                 "'fsdp' (shard it, FSDP2)")
    # evaluation, logging, checkpoints
    eval_every: int = option(100, "evaluate every N steps (and at the end)")
    eval_tasks: str | None = option(None, "comma-separated `scratchlm eval` tasks (files, corpora, humaneval...) "
                                    "to score the model on at the end of training; the report goes to "
                                    "out_dir/eval, the scores to metrics.jsonl")
    eval_tasks_every: int | None = option(None, "also score eval_tasks every N steps (out_dir/eval/step-N); "
                                          "default: only at the end")
    log_every: int = option(10, "write the train loss and tokens/s every N steps (the only host sync)")
    save_every: int = option(500, "write latest/ every N steps (and always at the end)")
    seed: int = option(1337, "seed of the initial weights, the batches and dropout")
    resume: bool = option(False, "continue out_dir/latest exactly: weights, optimizer, schedule, RNG, data")
    progress: bool = option(True, "show a progress bar")
    plot: bool = option(True, "write loss.png at the end")

    def validate(self) -> None:
        positive_ints(self, "batch_size", "grad_accum", "eval_every", "log_every", "save_every", "max_steps",
                      "threads", "eval_tasks_every")
        need(self.eval_tasks is None or bool(task_list(self.eval_tasks)),
             f"eval_tasks names no task: {self.eval_tasks!r}")
        need(self.eval_tasks_every is None or self.eval_tasks is not None, "eval_tasks_every needs eval_tasks")
        need(self.threads is None or self.threads <= MAX_THREADS,
             f"threads must be at most {MAX_THREADS:,}, got {self.threads!r}")
        need(0 <= self.seed < 2**32, f"seed must be between 0 and 2**32 - 1, got {self.seed}")
        need(self.grad_accum <= MAX_GRAD_ACCUM, f"grad_accum must be at most {MAX_GRAD_ACCUM:,} micro-batches per "
             f"step, got {self.grad_accum:,} (one step would never end)")
        need(self.max_steps is not None or self.epochs is not None, "set max_steps or epochs")
        need(self.epochs is None or self.epochs > 0, f"epochs must be > 0, got {self.epochs}")
        need(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        need(self.lr > 0 and 0 <= self.min_lr <= self.lr,
             f"need 0 <= min_lr <= lr and lr > 0, got lr={self.lr}, min_lr={self.min_lr}")
        need(self.max_minutes is None or self.max_minutes > 0, f"max_minutes must be > 0, got {self.max_minutes}")
        need(self.stop_at_step is None or self.stop_at_step >= 0, f"stop_at_step must be >= 0, got {self.stop_at_step}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, f"beta1 and beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")
        need(self.grad_clip >= 0, f"grad_clip must be >= 0, got {self.grad_clip}")


__all__ = ["Config", "LoopConfig", "option", "check_value", "task_list", "field_types", "field_help", "field_aliases", "describe_type",
           "read_config_file", "need", "positive_ints", "ConfigError"]
