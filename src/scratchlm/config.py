"""ModelConfig: every number that decides the shape of a Transformer, plus named presets.

One dataclass describes GPT-2 and every Llama: the differences between the families
are a handful of switches (norm, mlp, positions, n_kv_heads, bias, tie_embeddings).

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
MLPS = ("gelu", "relu", "swiglu")
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

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
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
        for name in ("vocab_size", "context_length", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                 f"{name} must be a positive integer, got {value!r}")
        need(self.d_model % self.n_heads == 0,
             f"n_heads={self.n_heads} does not divide d_model={self.d_model}")
        need(self.n_heads % self.n_kv_heads == 0,
             f"n_kv_heads={self.n_kv_heads} does not divide n_heads={self.n_heads}")
        need(self.norm in NORMS, f"norm must be one of {NORMS}, got {self.norm!r}")
        need(self.mlp in MLPS, f"mlp must be one of {MLPS}, got {self.mlp!r}")
        need(self.positions in POSITIONS, f"positions must be one of {POSITIONS}, got {self.positions!r}")
        need(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        need(self.norm_eps > 0, f"norm_eps must be > 0, got {self.norm_eps}")
        need(self.rope_theta > 0, f"rope_theta must be > 0, got {self.rope_theta}")
        if self.positions == "rope":
            need(self.head_dim % 2 == 0, f"rotary positions need an even head_dim, got {self.head_dim}")
        if self.positions == "sinusoidal":
            need(self.d_model % 2 == 0, f"sinusoidal positions need an even d_model, got {self.d_model}")
        if self.rope_scaling is not None:
            need(self.positions == "rope", "rope_scaling is set but positions is not 'rope'")
            keys = {"factor", "low_freq_factor", "high_freq_factor", "original_context_length"}
            need(isinstance(self.rope_scaling, dict) and set(self.rope_scaling) == keys,
                 f"rope_scaling needs exactly the keys {sorted(keys)}, got {self.rope_scaling!r}")
            need(self.rope_scaling["high_freq_factor"] > self.rope_scaling["low_freq_factor"],
                 "rope_scaling: high_freq_factor must exceed low_freq_factor")

    # ---- derived ------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def replace(self, **changes) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
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


# Published figures (parameter counts are checked in tests/test_config.py).
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
    # Small models for CPU work and tests.
    "gpt-tiny": dict(vocab_size=512, context_length=128, d_model=64, n_layers=2, n_heads=4,
                     d_ff=256, bias=True, tie_embeddings=True),
    "gpt-small-cpu": dict(vocab_size=4096, context_length=256, d_model=256, n_layers=6,
                          n_heads=8, d_ff=1024, bias=False, tie_embeddings=True),
    "llama-tiny": _llama(512, 128, 64, 2, 4, 2, 192, 10000.0) | {"dtype": "float32"},
    "llama-small-cpu": _llama(4096, 256, 256, 6, 8, 2, 704, 10000.0, tie_embeddings=True)
    | {"dtype": "float32"},
}
