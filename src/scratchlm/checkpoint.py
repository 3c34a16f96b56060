"""Save and load a model directory, atomically.

A model directory holds:

    config.json         ModelConfig
    model.safetensors   the weights (safetensors: loading never unpickles anything)
    tokenizer files     whatever the tokenizer's save(dir) writes (see tokenizer/)
    train_state.pt      optional: optimizer, step, RNG and data position (train.py)
    + any extra files   e.g. metrics, generation settings

Atomic: everything is written into a temporary sibling directory first, then swapped in
with renames. A crash at any moment leaves either the old checkpoint or the new one,
never half of one (a crash between the two renames leaves ``<dir>.old``, which
``load_model`` falls back to).

>>> import tempfile, torch
>>> from scratchlm import ModelConfig, Transformer
>>> model = Transformer(ModelConfig.preset("gpt-tiny"))
>>> d = tempfile.mkdtemp() + "/run"
>>> _ = save_model(d, model)
>>> again, tokenizer = load_model(d)
>>> torch.equal(again.tok_emb.weight, model.tok_emb.weight), tokenizer is None
(True, True)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ConfigError, ModelConfig
from .errors import ScratchLMError
from .model import DTYPES, Transformer


class CheckpointError(ScratchLMError):
    """A model directory that is missing, incomplete or corrupt."""


def _unique_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with a tied matrix stored once (safetensors refuses shared storage)."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if getattr(model, "config", None) is not None and model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return state


def save_model(path: str | os.PathLike, model: Transformer, tokenizer=None,
               extra: Optional[Callable[[Path], None]] = None,
               state: Optional[dict[str, torch.Tensor]] = None) -> Path:
    """Write config, weights and tokenizer (and whatever ``extra(tmp_dir)`` writes) atomically.

    ``state``: the weights to write instead of ``model.state_dict()``, e.g. the full state
    gathered from a sharded (FSDP) model; ``model`` then only supplies ``model.config``.
    """
    with atomic_directory(path) as tmp:
        model.config.save(tmp / "config.json")
        if state is None:
            state = _unique_state(model)
        else:
            state = {k: v.detach().contiguous() for k, v in state.items()}
            if model.config.tie_embeddings:
                state.pop("lm_head.weight", None)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp)
        if extra is not None:
            extra(tmp)
    return Path(path)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Write a directory all at once: the block fills a temporary sibling, which then
    replaces ``path`` (see _swap_in); if the block fails, ``path`` is left as it was.

    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "out"
    >>> with atomic_directory(target) as tmp:
    ...     _ = (tmp / "a.txt").write_text("hello")
    >>> (target / "a.txt").read_text()
    'hello'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        _swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(tmp: Path, path: Path) -> None:
    """Replace directory ``path`` by ``tmp``: rename old away, rename new in, delete old."""
    old = path.parent / f"{path.name}.old"
    if old.exists():
        shutil.rmtree(old)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def resolve_dir(path: str | os.PathLike) -> Path:
    """The directory to load: ``path``, or ``path.old`` left by a crash mid-swap."""
    path = Path(path)
    if not path.exists():
        old = path.parent / f"{path.name}.old"
        if old.exists():
            return old
        raise CheckpointError(f"model directory not found: {path}")
    if not path.is_dir():
        raise CheckpointError(f"not a model directory: {path}")
    return path


def load_config(path: str | os.PathLike) -> ModelConfig:
    path = resolve_dir(path)
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path} has no config.json: not a scratchlm model directory")
    try:
        return ModelConfig.load(path / "config.json")
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{path / 'config.json'}: {e}") from None


def load_model(path: str | os.PathLike, device="cpu", dtype: Optional[torch.dtype] = None,
               with_tokenizer: bool = True):
    """(model, tokenizer or None) from a model directory. Raises CheckpointError with one
    clear line for a missing, partial or corrupt directory."""
    path = resolve_dir(path)
    config = load_config(path)
    weights = path / "model.safetensors"
    if not weights.exists():
        raise CheckpointError(f"{path} has no model.safetensors")
    try:
        state = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{weights} is corrupt or truncated ({str(e).splitlines()[0]})") from None
    with torch.device("meta"):
        model = Transformer(config)
    # Take the tensors as they are (no second copy); then rebuild the non-persistent tables.
    model = model.to_empty(device=device)
    if config.tie_embeddings:
        state.setdefault("lm_head.weight", state.get("tok_emb.weight"))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{weights} does not match config.json (missing: {missing[:3]}, unexpected: {unexpected[:3]})")
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise CheckpointError(f"{weights}: {k} has shape {tuple(v.shape)}, config.json implies {tuple(expected[k].shape)}")
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    model.reset_tables()
    if dtype is not None:
        model.to(dtype)
    model.eval()
    tokenizer = None
    if with_tokenizer:
        from .tokenizer import load_tokenizer  # noqa: WPS433 (import here: tokenizer files are optional)

        tokenizer = load_tokenizer(path)
    return model, tokenizer


TRAIN_STATE = "train_state.pt"


def save_train_state(directory: Path, state: dict) -> None:
    """Write ``train_state.pt`` (optimizer state, step, RNG states, data position...) into
    ``directory``: meant as the ``extra`` of ``save_model``, so it is part of the atomic swap.
    Only tensors, numbers, strings, lists and dicts: loadable with ``weights_only=True``."""
    torch.save(state, Path(directory) / TRAIN_STATE)


def load_train_state(path: str | os.PathLike) -> dict:
    """The training state of a model directory; CheckpointError if missing or corrupt."""
    path = resolve_dir(path)
    file = path / TRAIN_STATE
    if not file.exists():
        raise CheckpointError(f"{path} has no {TRAIN_STATE}: nothing to resume from")
    try:
        # weights_only: tensors and plain containers only, never arbitrary pickled objects.
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - zip, pickle and unpickler errors all mean "corrupt"
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{file} is corrupt or truncated ({first[:200]})") from None


def read_json(path: Path) -> dict:
    """A JSON file of a model directory; a missing or broken one is a CheckpointError."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"missing file: {path}") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


__all__ = ["CheckpointError", "save_model", "load_model", "load_config", "resolve_dir", "DTYPES",
           "save_train_state", "load_train_state", "read_json", "atomic_directory"]
