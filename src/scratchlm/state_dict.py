"""A state dict into a model: the one way every loader builds a Transformer from weights.

``model_from_state_dict(config, state)``

1. builds the model on the **meta device**: shapes and dtypes, no memory, no random init;
2. checks ``state`` against it: missing and unexpected keys, shapes, dtypes; each problem is
   a ``CheckpointError`` that names the keys;
3. hands the tensors over as they are (``load_state_dict(assign=True)``): the weights are
   held once, never copied into a second, freshly initialised model;
4. ties the output head to the token embedding when the config says so;
5. rebuilds the tables that are not weights (rope cos/sin, sinusoids) on the weights' device.

scratchlm directories (checkpoint.load_model), Hugging Face ones (hf.load_hf) and in-memory
transformers models (hf.from_hf_model) all load through it.

>>> import torch
>>> from scratchlm import ModelConfig, Transformer
>>> config = ModelConfig.preset("gpt-tiny")
>>> state = Transformer(config).state_dict()
>>> model = model_from_state_dict(config, state)
>>> model.lm_head.weight is model.tok_emb.weight, model.tok_emb.weight.data_ptr() == state["tok_emb.weight"].data_ptr()
(True, True)
>>> del state["final_norm.weight"]
>>> model_from_state_dict(config, state, source="run/model.safetensors")
Traceback (most recent call last):
...
scratchlm.state_dict.CheckpointError: run/model.safetensors does not match its config: missing final_norm.weight
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from .config import ModelConfig
from .errors import ScratchLMError
from .model import DTYPES, Transformer


class CheckpointError(ScratchLMError):
    """A model directory that is missing, incomplete or corrupt."""


def model_from_state_dict(config: ModelConfig, state: Mapping[str, torch.Tensor], device: str | torch.device = "cpu",
                          dtype: torch.dtype | None = None, source: str = "the checkpoint") -> Transformer:
    """A Transformer of ``config`` holding the tensors of ``state`` (not copies of them).

    ``dtype``: the dtype to give the floating-point weights (each tensor that has another is
    converted, one at a time) and to record in the config; by default the config's own, and
    a tensor of another dtype is an error. Tensors not on ``device`` are moved there.
    ``source`` names the weights in error messages (e.g. the file they came from).
    """
    target = dtype if dtype is not None else DTYPES[config.dtype]
    config = config.replace(dtype=str(target).replace("torch.", ""))
    with torch.device("meta"):
        model = Transformer(config)  # shapes and dtypes only
    expected = model.state_dict()
    state = dict(state)
    if config.tie_embeddings:
        # One matrix both reads tokens in and writes them out: a stored head (HF writes one) is
        # the same matrix, or ignored as transformers ignores it.
        state.pop("lm_head.weight", None)
        if "tok_emb.weight" in state:
            state["lm_head.weight"] = state["tok_emb.weight"]
    _check(state, expected, source, convert=dtype is not None)
    device = torch.device(device)
    for key, tensor in state.items():
        want = expected[key].dtype if tensor.is_floating_point() else tensor.dtype
        if tensor.dtype != want or tensor.device != device:
            state[key] = tensor.to(device=device, dtype=want)  # only tensors that must change are copied
    if config.tie_embeddings:
        state["lm_head.weight"] = state["tok_emb.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight  # one Parameter, not two sharing storage
    model.reset_tables()  # the position tables were made on the meta device
    return model  # in training mode, as Transformer() makes it; loaders for inference call eval()


def _check(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: str, convert: bool) -> None:
    """CheckpointError naming the keys of ``state`` that do not fit the model's ``expected``."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = ([f"missing {_names(missing)}"] if missing else []) + \
                ([f"unexpected {_names(unexpected)}"] if unexpected else [])
        raise CheckpointError(f"{source} does not match its config: {'; '.join(parts)}")
    shapes = [k for k in expected if tuple(state[k].shape) != tuple(expected[k].shape)]
    if shapes:
        k = shapes[0]
        more = f" (and {len(shapes) - 1} more: {_names(shapes[1:])})" if len(shapes) > 1 else ""
        raise CheckpointError(f"{source}: shape mismatch for {k}: checkpoint {tuple(state[k].shape)}, "
                              f"config implies {tuple(expected[k].shape)}{more}")
    dtypes = [k for k in expected if state[k].dtype != expected[k].dtype
              and not (convert and state[k].is_floating_point() and expected[k].is_floating_point())]
    if dtypes:
        k = dtypes[0]
        raise CheckpointError(f"{source}: dtype mismatch for {_names(dtypes)}: checkpoint {state[k].dtype}, "
                              f"config implies {expected[k].dtype}")


def _names(keys: list[str], limit: int = 3) -> str:
    """'a, b, c and 4 more'"""
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def read_json(path: Path) -> dict:
    """A JSON file of a model directory; a missing or broken one is a CheckpointError."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"missing file: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


__all__ = ["CheckpointError", "model_from_state_dict", "read_json"]
