"""Hugging Face <-> scratchlm: the config and key maps, loading a directory, writing one.

Neighbours: safetensors_io.py reads the weights files, hub.py finds a hub id's files,
state_dict.py builds the model from the converted tensors, and ``load.load_any`` is the one
entry point that opens any model (ours, Hugging Face's, a preset).

The key maps are written out so a reader can see which tensor goes where:

    GPT2LMHeadModel                          scratchlm
    transformer.wte.weight                   tok_emb.weight
    transformer.wpe.weight                   pos_emb.weight
    transformer.h.{i}.ln_1.{weight,bias}     blocks.{i}.attn_norm.{weight,bias}
    transformer.h.{i}.attn.c_attn.*          blocks.{i}.attn.qkv_proj.*   (Conv1D: transposed)
    transformer.h.{i}.attn.c_proj.*          blocks.{i}.attn.out_proj.*   (Conv1D: transposed)
    transformer.h.{i}.ln_2.*                 blocks.{i}.mlp_norm.*
    transformer.h.{i}.mlp.c_fc.*             blocks.{i}.mlp.up_proj.*     (Conv1D: transposed)
    transformer.h.{i}.mlp.c_proj.*           blocks.{i}.mlp.down_proj.*   (Conv1D: transposed)
    transformer.ln_f.*                       final_norm.*
    lm_head.weight                           lm_head.weight (tied to wte)

    LlamaForCausalLM                         scratchlm
    model.embed_tokens.weight                tok_emb.weight
    model.layers.{i}.input_layernorm         blocks.{i}.attn_norm
    model.layers.{i}.self_attn.{q,k,v}_proj  blocks.{i}.attn.qkv_proj (stacked q; k; v)
    model.layers.{i}.self_attn.o_proj        blocks.{i}.attn.out_proj
    model.layers.{i}.post_attention_layernorm blocks.{i}.mlp_norm
    model.layers.{i}.mlp.{gate,up,down}_proj blocks.{i}.mlp.{gate,up,down}_proj
    model.norm                               final_norm
    lm_head.weight                           lm_head.weight (absent when tied)

GPT-2 stores its linear layers as ``Conv1D`` with weight (in, out), the transpose of
``nn.Linear``'s (out, in). The Hugging Face Llama q/k weights are already permuted for the
half-split rotary layout that model.apply_rope uses, so they load as they are.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from .atomic import MODEL_FILES, atomic_directory
from .config import ConfigError, ModelConfig
from .hub import resolve_hf_source
from .model import Transformer
from .safetensors_io import LazyWeights
from .state_dict import CheckpointError, model_from_state_dict, read_json


def config_from_hf(hf_config) -> ModelConfig:
    """ModelConfig from a transformers config object or its dict (config.json)."""
    c = hf_config if isinstance(hf_config, Mapping) else hf_config.to_dict()
    model_type = c.get("model_type")
    if model_type == "gpt2":
        return ModelConfig(
            vocab_size=c["vocab_size"], context_length=c["n_positions"], d_model=c["n_embd"],
            n_layers=c["n_layer"], n_heads=c["n_head"], d_ff=c.get("n_inner") or 4 * c["n_embd"],
            norm="layernorm", mlp="gelu", positions="learned", bias=True,
            tie_embeddings=c.get("tie_word_embeddings", True), norm_eps=c.get("layer_norm_epsilon", 1e-5),
            dtype="float32")
    if model_type == "llama":
        scaling = c.get("rope_scaling")
        rope_theta = c.get("rope_theta")
        params = c.get("rope_parameters")  # transformers >= 5 moves theta and scaling here
        if params:
            rope_theta = params.get("rope_theta", rope_theta)
            if params.get("rope_type", "default") != "default":
                scaling = params
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind != "llama3":
                raise ConfigError(f"unsupported rope scaling {kind!r} (only Llama 3.1 'llama3' scaling is known)")
            scaling = {"factor": float(scaling["factor"]), "low_freq_factor": float(scaling["low_freq_factor"]),
                       "high_freq_factor": float(scaling["high_freq_factor"]),
                       "original_context_length": int(scaling["original_max_position_embeddings"])}
        head_dim = c.get("head_dim")
        if head_dim is not None and head_dim != c["hidden_size"] // c["num_attention_heads"]:
            raise ConfigError(f"head_dim={head_dim} differs from hidden_size / num_attention_heads; not supported")
        if bool(c.get("mlp_bias", False)) != bool(c.get("attention_bias", False)):
            raise ConfigError("attention_bias and mlp_bias differ; scratchlm has one bias switch for both")
        dtype = str(c.get("torch_dtype") or c.get("dtype") or "float32").replace("torch.", "")
        return ModelConfig(
            vocab_size=c["vocab_size"], context_length=c["max_position_embeddings"], d_model=c["hidden_size"],
            n_layers=c["num_hidden_layers"], n_heads=c["num_attention_heads"],
            n_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"], d_ff=c["intermediate_size"],
            norm="rmsnorm", mlp="swiglu", positions="rope", rope_theta=float(rope_theta or 10000.0),
            rope_scaling=scaling, bias=bool(c.get("attention_bias", False)),
            tie_embeddings=bool(c.get("tie_word_embeddings", False)), norm_eps=c.get("rms_norm_eps", 1e-6),
            dtype=dtype if dtype in ("float32", "bfloat16", "float16") else "float32")
    raise ConfigError(f"unsupported model_type {model_type!r}: scratchlm loads 'gpt2' and 'llama'")


def convert_hf_state_dict(state: Mapping[str, torch.Tensor], config: ModelConfig, model_type: str) -> dict[str, torch.Tensor]:
    """Rename (and transpose / stack) a Hugging Face state dict into scratchlm's keys."""
    if model_type == "gpt2":
        return _from_gpt2(state, config)
    if model_type == "llama":
        return _from_llama(state, config)
    raise ConfigError(f"unsupported model_type {model_type!r}")


def _getter(state: Mapping[str, torch.Tensor], prefix: str, transpose: bool = False):
    """state[key] (transposed and contiguous if asked), accepting keys with or without the
    model's prefix ("transformer.", "model.").

    Only the tensors asked for are touched, so a lazy mapping (see ``LazyWeights``) reads
    each tensor from disk exactly when it is converted."""
    def get(key: str) -> torch.Tensor:
        for name in (key, prefix + key):
            if name in state:
                if not transpose:
                    return state[name]
                if hasattr(state, "transposed"):
                    return state.transposed(name)
                return state[name].t().contiguous()
        raise KeyError(prefix + key)
    return get


def _from_gpt2(state, config):
    get = _getter(state, "transformer.")
    get_t = _getter(state, "transformer.", transpose=True)
    out = {"tok_emb.weight": get("wte.weight"), "pos_emb.weight": get("wpe.weight"),
           "final_norm.weight": get("ln_f.weight"), "final_norm.bias": get("ln_f.bias")}
    conv1d = {"attn.c_attn": "attn.qkv_proj", "attn.c_proj": "attn.out_proj",
              "mlp.c_fc": "mlp.up_proj", "mlp.c_proj": "mlp.down_proj"}
    norms = {"ln_1": "attn_norm", "ln_2": "mlp_norm"}
    for i in range(config.n_layers):
        for theirs, ours in conv1d.items():
            # Conv1D (in, out) -> Linear (out, in); contiguous so matmuls and safetensors like it.
            out[f"blocks.{i}.{ours}.weight"] = get_t(f"h.{i}.{theirs}.weight")
            out[f"blocks.{i}.{ours}.bias"] = get(f"h.{i}.{theirs}.bias")
        for theirs, ours in norms.items():
            out[f"blocks.{i}.{ours}.weight"] = get(f"h.{i}.{theirs}.weight")
            out[f"blocks.{i}.{ours}.bias"] = get(f"h.{i}.{theirs}.bias")
    tied = config.tie_embeddings or "lm_head.weight" not in state
    out["lm_head.weight"] = out["tok_emb.weight"] if tied else state["lm_head.weight"]
    return out


def _from_llama(state, config):
    get = _getter(state, "model.")
    out = {"tok_emb.weight": get("embed_tokens.weight"), "final_norm.weight": get("norm.weight")}
    for i in range(config.n_layers):
        a = f"layers.{i}.self_attn"
        out[f"blocks.{i}.attn.qkv_proj.weight"] = torch.cat(
            [get(f"{a}.q_proj.weight"), get(f"{a}.k_proj.weight"), get(f"{a}.v_proj.weight")], dim=0)
        if config.bias:
            out[f"blocks.{i}.attn.qkv_proj.bias"] = torch.cat(
                [get(f"{a}.q_proj.bias"), get(f"{a}.k_proj.bias"), get(f"{a}.v_proj.bias")], dim=0)
            out[f"blocks.{i}.attn.out_proj.bias"] = get(f"{a}.o_proj.bias")
            for proj in ("gate_proj", "up_proj", "down_proj"):
                out[f"blocks.{i}.mlp.{proj}.bias"] = get(f"layers.{i}.mlp.{proj}.bias")
        out[f"blocks.{i}.attn.out_proj.weight"] = get(f"{a}.o_proj.weight")
        out[f"blocks.{i}.attn_norm.weight"] = get(f"layers.{i}.input_layernorm.weight")
        out[f"blocks.{i}.mlp_norm.weight"] = get(f"layers.{i}.post_attention_layernorm.weight")
        for proj in ("gate_proj", "up_proj", "down_proj"):
            out[f"blocks.{i}.mlp.{proj}.weight"] = get(f"layers.{i}.mlp.{proj}.weight")
    tied = config.tie_embeddings or "lm_head.weight" not in state
    out["lm_head.weight"] = out["tok_emb.weight"] if tied else state["lm_head.weight"]
    return out


def to_hf_state_dict(state: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """The inverse of convert_hf_state_dict: scratchlm keys -> GPT2LMHeadModel / LlamaForCausalLM keys."""
    if config.positions == "learned" and config.norm == "layernorm" and config.mlp == "gelu" and config.bias:
        out = {"transformer.wte.weight": state["tok_emb.weight"], "transformer.wpe.weight": state["pos_emb.weight"],
               "transformer.ln_f.weight": state["final_norm.weight"], "transformer.ln_f.bias": state["final_norm.bias"]}
        conv1d = {"attn.c_attn": "attn.qkv_proj", "attn.c_proj": "attn.out_proj",
                  "mlp.c_fc": "mlp.up_proj", "mlp.c_proj": "mlp.down_proj"}
        for i in range(config.n_layers):
            for theirs, ours in conv1d.items():
                out[f"transformer.h.{i}.{theirs}.weight"] = state[f"blocks.{i}.{ours}.weight"].t().contiguous()
                out[f"transformer.h.{i}.{theirs}.bias"] = state[f"blocks.{i}.{ours}.bias"]
            for theirs, ours in {"ln_1": "attn_norm", "ln_2": "mlp_norm"}.items():
                out[f"transformer.h.{i}.{theirs}.weight"] = state[f"blocks.{i}.{ours}.weight"]
                out[f"transformer.h.{i}.{theirs}.bias"] = state[f"blocks.{i}.{ours}.bias"]
        if not config.tie_embeddings:
            out["lm_head.weight"] = state["lm_head.weight"]
        return out
    if config.positions == "rope" and config.norm == "rmsnorm" and config.mlp == "swiglu":
        out = {"model.embed_tokens.weight": state["tok_emb.weight"], "model.norm.weight": state["final_norm.weight"]}
        q, kv = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
        for i in range(config.n_layers):
            a = f"model.layers.{i}.self_attn"
            wq, wk, wv = state[f"blocks.{i}.attn.qkv_proj.weight"].split([q, kv, kv], dim=0)
            out[f"{a}.q_proj.weight"], out[f"{a}.k_proj.weight"], out[f"{a}.v_proj.weight"] = \
                wq.contiguous(), wk.contiguous(), wv.contiguous()
            if config.bias:
                bq, bk, bv = state[f"blocks.{i}.attn.qkv_proj.bias"].split([q, kv, kv], dim=0)
                out[f"{a}.q_proj.bias"], out[f"{a}.k_proj.bias"], out[f"{a}.v_proj.bias"] = bq, bk, bv
                out[f"{a}.o_proj.bias"] = state[f"blocks.{i}.attn.out_proj.bias"]
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    out[f"model.layers.{i}.mlp.{proj}.bias"] = state[f"blocks.{i}.mlp.{proj}.bias"]
            out[f"{a}.o_proj.weight"] = state[f"blocks.{i}.attn.out_proj.weight"]
            out[f"model.layers.{i}.input_layernorm.weight"] = state[f"blocks.{i}.attn_norm.weight"]
            out[f"model.layers.{i}.post_attention_layernorm.weight"] = state[f"blocks.{i}.mlp_norm.weight"]
            for proj in ("gate_proj", "up_proj", "down_proj"):
                out[f"model.layers.{i}.mlp.{proj}.weight"] = state[f"blocks.{i}.mlp.{proj}.weight"]
        if not config.tie_embeddings:
            out["lm_head.weight"] = state["lm_head.weight"]
        return out
    raise ConfigError("only GPT-2-shaped (learned, layernorm, gelu, bias) and Llama-shaped "
                      "(rope, rmsnorm, swiglu) models can be exported to Hugging Face")


def from_hf_model(hf_model) -> Transformer:
    """A scratchlm Transformer holding a copy of the weights of an in-memory transformers model."""
    config = config_from_hf(hf_model.config)
    dtype = next(hf_model.parameters()).dtype
    # Copies: the converted state shares storage with hf_model where no transpose or stacking
    # was needed, and the two models must not write into each other's weights.
    state = {k: v.detach().clone() for k, v in convert_hf_state_dict(hf_model.state_dict(), config,
                                                                       hf_model.config.model_type).items()}
    return model_from_state_dict(config, state, dtype=dtype, source=type(hf_model).__name__)


# ----------------------------------------------------------------------------------------
# Loading a Hugging Face directory (or hub id) without holding two copies of the weights
# ----------------------------------------------------------------------------------------
def is_hf_dir(path: str | os.PathLike) -> bool:
    """True for a directory whose config.json is a Hugging Face one (it names a model_type)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return False
    return isinstance(data, dict) and "model_type" in data  # a config.json of null or [] is not one


def load_hf(source: str | os.PathLike, device="cpu", dtype: torch.dtype | None = None,
            with_tokenizer: bool = True, revision: str | None = None):
    """(model, tokenizer or None) from a Hugging Face directory, or a hub id when online.

    Each tensor is read from its file when it is converted (``LazyWeights``) and handed to a
    model built on the meta device (``model_from_state_dict``): the weights are held once.
    The model keeps the checkpoint's dtype unless ``dtype`` is given.
    """
    directory = resolve_hf_source(source, revision)
    hf_config = read_json(directory / "config.json")
    try:
        config = config_from_hf(hf_config)
    except (KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"{directory / 'config.json'}: missing or bad field {e}") from None
    weights = LazyWeights(directory)
    try:
        state = convert_hf_state_dict(weights, config, hf_config["model_type"])
    except KeyError as e:
        raise CheckpointError(f"{directory}: weight {e} not found; the checkpoint does not match "
                              f"config.json or is incomplete") from None
    finally:
        weights.close()
    target = dtype or state["tok_emb.weight"].dtype
    model = model_from_state_dict(config, state, device=device, dtype=target, source=str(directory))
    model.requires_grad_(False).eval()
    tokenizer = None
    if with_tokenizer:
        from .tokenizer import load_tokenizer

        tokenizer = load_tokenizer(directory)
    return model, tokenizer


# ----------------------------------------------------------------------------------------
# Writing a directory transformers loads
# ----------------------------------------------------------------------------------------
def hf_config_dict(config: ModelConfig, tokenizer=None) -> dict:
    """The config.json of the Hugging Face model that has ``config``'s shape."""
    bos = getattr(tokenizer, "bos_id", None) if tokenizer is not None else None
    eos = getattr(tokenizer, "eot_id", None) if tokenizer is not None else None
    common = {"vocab_size": config.vocab_size, "tie_word_embeddings": config.tie_embeddings,
              "torch_dtype": config.dtype, "bos_token_id": bos, "eos_token_id": eos}
    if config.positions == "learned" and config.norm == "layernorm" and config.bias \
            and config.mlp in ("gelu", "relu") and config.n_kv_heads == config.n_heads:
        return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_positions": config.context_length,
                "n_embd": config.d_model, "n_layer": config.n_layers, "n_head": config.n_heads,
                "n_inner": config.d_ff, "activation_function": "gelu_new" if config.mlp == "gelu" else "relu",
                "layer_norm_epsilon": config.norm_eps, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
                **common}
    if config.positions == "rope" and config.norm == "rmsnorm" and config.mlp == "swiglu":
        scaling = None
        if config.rope_scaling:
            s = config.rope_scaling
            scaling = {"rope_type": "llama3", "factor": s["factor"], "low_freq_factor": s["low_freq_factor"],
                       "high_freq_factor": s["high_freq_factor"],
                       "original_max_position_embeddings": s["original_context_length"]}
        return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": config.d_model,
                "intermediate_size": config.d_ff, "num_hidden_layers": config.n_layers,
                "num_attention_heads": config.n_heads, "num_key_value_heads": config.n_kv_heads,
                "head_dim": config.head_dim, "max_position_embeddings": config.context_length,
                "rms_norm_eps": config.norm_eps, "rope_theta": config.rope_theta, "rope_scaling": scaling,
                "attention_bias": config.bias, "mlp_bias": config.bias, "hidden_act": "silu", **common}
    raise ConfigError("only GPT-2-shaped (learned positions, layernorm, gelu/relu, biases, MHA) and "
                      "Llama-shaped (rope, rmsnorm, swiglu) models can be exported to Hugging Face")


def save_hf(directory: str | os.PathLike, model, tokenizer=None, inputs=()) -> Path:
    """Write ``model`` (and its tokenizer) as a Hugging Face directory: config.json,
    model.safetensors, generation_config.json and the tokenizer files. Atomic, like
    checkpoint.save_model, and with its rules: ``directory`` may replace only a model folder
    (or an empty one), never one of the ``inputs``."""
    from safetensors.torch import save_file

    config = model.config
    hf_config = hf_config_dict(config, tokenizer)  # raises before anything is written
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    hf_state = {k: v.contiguous() for k, v in to_hf_state_dict(state, config).items()}
    directory = Path(directory)
    with atomic_directory(directory, marker=MODEL_FILES, inputs=inputs) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        generation = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id") if hf_config[k] is not None}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        save_file(hf_state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            (tokenizer.save_hf if hasattr(tokenizer, "save_hf") else tokenizer.save)(tmp)
    return directory
