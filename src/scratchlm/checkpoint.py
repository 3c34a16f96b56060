"""Save and load a model directory, atomically.

A model directory holds:

    config.json         ModelConfig
    model.safetensors   the weights (safetensors: loading never unpickles anything)
    tokenizer files     whatever the tokenizer's save(dir) writes (see tokenizer/)
    train_state.pt      optional: optimizer, step, RNG and data position (train.py)
    + any extra files   e.g. metrics, generation settings

Atomic (atomic.py): everything is written into a temporary sibling directory first, then
swapped in with renames. A crash at any moment leaves either the old checkpoint or the new
one, never half of one (a crash between the two renames leaves ``<dir>.old``, which
``load_model`` falls back to). A save replaces only a model folder of ours (or an empty
one), never a user's folder, a file, or one of the ``inputs`` it was made from.

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

import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .atomic import MODEL_FILES, atomic_directory, saved_dir
from .config import ConfigError, ModelConfig
from .model import DTYPES, Transformer
from .state_dict import CheckpointError, model_from_state_dict, read_json


def _unique_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with a tied matrix stored once (safetensors refuses shared storage)."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if getattr(model, "config", None) is not None and model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return state


def save_model(path: str | os.PathLike, model: Transformer, tokenizer=None,
               extra: Callable[[Path], None] | None = None,
               state: dict[str, torch.Tensor] | None = None, inputs: Iterable = ()) -> Path:
    """Write config, weights and tokenizer (and whatever ``extra(tmp_dir)`` writes) atomically.

    ``state``: the weights to write instead of ``model.state_dict()``, e.g. the full state
    gathered from a sharded (FSDP) model; ``model`` then only supplies ``model.config``.
    ``inputs``: the paths the model was read from, which ``path`` must not replace.
    An OutputError (before anything is written) when ``path`` is a file, a folder that is
    not a model folder, or one of ``inputs``.
    """
    with atomic_directory(path, marker=MODEL_FILES, inputs=inputs) as tmp:
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


def resolve_dir(path: str | os.PathLike) -> Path:
    """The directory to load: ``path``, or ``path.old`` left by a crash mid-swap."""
    found = saved_dir(path)
    if found is None:
        raise CheckpointError(f"model directory not found: {path}")
    path = found
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


def load_model(path: str | os.PathLike, device="cpu", dtype: torch.dtype | None = None,
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
    model = model_from_state_dict(config, state, device=device, dtype=dtype, source=str(weights))
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


__all__ = ["CheckpointError", "save_model", "load_model", "load_config", "resolve_dir", "DTYPES",
           "save_train_state", "load_train_state", "read_json", "atomic_directory"]
