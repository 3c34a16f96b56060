"""save_gguf: our model (and tokenizer) -> a GGUF file that llama.cpp and Ollama load.

What is written, for a model of one of arch.py's architectures (llama, qwen2, qwen3,
gemma3: the first whose fixed fields are the model's):

- metadata: ``<arch>.*`` (layers, widths, heads, head size, rope base, norm eps, context,
  Gemma's window), the tokenizer (vocab.py), ``general.file_type``;
- tensors under llama.cpp's names (arch.py): llama's q and k rows permuted to llama.cpp's
  rotary order, Gemma's norms as 1 + weight, matrices in the chosen type, norms and biases
  in F32 (llama.cpp reads them so), and ``rope_freqs.weight`` for Llama 3.1 rope scaling;
- no ``output.weight`` when the head is tied to the embedding.

Everything that can be refused (model shape, tokenizer, type) is checked before a byte is
written; the file is written to a temporary name beside the target and renamed, so an
error or a crash never leaves a half-written GGUF.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .arch import Architecture, architecture_for, layer_names, part_rows, permute_rows, rope_factors
from .container import GGUFError, _gguf
from .vocab import tokenizer_metadata

# --dtype -> (GGML type of the matrices, LlamaFileType name)
WEIGHT_TYPES = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
                "q8_0": ("Q8_0", "MOSTLY_Q8_0"), "q4_0": ("Q4_0", "MOSTLY_Q4_0"), "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
                "q5_0": ("Q5_0", "MOSTLY_Q5_0"), "q5_1": ("Q5_1", "MOSTLY_Q5_1")}


def check_exportable(config) -> Architecture:
    """The architecture ``config`` is written as; GGUFError for a model llama.cpp would run
    differently from ours (checked before anything is written)."""
    if not (config.positions == "rope" and config.norm == "rmsnorm" and config.mlp in ("swiglu", "geglu")):
        raise GGUFError("only Llama-shaped models (rope positions, rmsnorm, a gated MLP) can be written to GGUF; "
                        f"this one has {config.positions} positions, {config.norm} and {config.mlp}")
    if getattr(config, "n_experts", 0):
        raise GGUFError("mixture-of-experts models cannot be written to GGUF yet; export to Hugging Face instead")
    arch = architecture_for(config)
    if config.rope_scaling and arch.name != "llama":
        raise GGUFError(f"rope scaling is written to GGUF only for llama (rope_freqs); this model is {arch.name}")
    if arch.derived:  # what llama.cpp fixes in code must be what the model has
        values = {k: getattr(config, k) for k in ("n_layers", "d_model", "n_heads", "head_dim")}
        different = [f"{k}={getattr(config, k)!r} (llama.cpp's {arch.name} has {v!r})"
                     for k, v in arch.derived(values).items() if getattr(config, k) != v]
        if different:
            raise GGUFError(f"llama.cpp would run this model differently: {'; '.join(different)}")
    return arch


def save_gguf(model, tokenizer, path: str | os.PathLike, dtype: str = "f16", name: str | None = None) -> Path:
    """Write ``model`` (a Transformer) and ``tokenizer`` (or None) as a llama.cpp GGUF file.

    ``dtype``: the matrices' type: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0 or q5_1. A matrix
    whose rows are not whole blocks of a quantized type is written as f16."""
    gguf = _gguf()
    if dtype not in WEIGHT_TYPES:
        raise GGUFError(f"unknown GGUF weight type {dtype!r}; choose from: {', '.join(WEIGHT_TYPES)}")
    config = model.config
    arch = check_exportable(config)
    vocab = tokenizer_metadata(tokenizer, config.vocab_size) if tokenizer is not None else None
    path = Path(path)
    if path.is_dir():
        raise GGUFError(f"{path} is a directory; give the path of the .gguf file to write")
    if not path.parent.is_dir():
        raise GGUFError(f"{path.parent}: no such directory")
    weight_type = gguf.GGMLQuantizationType[WEIGHT_TYPES[dtype][0]]

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), arch=arch.name)
    try:
        _write_metadata(writer, gguf, arch, config, vocab, WEIGHT_TYPES[dtype][1], name)
        state = {k: v.detach() for k, v in model.state_dict().items()}
        for gguf_name, slot in layer_names(arch, config, with_bias=getattr(config, arch.bias_field)):
            w = state[slot.ours][part_rows(config, slot.part)].float().cpu()
            if slot.rotary_heads:
                w = permute_rows(w, getattr(config, slot.rotary_heads))
            if slot.shift:  # Gemma's norms: llama.cpp multiplies by the stored 1 + weight
                w = w + slot.shift
            _add_tensor(writer, gguf, gguf_name, w.contiguous(), weight_type)
        if config.rope_scaling:
            writer.add_tensor("rope_freqs.weight", rope_factors(config).float().numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return path


def _write_metadata(writer, gguf, arch: Architecture, config, vocab: dict | None, file_type: str,
                    name: str | None) -> None:
    writer.add_name(name or "scratchlm")
    writer.add_file_type(int(gguf.LlamaFileType[file_type]))
    if file_type not in ("ALL_F32", "MOSTLY_F16", "MOSTLY_BF16"):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    # The architecture's keys, from its table: sizes are u32, rope base and eps f32.
    for field_name, key in {**arch.config_keys, **arch.optional_keys}.items():
        value = getattr(config, field_name)
        if isinstance(value, float):
            writer.add_float32(f"{arch.name}.{key}", value)
        else:
            writer.add_uint32(f"{arch.name}.{key}", value)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_vocab_size(config.vocab_size)
    if vocab is None:
        return
    writer.add_tokenizer_model(vocab["model"])
    if "pre" in vocab:
        writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    if "merges" in vocab:
        writer.add_token_merges(vocab["merges"])
    if "scores" in vocab:
        writer.add_token_scores(vocab["scores"])
    if "add_space_prefix" in vocab:
        writer.add_add_space_prefix(vocab["add_space_prefix"])
    for key, add in (("bos_id", writer.add_bos_token_id), ("eos_id", writer.add_eos_token_id),
                     ("unk_id", writer.add_unk_token_id)):
        if key in vocab:
            add(vocab[key])
    # Our tokenizers add no bos by themselves; llama.cpp should not either (the chat template does).
    writer.add_add_bos_token(False)
    if "chat_template" in vocab:
        writer.add_chat_template(vocab["chat_template"])


def _add_tensor(writer, gguf, name: str, w: torch.Tensor, weight_type) -> None:
    """Matrices in ``weight_type`` (f16 where the rows are not whole blocks); vectors in F32."""
    Q = gguf.GGMLQuantizationType
    if w.dim() < 2 or weight_type == Q.F32:
        writer.add_tensor(name, w.numpy())
    elif weight_type == Q.F16:
        writer.add_tensor(name, w.half().numpy())
    elif weight_type == Q.BF16:  # torch rounds to nearest even, as ggml does
        writer.add_tensor(name, w.bfloat16().view(torch.uint8).numpy(), raw_dtype=Q.BF16)
    elif w.shape[-1] % gguf.GGML_QUANT_SIZES[weight_type][0]:
        writer.add_tensor(name, w.half().numpy())
    else:
        writer.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(w.numpy()), weight_type),
                          raw_dtype=weight_type)
