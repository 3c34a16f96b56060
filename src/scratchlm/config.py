"""ModelConfig: every number that decides the shape of a Transformer, plus named presets.

One dataclass describes GPT-2, every Llama, Qwen2.5 / Qwen3, Gemma 3 and OLMo 2: the
differences between the families are a handful of switches (norm and where it sits, mlp,
positions, n_kv_heads, head_dim, qk_norm, biases, sliding windows, tie_embeddings).

>>> cfg = ModelConfig.preset("gpt2")
>>> cfg.d_model, cfg.n_heads, cfg.head_dim
(768, 12, 64)
>>> ModelConfig.from_json(cfg.to_json()) == cfg
True
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError

NORMS = ("layernorm", "rmsnorm")
# The longest context a model may declare: position tables (and a KV cache) of this many rows
# are built whole, so a typo such as 1e12 must be refused, not allocated. 2**24 is 128x
# Llama 3.1's 131,072.
MAX_CONTEXT_LENGTH = 2**24
# The deepest model a config may declare (Llama 3.1 405B has 126 layers): a per-layer list
# (layer_types) is built from it before anything else, so 1e9 must be refused first.
MAX_LAYERS = 2**16
MLPS = ("gelu", "relu", "swiglu", "geglu")
NORM_PLACEMENTS = ("pre", "post", "sandwich")  # x + f(norm(x)), x + norm(f(x)), x + norm(f(norm(x)))
QK_NORMS = (None, "head", "projection")  # RMSNorm of q and k: per head (Qwen3, Gemma 3), whole (OLMo 2)
LAYER_TYPES = ("global", "local")  # local: sliding-window attention
POSITIONS = ("learned", "sinusoidal", "rope")
DTYPES = ("float32", "bfloat16", "float16")




@dataclass
class ModelConfig:
    vocab_size: int = 50257
    context_length: int = 1024
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    n_kv_heads: int | None = None  # None -> n_heads (MHA); 1 -> MQA; in between -> GQA
    d_ff: int | None = None  # None -> 4 * d_model
    norm: str = "layernorm"
    mlp: str = "gelu"
    positions: str = "learned"
    rope_theta: float = 10000.0
    # Llama 3.1 frequency scaling, e.g. {"factor": 8.0, "low_freq_factor": 1.0,
    # "high_freq_factor": 4.0, "original_context_length": 8192}
    rope_scaling: dict | None = None
    bias: bool = True  # biases on the linear layers and on LayerNorm
    tie_embeddings: bool = True  # output head shares the token-embedding matrix
    dropout: float = 0.0
    norm_eps: float = 1e-5
    dtype: str = "float32"  # dtype the weights are created and stored in
    # ---- the newer families (Qwen, Gemma, OLMo) ------------------------------------------
    head_dim: int | None = None  # None -> d_model // n_heads; Qwen3 and Gemma 3 set it apart
    qkv_bias: bool = False  # biases on q, k, v only (Qwen2.5), whatever `bias` says
    qk_norm: str | None = None  # None, "head" (Qwen3, Gemma 3) or "projection" (OLMo 2)
    norm_placement: str = "pre"  # "pre" (GPT-2, Llama), "post" (OLMo 2), "sandwich" (Gemma 3)
    norm_plus_one: bool = False  # RMSNorm scales by (1 + weight), weight stored around 0 (Gemma)
    scale_embeddings: bool = False  # token embeddings times sqrt(d_model) (Gemma)
    query_pre_attn_scalar: float | None = None  # scores / sqrt(this); None -> head_dim (Gemma 3: set)
    sliding_window: int | None = None  # a local layer's query sees its last `sliding_window` keys
    layer_types: list[str] | None = None  # per layer "global" / "local"; None: all local if a window
    rope_local_theta: float | None = None  # rope base of local layers; None -> rope_theta (Gemma 3: 1e4)
    # Mixture of experts (moe.py): n_experts > 0 replaces every block's MLP by n_experts
    # SwiGLU experts of hidden size d_ff_expert, of which a router picks experts_per_token
    # for each token. norm_topk_prob: rescale the chosen experts' router probabilities to
    # sum to 1 (Mixtral, Qwen3-MoE) instead of using them as they are.
    n_experts: int = 0  # 0: a dense MLP
    experts_per_token: int = 2  # top-k
    d_ff_expert: int | None = None  # None -> d_ff
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 0.0  # weight of the load-balancing loss in training

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        if self.head_dim is None and isinstance(self.n_heads, int) and self.n_heads > 0:
            if isinstance(self.d_model, int) and self.d_model % self.n_heads:
                raise ConfigError(f"n_heads={self.n_heads} does not divide d_model={self.d_model}; "
                                  f"set head_dim to use heads of another size")
            self.head_dim = self.d_model // self.n_heads
        if isinstance(self.n_layers, int) and self.n_layers > MAX_LAYERS:
            raise ConfigError(f"n_layers must be at most {MAX_LAYERS:,}, got {self.n_layers:,}")
        if self.layer_types is None and isinstance(self.n_layers, int):
            self.layer_types = ["local" if self.sliding_window is not None else "global"] * self.n_layers
        if isinstance(self.layer_types, (list, tuple)):
            self.layer_types = list(self.layer_types)  # a tuple from Python, a list from JSON: one form
        if self.d_ff_expert is None:
            self.d_ff_expert = self.d_ff
        self.validate()

    # ---- validation -------------------------------------------------------------------
    def validate(self) -> None:
        def need(ok: bool, msg: str):
            if not ok:
                raise ConfigError(msg)

        _check_field_types(self)
        need(self.context_length <= MAX_CONTEXT_LENGTH,
             f"context_length must be at most {MAX_CONTEXT_LENGTH:,} (its position tables are built whole), "
             f"got {self.context_length:,}")
        for name in ("vocab_size", "context_length", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff",
                     "head_dim"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                 f"{name} must be a positive integer, got {value!r}")
        need(self.n_heads % self.n_kv_heads == 0,
             f"n_kv_heads={self.n_kv_heads} does not divide n_heads={self.n_heads}")
        need(self.norm in NORMS, f"norm must be one of {NORMS}, got {self.norm!r}")
        need(self.mlp in MLPS, f"mlp must be one of {MLPS}, got {self.mlp!r}")
        need(self.positions in POSITIONS, f"positions must be one of {POSITIONS}, got {self.positions!r}")
        need(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        need(self.norm_eps > 0, f"norm_eps must be > 0, got {self.norm_eps}")
        need(self.rope_theta > 0, f"rope_theta must be > 0, got {self.rope_theta}")
        need(self.norm_placement in NORM_PLACEMENTS,
             f"norm_placement must be one of {NORM_PLACEMENTS}, got {self.norm_placement!r}")
        need(self.qk_norm in QK_NORMS, f"qk_norm must be one of {QK_NORMS}, got {self.qk_norm!r}")
        need(not self.norm_plus_one or self.norm == "rmsnorm", "norm_plus_one needs norm='rmsnorm'")
        need(self.query_pre_attn_scalar is None or self.query_pre_attn_scalar > 0,
             f"query_pre_attn_scalar must be > 0, got {self.query_pre_attn_scalar}")
        need(len(self.layer_types) == self.n_layers and all(t in LAYER_TYPES for t in self.layer_types),
             f"layer_types must list {self.n_layers} of {LAYER_TYPES} (one per layer), got {self.layer_types!r}")
        if "local" in self.layer_types:
            w = self.sliding_window
            need(isinstance(w, int) and not isinstance(w, bool) and 0 < w <= self.context_length,
                 f"sliding_window must be an integer in [1, context_length={self.context_length}] "
                 f"for the local layers, got {w!r}")
        else:
            need(self.sliding_window is None, f"sliding_window={self.sliding_window} is set but no layer is local")
        if self.rope_local_theta is not None:
            need(self.positions == "rope" and self.rope_local_theta > 0,
                 "rope_local_theta needs positions='rope' and a value > 0")
        if self.positions == "rope":
            need(self.head_dim % 2 == 0, f"rotary positions need an even head_dim, got {self.head_dim}")
        if self.positions == "sinusoidal":
            need(self.d_model % 2 == 0, f"sinusoidal positions need an even d_model, got {self.d_model}")
        need(isinstance(self.n_experts, int) and not isinstance(self.n_experts, bool) and self.n_experts >= 0,
             f"n_experts must be an integer >= 0 (0: dense MLP), got {self.n_experts!r}")
        if self.n_experts:
            need(self.mlp == "swiglu", f"experts are SwiGLU MLPs: mixture of experts needs mlp='swiglu', got {self.mlp!r}")
            k = self.experts_per_token
            need(isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= self.n_experts,
                 f"experts_per_token must be between 1 and n_experts={self.n_experts}, got {k!r}")
            need(isinstance(self.d_ff_expert, int) and self.d_ff_expert > 0,
                 f"d_ff_expert must be a positive integer, got {self.d_ff_expert!r}")
            need(not self.bias, "mixture-of-experts layers have no biases: set bias=False")
        need(self.router_aux_loss_coef >= 0, f"router_aux_loss_coef must be >= 0, got {self.router_aux_loss_coef}")
        if self.rope_scaling is not None:
            need(self.positions == "rope", "rope_scaling is set but positions is not 'rope'")
            keys = {"factor", "low_freq_factor", "high_freq_factor", "original_context_length"}
            need(isinstance(self.rope_scaling, dict) and set(self.rope_scaling) == keys,
                 f"rope_scaling needs exactly the keys {sorted(keys)}, got {self.rope_scaling!r}")
            need(self.rope_scaling["high_freq_factor"] > self.rope_scaling["low_freq_factor"],
                 "rope_scaling: high_freq_factor must exceed low_freq_factor")

    def replace(self, **changes) -> ModelConfig:
        """A copy with some fields changed (validated again). Fields derived from the changed
        ones follow them: a head_dim that was d_model // n_heads, layer_types for n_layers
        (the old pattern repeated)."""
        if "head_dim" not in changes and ("d_model" in changes or "n_heads" in changes) \
                and self.head_dim == self.d_model // self.n_heads:
            changes["head_dim"] = None
        if "layer_types" not in changes and changes.get("n_layers", self.n_layers) != self.n_layers:
            changes["layer_types"] = [self.layer_types[i % self.n_layers] for i in range(changes["n_layers"])]
        return dataclasses.replace(self, **changes)

    # ---- JSON ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"a model config is a JSON object of fields, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config option(s): {', '.join(unknown)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            return cls.from_json(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None

    # ---- presets ------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides) -> ModelConfig:
        """A named configuration, e.g. ``ModelConfig.preset("llama3-8b")``."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose from: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @staticmethod
    def presets() -> list[str]:
        return list(PRESETS)


_KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping",
               list: "a list"}


def _check_field_types(config: ModelConfig) -> None:
    """Each field holds a value of its annotated type, as JSON gives it: ``"false"`` is not a
    bool (a non-empty string is truthy), ``2.0`` is not an int, and a float must be finite.
    Integers of other types (numpy's, from GGUF metadata) become ``int``."""
    hints = typing.get_type_hints(type(config))
    for f in fields(config):
        value, annotation = getattr(config, f.name), hints[f.name]
        kinds = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
        if value is None and type(None) in typing.get_args(annotation):
            continue
        kind = typing.get_origin(kinds[0]) or kinds[0]
        if len(kinds) != 1 or kind not in (bool, int, float, str, dict, list):
            continue  # an annotation this check does not know: the field's own checks apply
        ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
        if kind is int and isinstance(value, numbers.Integral) and not isinstance(value, bool):
            value, ok = int(value), True
        if kind is float and isinstance(value, numbers.Real) and not isinstance(value, bool):
            value, ok = float(value), math.isfinite(value)
            if not ok:
                raise ConfigError(f"{f.name} must be a finite number, got {value!r}")
        if not ok:
            raise ConfigError(f"{f.name} must be {_KIND_NAMES[kind]}, got {value!r}")
        object.__setattr__(config, f.name, value)


def _gpt2(d_model: int, n_layers: int, n_heads: int) -> dict:
    return dict(vocab_size=50257, context_length=1024, d_model=d_model, n_layers=n_layers,
                n_heads=n_heads, d_ff=4 * d_model, norm="layernorm", mlp="gelu",
                positions="learned", bias=True, tie_embeddings=True, norm_eps=1e-5)


def _llama(vocab_size, context_length, d_model, n_layers, n_heads, n_kv_heads, d_ff,
           rope_theta, norm_eps=1e-5, tie_embeddings=False, rope_scaling=None) -> dict:
    return dict(vocab_size=vocab_size, context_length=context_length, d_model=d_model,
                n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, d_ff=d_ff,
                norm="rmsnorm", mlp="swiglu", positions="rope", rope_theta=rope_theta,
                rope_scaling=rope_scaling, bias=False, tie_embeddings=tie_embeddings,
                norm_eps=norm_eps, dtype="bfloat16")


def _llama31_scaling(factor: float) -> dict:
    return {"factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_context_length": 8192}


def _qwen3(d_model, n_layers, n_heads, d_ff, tie_embeddings) -> dict:
    """Qwen3 dense: Llama plus per-head RMSNorm on q and k, head_dim 128 apart from d_model."""
    return _llama(151936, 40960, d_model, n_layers, n_heads, 8, d_ff, 1_000_000.0, norm_eps=1e-6,
                  tie_embeddings=tie_embeddings) | {"head_dim": 128, "qk_norm": "head"}


def _gemma3(d_model, n_layers, d_ff, context_length=32768, vocab_size=262144, n_heads=4, n_kv_heads=1,
            head_dim=256, window=512) -> dict:
    """Gemma 3 text: GeGLU, sandwich (1 + weight) RMSNorms, sqrt(d_model)-scaled embeddings,
    per-head QK-norm, and five sliding-window layers (rope base 1e4) per global one (1e6)."""
    return _llama(vocab_size, context_length, d_model, n_layers, n_heads, n_kv_heads, d_ff, 1_000_000.0,
                  norm_eps=1e-6, tie_embeddings=True) | {
        "mlp": "geglu", "head_dim": head_dim, "qk_norm": "head", "norm_placement": "sandwich",
        "norm_plus_one": True, "scale_embeddings": True, "query_pre_attn_scalar": float(head_dim),
        "sliding_window": window, "rope_local_theta": 10000.0,
        "layer_types": ["global" if (i + 1) % 6 == 0 else "local" for i in range(n_layers)]}


def _olmo2(vocab_size, context_length, d_model, n_layers, n_heads, d_ff) -> dict:
    """OLMo 2: Llama with the norms after attention and MLP, QK-norm over the whole projection."""
    return _llama(vocab_size, context_length, d_model, n_layers, n_heads, n_heads, d_ff, 500000.0,
                  norm_eps=1e-6) | {"norm_placement": "post", "qk_norm": "projection"}


# Published figures (parameter counts are checked in tests/test_config.py and, for the
# Qwen / Gemma / OLMo presets, against transformers' own models in tests/test_families.py).
PRESETS: dict[str, dict] = {
    "gpt2": _gpt2(768, 12, 12),  # 124,439,808
    "gpt2-medium": _gpt2(1024, 24, 16),  # 354,823,168
    "gpt2-large": _gpt2(1280, 36, 20),  # 774,030,080
    "gpt2-xl": _gpt2(1600, 48, 25),  # 1,557,611,200
    "llama2-7b": _llama(32000, 4096, 4096, 32, 32, 32, 11008, 10000.0),  # 6,738,415,616
    "llama2-13b": _llama(32000, 4096, 5120, 40, 40, 40, 13824, 10000.0),  # 13,015,864,320
    "llama3-8b": _llama(128256, 8192, 4096, 32, 32, 8, 14336, 500000.0),  # 8,030,261,248
    "llama3.1-8b": _llama(128256, 131072, 4096, 32, 32, 8, 14336, 500000.0,
                          rope_scaling=_llama31_scaling(8.0)),  # 8,030,261,248
    "llama3.2-1b": _llama(128256, 131072, 2048, 16, 32, 8, 8192, 500000.0, tie_embeddings=True,
                          rope_scaling=_llama31_scaling(32.0)),  # 1,235,814,400
    "llama3.2-3b": _llama(128256, 131072, 3072, 28, 24, 8, 8192, 500000.0, tie_embeddings=True,
                          rope_scaling=_llama31_scaling(32.0)),  # 3,212,749,824
    # SmolLM2 (Hugging Face): Llama-architecture, tied head, vocabulary 49,152. The 135M and
    # 360M share 3 and 5 key/value heads among 9 and 15 query heads (GQA); the 1.7B is MHA.
    "smollm2-135m": _llama(49152, 8192, 576, 30, 9, 3, 1536, 100000.0, tie_embeddings=True),  # 134,515,008
    "smollm2-360m": _llama(49152, 8192, 960, 32, 15, 5, 2560, 100000.0, tie_embeddings=True),  # 361,821,120
    "smollm2-1.7b": _llama(49152, 8192, 2048, 24, 32, 32, 8192, 130000.0, tie_embeddings=True),  # 1,711,376,384
    # Qwen (model cards: 0.6B / 1.7B / 4.0B / 8.2B, of which non-embedding 0.44B / 1.4B / 3.6B / 6.95B).
    "qwen2.5-0.5b": _llama(151936, 32768, 896, 24, 14, 2, 4864, 1_000_000.0, norm_eps=1e-6,
                           tie_embeddings=True) | {"qkv_bias": True},  # 494,032,768
    "qwen3-0.6b": _qwen3(1024, 28, 16, 3072, tie_embeddings=True),  # 596,049,920
    "qwen3-1.7b": _qwen3(2048, 28, 16, 6144, tie_embeddings=True),  # 1,720,574,976
    "qwen3-4b": _qwen3(2560, 36, 32, 9728, tie_embeddings=True),  # 4,022,468,096
    "qwen3-8b": _qwen3(4096, 36, 32, 12288, tie_embeddings=False),  # 8,190,735,360
    # Gemma 3 text-only (Gemma3ForCausalLM): 270M and 1B.
    "gemma3-270m": _gemma3(640, 18, 2048),  # 268,098,176
    "gemma3-1b": _gemma3(1152, 26, 6912),  # 999,885,952
    # OLMo-2-0425-1B (model card: 1.48B with its untied head).
    "olmo2-1b": _olmo2(100352, 4096, 2048, 16, 16, 8192),  # 1,484,916,736
    # Mixtral 8x7B: Llama 2 attention (GQA 32/8) with 8 SwiGLU experts per layer, 2 per token.
    "mixtral-8x7b": _llama(32000, 32768, 4096, 32, 32, 8, 14336, 1e6)
    | dict(n_experts=8, experts_per_token=2, router_aux_loss_coef=0.02),  # 46,702,792,704; 12,879,925,248 active
    # Qwen3-30B-A3B: Qwen3 attention (QK-norm, head_dim 128, GQA 32/4), 128 experts of 768, 8 per token.
    "qwen3-30b-a3b": _llama(151936, 40960, 2048, 48, 32, 4, 6144, 1_000_000.0, norm_eps=1e-6)
    | dict(head_dim=128, qk_norm="head", n_experts=128, experts_per_token=8, d_ff_expert=768,
           router_aux_loss_coef=0.001),  # 30,532,122,624; 3,353,032,704 active
    # Small models for CPU work and tests.
    "gpt-tiny": dict(vocab_size=512, context_length=128, d_model=64, n_layers=2, n_heads=4,
                     d_ff=256, bias=True, tie_embeddings=True),
    "gpt-small-cpu": dict(vocab_size=4096, context_length=256, d_model=256, n_layers=6,
                          n_heads=8, d_ff=1024, bias=False, tie_embeddings=True),
    "llama-tiny": _llama(512, 128, 64, 2, 4, 2, 192, 10000.0) | {"dtype": "float32"},
    "moe-tiny": _llama(512, 128, 64, 2, 4, 2, 192, 10000.0)
    | dict(n_experts=4, experts_per_token=2, d_ff_expert=96, router_aux_loss_coef=0.01, dtype="float32"),
    "qwen3-moe-tiny": _llama(512, 128, 64, 2, 4, 2, 192, 1_000_000.0, norm_eps=1e-6)
    | dict(head_dim=32, qk_norm="head", n_experts=8, experts_per_token=2, d_ff_expert=48,
           router_aux_loss_coef=0.001, dtype="float32"),
    "llama-small-cpu": _llama(4096, 256, 256, 6, 8, 2, 704, 10000.0, tie_embeddings=True)
    | {"dtype": "float32"},
    # One tiny model per newer family: head_dim (32) is not d_model / n_heads (16), and the
    # Gemma one has a window of 16 in two local layers before a global one.
    "qwen3-tiny": _qwen3(64, 2, 4, 192, tie_embeddings=True)
    | {"vocab_size": 512, "context_length": 128, "head_dim": 32, "n_kv_heads": 2, "dtype": "float32"},
    "gemma3-tiny": _gemma3(64, 3, 192, context_length=128, vocab_size=512, head_dim=32, window=16)
    | {"layer_types": ["local", "local", "global"], "dtype": "float32"},
    "olmo2-tiny": _olmo2(512, 128, 64, 2, 4, 192) | {"dtype": "float32"},
}
