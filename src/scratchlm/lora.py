"""LoRA: fine-tune a large model by training two thin matrices beside each chosen layer.

A fine-tuned weight differs from the pretrained one by an update ΔW (out, in). LoRA (Hu
et al., 2021) bets that the update has low rank and writes it as a product of two thin
matrices, trained while the original weight W stays frozen::

    y = x W^T + (alpha / rank) * x A^T B^T        A: (rank, in)   B: (out, rank)

With rank 8 on a 768 x 2304 matrix that is 8 * (768 + 2304) = 24,576 trainable numbers
instead of 1,769,472 (1.4%). Nothing else changes, so:

- B starts at zero: at initialisation the model computes exactly what the base model does;
- only A and B need gradients and optimizer state (AdamW keeps two more copies of every
  trained number, so this is where most of the memory saving comes from);
- the adapter (A and B of every layer) is saved on its own, a few MB, and loaded back on
  top of the same base model;
- merging folds the update into the weight, W' = W + (alpha / rank) * B A, giving a plain
  model that runs as fast as the base model and exports like any other.

>>> import torch
>>> from scratchlm import ModelConfig, Transformer
>>> model = Transformer(ModelConfig.preset("gpt-tiny"))
>>> ids = torch.tensor([[1, 2, 3]])
>>> before = model(ids)
>>> wrapped = apply_lora(model, rank=4, alpha=8, targets=["qkv_proj", "out_proj"])
>>> len(wrapped), torch.equal(model(ids), before)     # 2 blocks x 2 layers; B = 0
(4, True)
>>> sum(p.numel() for p in model.parameters() if p.requires_grad)  # 2 x 4 * ((64 + 192) + (64 + 64))
3072
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import NotFound, ScratchLMError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter.safetensors"

# The linear layers of scratchlm's Transformer, by attribute name (see model.py).
# q, k and v are one fused matrix, ``qkv_proj``; gate_proj exists only in SwiGLU models.
LINEAR_NAMES = ("qkv_proj", "out_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
DEFAULT_TARGETS = ("qkv_proj", "out_proj")


class LoRAError(ScratchLMError):
    """An adapter that does not fit the model, or settings that make no sense."""


@dataclass
class LoRAConfig:
    """What an adapter is: its rank, scale, dropout, and the layers it wraps.

    ``targets`` are layer names (``qkv_proj`` wraps that layer in every block), full
    module names (``blocks.11.mlp.up_proj``) or glob patterns (``blocks.1?.attn.*``).
    ``base_model`` records where the base model came from (informational).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    base_model: str | None = None

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise LoRAError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if self.alpha <= 0:
            raise LoRAError(f"LoRA alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise LoRAError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.targets, str):
            self.targets = [t.strip() for t in self.targets.split(",") if t.strip()]
        if not self.targets:
            raise LoRAError("LoRA needs at least one target layer")
        self.targets = list(self.targets)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


# ----------------------------------------------------------------------------------------
# The layer
# ----------------------------------------------------------------------------------------
class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update.

    forward(x) = base(x) + scaling * B(A(dropout(x)))     x: (..., in) -> (..., out)
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **factory))  # (rank, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **factory))  # (out, rank)
        # A random, B zero: the product B A is zero, so the wrapped layer starts equal to the
        # base layer, yet the gradient of B (which depends on A) is not zero and learning starts.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own initialisation
        self.dropout = nn.Dropout(dropout)
        self.disabled = False  # adapters_disabled(model): the base layer alone (DPO's reference model)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight (so code that reads ``layer.weight`` keeps working)."""
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return self.base(x)
        # Two thin matmuls, (..., in) -> (..., rank) -> (..., out); never the full B A matrix.
        update = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)
        return self.base(x) + self.scaling * update

    def delta_weight(self) -> torch.Tensor:
        """The update as a full matrix, scaling * B A, (out, in), computed in float32."""
        return self.scaling * (self.lora_B.float() @ self.lora_A.float())

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"


# ----------------------------------------------------------------------------------------
# Wrapping, freezing, merging
# ----------------------------------------------------------------------------------------
def _matches(name: str, targets: list[str]) -> bool:
    short = name.rsplit(".", 1)[-1]
    return any(name == t or short == t or fnmatch.fnmatchcase(name, t) for t in targets)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)


def apply_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               targets=DEFAULT_TARGETS, freeze: bool = True) -> list[str]:
    """Wrap every nn.Linear whose name matches ``targets`` in a LoRALinear, in place.

    With ``freeze`` (the default) every other parameter stops requiring gradients, so only
    the adapters train (unfreeze extra modules afterwards, e.g. a classification head).
    Returns the names of the wrapped layers; raises LoRAError when a target matches nothing.
    """
    config = LoRAConfig(rank=rank, alpha=alpha, dropout=dropout, targets=targets)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise LoRAError("the model already has LoRA adapters (merge or remove them first)")
    for target in config.targets:
        if not any(_matches(n, [target]) for n, _ in linears):
            available = sorted({n.rsplit(".", 1)[-1] for n, _ in linears})
            raise LoRAError(f"LoRA target {target!r} matches no linear layer; "
                            f"layers are named {', '.join(available)}")
    widest = max((min(m.in_features, m.out_features) for n, m in linears if _matches(n, config.targets)), default=0)
    if config.rank > widest:  # B A of a larger rank spans nothing more, and a typo would allocate without bound
        raise LoRAError(f"LoRA rank {config.rank:,} exceeds the layers it adapts (at most {widest:,} = the "
                        "smaller side of their weights)")
    if freeze:
        for p in model.parameters():
            p.requires_grad_(False)
    wrapped = []
    for name, linear in linears:
        if _matches(name, config.targets):
            _set_module(model, name, LoRALinear(linear, config.rank, config.alpha, config.dropout))
            wrapped.append(name)
    model.lora_config = config  # remembered for save_adapter
    return wrapped


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors: ``<layer>.lora_A`` and ``<layer>.lora_B`` for each wrapped layer."""
    state = {}
    for name, layer in lora_layers(model).items():
        state[f"{name}.lora_A"] = layer.lora_A.detach().contiguous()
        state[f"{name}.lora_B"] = layer.lora_B.detach().contiguous()
    return state


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight (W += scaling * B A) and unwrap it, in place.

    If the output head is adapted while it shares its matrix with the token embedding
    (tied embeddings), the head gets a matrix of its own and ``config.tie_embeddings``
    becomes False: the update is meant for the output side only.
    """
    for name, layer in lora_layers(model).items():
        base = layer.base
        merged = (base.weight.float() + layer.delta_weight()).to(base.weight.dtype)
        tied = name == "lm_head" and hasattr(model, "tok_emb") and base.weight is model.tok_emb.weight
        if tied:
            base.weight = nn.Parameter(merged)
            model.config = model.config.replace(tie_embeddings=False)
        else:
            base.weight.copy_(merged)
        _set_module(model, name, base)
    for p in model.parameters():
        p.requires_grad_(True)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Inside the block the model computes exactly what its base model does (every adapter
    switched off), without a second copy of the weights: DPO's reference model with LoRA.

    >>> import torch
    >>> from scratchlm import ModelConfig, Transformer
    >>> model = Transformer(ModelConfig.preset("gpt-tiny"))
    >>> ids = torch.tensor([[1, 2, 3]])
    >>> base = model(ids)
    >>> _ = apply_lora(model, rank=2)
    >>> with torch.no_grad():
    ...     for layer in lora_layers(model).values():
    ...         _ = layer.lora_B.fill_(0.5)                # a trained adapter: the output moves
    >>> torch.equal(model(ids), base)
    False
    >>> with adapters_disabled(model):
    ...     torch.equal(model(ids), base)
    True
    """
    layers = list(lora_layers(model).values())
    before = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, was in zip(layers, before):
            layer.disabled = was


# ----------------------------------------------------------------------------------------
# Saving and loading an adapter on its own
# ----------------------------------------------------------------------------------------
FINGERPRINT_LAYERS, FINGERPRINT_VALUES = 4, 8


def base_fingerprint(model: nn.Module) -> dict[str, list[float]]:
    """A few frozen base weights under the adapters: 8 evenly spaced values of each of the
    first 4 wrapped layers. An adapter records them, so that loading it onto another base
    model (which its B A were never trained against) is refused instead of silently wrong."""
    values = {}
    for name in sorted(lora_layers(model))[:FINGERPRINT_LAYERS]:
        flat = lora_layers(model)[name].base.weight.detach().flatten()
        step = max(1, flat.numel() // FINGERPRINT_VALUES)
        values[name] = [float(f"{v:.6g}") for v in flat[::step][:FINGERPRINT_VALUES].float().tolist()]
    return values


def _same_base(recorded: dict, now: dict) -> bool:
    """The fingerprints agree, to the rounding of a bf16 copy of the same weights."""
    if set(recorded) != set(now):
        return False
    a = torch.tensor([v for k in sorted(now) for v in recorded[k]], dtype=torch.float64)
    b = torch.tensor([v for k in sorted(now) for v in now[k]], dtype=torch.float64)
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-2, atol=1e-3)


def save_adapter(path: str | os.PathLike, model: nn.Module, base_model: str | None = None,
                 extra: Callable[[Path], None] | None = None) -> Path:
    """Write ``adapter_config.json`` and ``adapter.safetensors`` into directory ``path``,
    atomically (a temporary sibling renamed into place), plus whatever ``extra(tmp)`` writes."""
    from .atomic import MODEL_FILES, atomic_directory  # the same atomic swap as model directories

    config: LoRAConfig = getattr(model, "lora_config", None)
    if config is None or not lora_layers(model):
        raise LoRAError("the model has no LoRA adapters to save")
    config = LoRAConfig(**{**asdict(config), "base_model": base_model or config.base_model})
    path = Path(path)
    with atomic_directory(path, marker=MODEL_FILES) as tmp:
        record = {"format": "scratchlm-lora", **asdict(config), "layers": sorted(lora_layers(model)),
                  "base_fingerprint": base_fingerprint(model)}
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(record, indent=2) + "\n")
        save_file(lora_state_dict(model), str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        if extra is not None:
            extra(tmp)
    return path


def is_adapter_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_adapter_config(path: str | os.PathLike) -> LoRAConfig:
    file = Path(path) / ADAPTER_CONFIG
    if not file.is_file():
        raise NotFound(f"{path} is not a LoRA adapter directory (no {ADAPTER_CONFIG})")
    try:
        record = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise LoRAError(f"{file} is not valid JSON: {e}") from None
    keys = {"rank", "alpha", "dropout", "targets", "base_model"}
    try:
        return LoRAConfig(**{k: v for k, v in record.items() if k in keys})
    except TypeError as e:
        raise LoRAError(f"{file}: {e}") from None


def _read_fingerprint(path: str | os.PathLike) -> dict | None:
    """The base fingerprint an adapter records (None for adapters saved before it was)."""
    try:
        found = json.loads((Path(path) / ADAPTER_CONFIG).read_text()).get("base_fingerprint")
    except (OSError, ValueError, AttributeError):
        return None
    ok = isinstance(found, dict) and all(isinstance(v, list) and all(isinstance(x, (int, float)) for x in v)
                                         for v in found.values())
    return found if ok else None


def load_adapter(model: nn.Module, path: str | os.PathLike, freeze: bool = True) -> nn.Module:
    """Wrap ``model``'s layers as the adapter in ``path`` says and load its A and B, in place."""
    config = read_adapter_config(path)
    weights = Path(path) / ADAPTER_WEIGHTS
    try:
        state = load_file(str(weights))
    except FileNotFoundError:
        raise NotFound(f"{path} has no {ADAPTER_WEIGHTS}") from None
    except (SafetensorError, OSError, RuntimeError) as e:
        raise LoRAError(f"{weights} is corrupt or truncated ({str(e).splitlines()[0]})") from None
    apply_lora(model, config.rank, config.alpha, config.dropout, config.targets, freeze=freeze)
    model.lora_config = config
    expected = lora_state_dict(model)
    if set(state) != set(expected):
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise LoRAError(f"{weights} does not fit this model (missing: {missing[:3]}, unexpected: {unexpected[:3]})")
    layers = lora_layers(model)
    for key, tensor in state.items():
        layer_name, _, which = key.rpartition(".")
        param = getattr(layers[layer_name], which)
        if param.shape != tensor.shape:
            raise LoRAError(f"{weights}: {key} has shape {tuple(tensor.shape)}, the model needs "
                            f"{tuple(param.shape)} (was the adapter trained on another base model?)")
    recorded = _read_fingerprint(path)  # the same shapes, but the same weights underneath?
    if recorded is not None and not _same_base(recorded, base_fingerprint(model)):
        raise LoRAError(f"{path} was trained on another base model ({config.base_model or 'unrecorded'}): the "
                        "weights under its layers differ from this base's; give the base it was trained on")
    with torch.no_grad():
        for key, tensor in state.items():
            layer_name, _, which = key.rpartition(".")
            getattr(layers[layer_name], which).copy_(tensor)
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


__all__ = ["LoRAConfig", "LoRALinear", "LoRAError", "apply_lora", "merge_lora", "lora_layers", "adapters_disabled",
           "lora_state_dict", "save_adapter", "load_adapter", "read_adapter_config", "is_adapter_dir",
           "count_parameters", "LINEAR_NAMES", "DEFAULT_TARGETS", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS"]
