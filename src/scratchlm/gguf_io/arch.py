"""llama.cpp's architectures as tables: metadata keys -> ModelConfig, tensor names -> ours.

One entry per ``general.architecture`` (llama, qwen2, qwen3, gemma3). An entry says which
metadata key holds each ModelConfig field (prefixed by the architecture:
``llama.block_count``), the fixed choices of the family (norm, MLP, positions, QK-norm...),
and where each GGUF tensor goes in our model::

    GGUF                            scratchlm
    token_embd.weight               tok_emb.weight
    blk.{i}.attn_norm.weight        blocks.{i}.attn_norm.weight
    blk.{i}.attn_{q,k,v}.weight     blocks.{i}.attn.qkv_proj.weight   (rows q | k | v)
    blk.{i}.attn_{q,k,v}.bias       blocks.{i}.attn.qkv_proj.bias     (qwen2; llama: every bias)
    blk.{i}.attn_{q,k}_norm.weight  blocks.{i}.attn.{q,k}_norm.weight (qwen3, gemma3)
    blk.{i}.attn_output.weight      blocks.{i}.attn.out_proj.weight
    blk.{i}.post_attention_norm     blocks.{i}.attn_post_norm         (gemma3)
    blk.{i}.ffn_norm.weight         blocks.{i}.mlp_norm.weight
    blk.{i}.ffn_{gate,up,down}      blocks.{i}.mlp.{gate,up,down}_proj.weight
    blk.{i}.post_ffw_norm.weight    blocks.{i}.mlp_post_norm.weight   (gemma3)
    output_norm.weight              final_norm.weight
    output.weight                   lm_head.weight    (absent: tied to token_embd)
    rope_freqs.weight               (llama: Llama 3.1 frequency divisors -> config.rope_scaling)

Why the Q and K rows move (llama only): llama.cpp's llama graph turns adjacent pairs
(x0, x1), (x2, x3), ... while the Hugging Face weights (and positions.apply_rope) pair x_i with
x_{i + d/2}. llama.cpp's converter reorders the rows of W_q and W_k inside each head so
that its pairs are the same numbers: per head, rows [0, d/2, 1, d/2 + 1, ...]. Reading
undoes it (``unpermute_rows``), writing does it (``permute_rows``). qwen2, qwen3 and gemma3
use llama.cpp's "NEOX" rotation, which pairs x_i with x_{i + d/2} as we do: their rows are
stored as they are.

>>> import torch
>>> w = torch.arange(8.0).view(8, 1)            # one head of head_dim 8
>>> permute_rows(w, n_heads=1).flatten().tolist()
[0.0, 4.0, 1.0, 5.0, 2.0, 6.0, 3.0, 7.0]
>>> torch.equal(unpermute_rows(permute_rows(w, 2), 2), w)
True

Two more things llama.cpp does for Gemma 3: its converter stores every RMSNorm weight as
``1 + weight`` (what the norm multiplies by; we keep Gemma's weight around 0, as Hugging
Face does), and its C++ fixes what the file does not say: five local layers (rope base
1e4) before each global one, and scores scaled by 1 / sqrt(head_dim) (``gemma3_fixed``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..config import ModelConfig
from ..errors import ScratchLMError
from ..positions import rope_frequencies
from .container import GGUFError

# ---- the Q/K row order of llama.cpp's rotary layers -----------------------------------------


def permute_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Half-split rotary rows (ours, HF) -> llama.cpp's interleaved order. w: (n_heads * head_dim, ...)."""
    rest = w.shape[1:]
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *rest).transpose(1, 2).reshape(w.shape)


def unpermute_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of permute_rows: llama.cpp's interleaved rows -> half-split."""
    rest = w.shape[1:]
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *rest).transpose(1, 2).reshape(w.shape)


# ---- the table ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Slot:
    """Where a GGUF tensor goes: our parameter, optionally only some of its rows
    ("q", "k", "v" of a stacked qkv_proj), whether its rows are in rotary pair order
    for ``n_heads`` or ``n_kv_heads`` heads, and what the file adds to our values
    (``shift``: 1.0 for Gemma's norms, stored as 1 + weight)."""

    ours: str
    part: str | None = None
    rotary_heads: str | None = None  # "n_heads" | "n_kv_heads"
    shift: float = 0.0


@dataclass(frozen=True)
class Architecture:
    name: str
    config_keys: dict[str, str]  # ModelConfig field -> metadata key (after "<arch>.")
    optional_keys: dict[str, str]  # the same, for keys a file may omit
    fixed: dict  # the family's fixed ModelConfig fields (export: a model must have exactly these)
    tensors: dict[str, Slot]  # GGUF tensor name ("{i}" = layer) -> where it goes
    biases: dict[str, Slot] = field(default_factory=dict)  # present in some files (all or none)
    bias_field: str = "bias"  # the ModelConfig switch that the bias tensors turn on
    # Fields llama.cpp derives in its C++ from the others, (config fields so far) -> fields.
    derived: Callable[[dict], dict] | None = None


# The fields every architecture below fixes unless it says otherwise: a Llama block.
_LLAMA_SHAPE = dict(norm="rmsnorm", positions="rope", mlp="swiglu", norm_placement="pre", qk_norm=None,
                    norm_plus_one=False, scale_embeddings=False, query_pre_attn_scalar=None, sliding_window=None,
                    rope_local_theta=None, qkv_bias=False, bias=False, n_experts=0)
_SIZES = {"context_length": "context_length", "d_model": "embedding_length", "n_layers": "block_count",
          "d_ff": "feed_forward_length", "n_heads": "attention.head_count",
          "norm_eps": "attention.layer_norm_rms_epsilon"}
_OPTIONAL = {"n_kv_heads": "attention.head_count_kv", "head_dim": "attention.key_length",
             "rope_theta": "rope.freq_base"}


def _layer(*, qk_norm: bool = False, sandwich: bool = False, permuted: bool = False) -> dict[str, Slot]:
    """One block's tensors. permuted: q and k rows in llama.cpp's interleaved rotary order.
    sandwich: Gemma 3's four norms, stored as 1 + weight."""
    shift = 1.0 if sandwich else 0.0
    table = {
        "blk.{i}.attn_norm.weight": Slot("blocks.{i}.attn_norm.weight", shift=shift),
        "blk.{i}.attn_q.weight": Slot("blocks.{i}.attn.qkv_proj.weight", "q", "n_heads" if permuted else None),
        "blk.{i}.attn_k.weight": Slot("blocks.{i}.attn.qkv_proj.weight", "k", "n_kv_heads" if permuted else None),
        "blk.{i}.attn_v.weight": Slot("blocks.{i}.attn.qkv_proj.weight", "v"),
        "blk.{i}.attn_output.weight": Slot("blocks.{i}.attn.out_proj.weight"),
        "blk.{i}.ffn_norm.weight": Slot("blocks.{i}.mlp_norm.weight", shift=shift),
        "blk.{i}.ffn_gate.weight": Slot("blocks.{i}.mlp.gate_proj.weight"),
        "blk.{i}.ffn_up.weight": Slot("blocks.{i}.mlp.up_proj.weight"),
        "blk.{i}.ffn_down.weight": Slot("blocks.{i}.mlp.down_proj.weight"),
    }
    if qk_norm:
        table["blk.{i}.attn_q_norm.weight"] = Slot("blocks.{i}.attn.q_norm.weight", shift=shift)
        table["blk.{i}.attn_k_norm.weight"] = Slot("blocks.{i}.attn.k_norm.weight", shift=shift)
    if sandwich:
        table["blk.{i}.post_attention_norm.weight"] = Slot("blocks.{i}.attn_post_norm.weight", shift=shift)
        table["blk.{i}.post_ffw_norm.weight"] = Slot("blocks.{i}.mlp_post_norm.weight", shift=shift)
    return table


def _model(layer: dict[str, Slot], norm_shift: float = 0.0) -> dict[str, Slot]:
    return {"token_embd.weight": Slot("tok_emb.weight"), "output_norm.weight": Slot("final_norm.weight", shift=norm_shift),
            "output.weight": Slot("lm_head.weight"), **layer}


_LLAMA_BIASES = {
    "blk.{i}.attn_q.bias": Slot("blocks.{i}.attn.qkv_proj.bias", "q", "n_heads"),
    "blk.{i}.attn_k.bias": Slot("blocks.{i}.attn.qkv_proj.bias", "k", "n_kv_heads"),
    "blk.{i}.attn_v.bias": Slot("blocks.{i}.attn.qkv_proj.bias", "v"),
    "blk.{i}.attn_output.bias": Slot("blocks.{i}.attn.out_proj.bias"),
    "blk.{i}.ffn_gate.bias": Slot("blocks.{i}.mlp.gate_proj.bias"),
    "blk.{i}.ffn_up.bias": Slot("blocks.{i}.mlp.up_proj.bias"),
    "blk.{i}.ffn_down.bias": Slot("blocks.{i}.mlp.down_proj.bias"),
}
_QKV_BIASES = {f"blk.{{i}}.attn_{p}.bias": Slot("blocks.{i}.attn.qkv_proj.bias", p) for p in "qkv"}


def gemma3_fixed(values: dict) -> dict:
    """What llama.cpp's gemma3 (llama-model.cpp) sets in code rather than reading it from the
    file: every sixth layer global, the others local with rope base 1e4, and scores divided
    by sqrt(head_dim), except in the 62-layer 27B, by sqrt(d_model / n_heads).

    >>> gemma3_fixed({"n_layers": 7, "head_dim": 256, "d_model": 640, "n_heads": 4})["layer_types"]
    ['local', 'local', 'local', 'local', 'local', 'global', 'local']
    """
    n = values["n_layers"]
    scalar = values["d_model"] // values["n_heads"] if n == 62 else values["head_dim"]
    return {"layer_types": ["global" if i % 6 == 5 else "local" for i in range(n)],
            "rope_local_theta": 10000.0, "query_pre_attn_scalar": float(scalar)}


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture(
        name="llama", config_keys=_SIZES, optional_keys=_OPTIONAL,
        fixed={k: v for k, v in _LLAMA_SHAPE.items() if k != "bias"},
        tensors=_model(_layer(permuted=True)), biases=_LLAMA_BIASES,
    ),
    "qwen2": Architecture(  # Qwen2 / Qwen2.5: biases on q, k and v
        name="qwen2", config_keys=_SIZES, optional_keys=_OPTIONAL,
        fixed={k: v for k, v in _LLAMA_SHAPE.items() if k != "qkv_bias"},
        tensors=_model(_layer()), biases=_QKV_BIASES, bias_field="qkv_bias",
    ),
    "qwen3": Architecture(  # Qwen3 dense: per-head QK-norm
        name="qwen3", config_keys=_SIZES, optional_keys=_OPTIONAL,
        fixed=_LLAMA_SHAPE | {"qk_norm": "head"},
        tensors=_model(_layer(qk_norm=True)),
    ),
    "gemma3": Architecture(  # Gemma 3 text: GeGLU, sandwich (1 + weight) norms, scaled embeddings, windows
        name="gemma3", config_keys=_SIZES | {"sliding_window": "attention.sliding_window"}, optional_keys=_OPTIONAL,
        fixed={k: v for k, v in _LLAMA_SHAPE.items()
               if k not in ("query_pre_attn_scalar", "sliding_window", "rope_local_theta")}
        | {"mlp": "geglu", "norm_placement": "sandwich", "qk_norm": "head", "norm_plus_one": True,
           "scale_embeddings": True},
        tensors=_model(_layer(qk_norm=True, sandwich=True), norm_shift=1.0), derived=gemma3_fixed,
    ),
}

# Metadata of features that no table row reads: a file that uses one is refused.
_REFUSED = {"attn_logit_softcapping": "attention logit soft-capping (Gemma 2)",
            "final_logit_softcapping": "final logit soft-capping", "expert_count": "mixture-of-experts layers"}


def architecture_of(metadata: dict, path) -> Architecture:
    name = metadata.get("general.architecture")
    if name is None:
        raise GGUFError(f"{path}: GGUF metadata has no 'general.architecture'")
    if name not in ARCHITECTURES:
        raise GGUFError(f"{path}: architecture {name!r} is not supported (scratchlm reads: "
                        f"{', '.join(ARCHITECTURES)})")
    return ARCHITECTURES[name]


def architecture_for(config: ModelConfig) -> Architecture:
    """The architecture a model is written as: the first whose fixed fields are the model's."""
    for arch in ARCHITECTURES.values():
        if all(getattr(config, k) == v for k, v in arch.fixed.items()):
            return arch
    raise GGUFError("no llama.cpp architecture has this model's shape, so it cannot be written to GGUF "
                    f"(scratchlm writes: {', '.join(ARCHITECTURES)}; this model has "
                    f"{_describe(config)})")


def _describe(config: ModelConfig) -> str:
    """The family switches of a config that differ from a plain Llama block."""
    different = [f"{k}={getattr(config, k)!r}" for k, v in _LLAMA_SHAPE.items() if getattr(config, k) != v]
    return ", ".join(different) or "a Llama block"


def config_from_metadata(arch: Architecture, metadata: dict, tensors: dict, path) -> ModelConfig:
    """The ModelConfig a file's metadata (and tensor shapes) describe; rope_freqs, if any,
    must already be read into ``metadata["<rope_freqs>"]`` (see ``rope_scaling_from_factors``)."""
    def key(name: str) -> str:
        return f"{arch.name}.{name}"

    values = {}
    for field_name, k in arch.config_keys.items():
        if key(k) not in metadata:
            raise GGUFError(f"{path}: GGUF metadata has no {key(k)!r}")
        values[field_name] = metadata[key(k)]
    for field_name, k in arch.optional_keys.items():
        if key(k) in metadata:
            values[field_name] = metadata[key(k)]
    for name, value in values.items():
        if isinstance(value, list):
            raise GGUFError(f"{path}: {arch.name} metadata gives {name} per layer; scratchlm needs one value")
    for name in ("rope_theta", "norm_eps"):  # f32 in the file: 1e-5 reads as 9.99999974e-06
        if name in values:
            values[name] = float(str(np.float32(values[name])))  # the shortest decimal of that f32
    for k, what in _REFUSED.items():
        if metadata.get(key(k)):
            raise GGUFError(f"{path}: {key(k)} = {metadata[key(k)]}: scratchlm does not read {what} from GGUF")
    scaling_type = metadata.get(key("rope.scaling.type"), "none")
    if scaling_type != "none" and metadata.get(key("rope.scaling.factor"), 1.0) != 1.0:
        raise GGUFError(f"{path}: {scaling_type!r} rope scaling ({key('rope.scaling.type')}) is not supported "
                        "(scratchlm reads Llama 3.1's rope_freqs.weight)")
    if "token_embd.weight" not in tensors:
        raise GGUFError(f"{path}: GGUF file has no tensor 'token_embd.weight'")
    vocab_size, d_model = tensors["token_embd.weight"].shape
    if values["n_heads"] and "head_dim" not in values:
        values["head_dim"] = values["d_model"] // values["n_heads"]
    head_dim = values.get("head_dim")
    for k in ("rope.dimension_count", "attention.value_length"):
        if key(k) in metadata and metadata[key(k)] != head_dim:
            raise GGUFError(f"{path}: {key(k)} = {metadata[key(k)]} differs from the key heads' size {head_dim}; "
                            "scratchlm supports only full rotary heads, keys and values of one size")
    first_bias = next((n.format(i=0) for n in arch.biases), None)
    try:
        fields = {"rope_scaling": metadata.get("<rope_scaling>"), **arch.fixed, **values,
                  arch.bias_field: first_bias in tensors}
        if arch.derived:
            fields.update(arch.derived(fields))
        return ModelConfig(vocab_size=vocab_size, tie_embeddings="output.weight" not in tensors, dtype="float32",
                           **fields)
    except ScratchLMError as e:
        raise GGUFError(f"{path}: the GGUF metadata describes no valid model ({e})") from None
    except (KeyError, TypeError, ZeroDivisionError) as e:
        raise GGUFError(f"{path}: the GGUF metadata describes no valid model ({e!r})") from None


def layer_names(arch: Architecture, config: ModelConfig, with_bias: bool) -> list[tuple[str, Slot]]:
    """Every (GGUF tensor name, Slot) of a model of ``config``, layers expanded."""
    table = dict(arch.tensors)
    if with_bias:
        table.update(arch.biases)
    out = []
    for gguf_name, slot in table.items():
        if "{i}" in gguf_name:
            for i in range(config.n_layers):
                out.append((gguf_name.format(i=i), Slot(slot.ours.format(i=i), slot.part, slot.rotary_heads,
                                                        slot.shift)))
        elif not (gguf_name == "output.weight" and config.tie_embeddings):
            out.append((gguf_name, slot))
    return out


def part_rows(config: ModelConfig, part: str | None) -> slice:
    """The rows of the stacked qkv_proj that hold q, k or v."""
    q, kv = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    return {None: slice(None), "q": slice(0, q), "k": slice(q, q + kv), "v": slice(q + kv, q + 2 * kv)}[part]


# ---- Llama 3.1 rope scaling <-> rope_freqs --------------------------------------------------------
def rope_factors(config: ModelConfig) -> torch.Tensor:
    """llama.cpp's rope_freqs (head_dim/2,): each frequency is divided by its factor."""
    base = rope_frequencies(config.replace(rope_scaling=None))
    return base / rope_frequencies(config)


def rope_scaling_from_factors(factors: torch.Tensor, config: ModelConfig, path) -> dict | None:
    """The Llama 3.1 ``rope_scaling`` that gives these factors, or None when all are 1.

    The factors fix ``factor`` (the largest) and, in the band between, a smooth step that
    is linear in 1 / wavelength: smooth = (original / wavelength - low) / (high - low).
    Scaling original, low and high together changes nothing, so low_freq_factor = 1 (as in
    every Llama 3.x) and the band's line gives high_freq_factor and original_context_length."""
    import math

    factors = factors.double()
    if torch.allclose(factors, torch.ones_like(factors)):
        return None
    factor = float(factors.max())
    inv = rope_frequencies(config.replace(rope_scaling=None)).double()
    wavelen = 2 * math.pi / inv
    mid = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
    candidates = [{"factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_context_length": 8192}]
    if int(mid.sum()) >= 2:
        # 1 / f_i = (1 - s) / factor + s  ->  s = (1 / f_i - 1 / factor) / (1 - 1 / factor)
        s = (1 / factors[mid] - 1 / factor) / (1 - 1 / factor)
        x = 1 / wavelen[mid]  # s = original / (high - low) * x - low / (high - low)
        slope, intercept = torch.linalg.lstsq(torch.stack([x, torch.ones_like(x)], 1), s[:, None]).solution[:, 0]
        if intercept < 0:
            high = round(1 - 1 / float(intercept), 6)
            original = round(float(slope) * (high - 1))
            candidates.insert(0, {"factor": factor, "low_freq_factor": 1.0, "high_freq_factor": high,
                                  "original_context_length": original})
    for scaling in candidates:
        try:
            trial = rope_factors(config.replace(rope_scaling=scaling))
        except ScratchLMError:
            continue
        if torch.allclose(trial.double(), factors, rtol=1e-4, atol=1e-6):
            return scaling
    raise GGUFError(f"{path}: rope_freqs.weight is not a Llama 3.1 frequency scaling that scratchlm can express")
