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

    MixtralForCausalLM, Qwen3MoeForCausalLM: the MLP is a mixture of experts (moe.py)
    model.layers.{i}.block_sparse_moe.gate   blocks.{i}.mlp.router        (Qwen3-MoE: mlp.gate)
    ...experts.{j}.w1, w3                    blocks.{i}.mlp.gate_up_proj[j] (stacked gate; up)
    ...experts.{j}.w2                        blocks.{i}.mlp.down_proj[j]
    (Qwen3-MoE names them gate_proj, up_proj, down_proj; transformers >= 5 holds them
    stacked in memory: mlp.experts.gate_up_proj, mlp.experts.down_proj)

Qwen2, Qwen3, Gemma 3 (text) and OLMo 2 are Llama-shaped: ``FAMILIES`` lists the config
fields each fixes, ``_LAYER_NAMES`` / ``_NORM_NAMES`` their extra tensors (q_norm, k_norm and
the norms of each norm placement: OLMo 2's post_attention_layernorm is a norm *after*
attention, Llama's the one before the MLP).

GPT-2 stores its linear layers as ``Conv1D`` with weight (in, out), the transpose of
``nn.Linear``'s (out, in). The Hugging Face Llama q/k weights are already permuted for the
half-split rotary layout that positions.apply_rope uses, so they load as they are.
"""

from __future__ import annotations

import json
import os
import re
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
    if model_type in FAMILIES:
        return _config_from_llama_like(c, model_type)
    if model_type == "gemma3":
        raise ConfigError("this is the multimodal Gemma 3 (model_type 'gemma3'); scratchlm loads the text-only "
                          "Gemma3ForCausalLM (model_type 'gemma3_text')")
    raise ConfigError(f"unsupported model_type {model_type!r}: scratchlm loads 'gpt2', "
                      + ", ".join(repr(t) for t in FAMILIES))


# ----------------------------------------------------------------------------------------
# The Llama-shaped families (rope, RMSNorm, gated MLP): one table
# ----------------------------------------------------------------------------------------
# model_type -> (architecture, the ModelConfig fields that the family fixes). Everything
# else (sizes, rope base, eps, tied head, window) is read from config.json. Export picks the
# first family whose fields all match the model's.
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaForCausalLM", dict(mlp="swiglu", norm_placement="pre", qk_norm=None, qkv_bias=False)),
    "qwen2": ("Qwen2ForCausalLM", dict(mlp="swiglu", norm_placement="pre", qk_norm=None, qkv_bias=True,
                                       bias=False)),
    "qwen3": ("Qwen3ForCausalLM", dict(mlp="swiglu", norm_placement="pre", qk_norm="head", qkv_bias=False,
                                       bias=False)),
    "gemma3_text": ("Gemma3ForCausalLM", dict(mlp="geglu", norm_placement="sandwich", qk_norm="head",
                                              norm_plus_one=True, scale_embeddings=True, qkv_bias=False,
                                              bias=False)),
    "olmo2": ("Olmo2ForCausalLM", dict(mlp="swiglu", norm_placement="post", qk_norm="projection",
                                       qkv_bias=False, bias=False)),
    # Mixtures of experts (n_experts > 0): Llama / Qwen3 attention, SwiGLU experts.
    "mixtral": ("MixtralForCausalLM", dict(mlp="swiglu", norm_placement="pre", qk_norm=None, qkv_bias=False,
                                           bias=False, norm_topk_prob=True)),
    "qwen3_moe": ("Qwen3MoeForCausalLM", dict(mlp="swiglu", norm_placement="pre", qk_norm="head",
                                              qkv_bias=False, bias=False)),
}
MOE_FAMILIES = ("mixtral", "qwen3_moe")
_PLAIN = dict(norm="rmsnorm", positions="rope", norm_plus_one=False, scale_embeddings=False,
              query_pre_attn_scalar=None, sliding_window=None, rope_local_theta=None)  # unless the family says

# Per-layer weights: scratchlm name (under blocks.{i}.) -> HF name (under model.layers.{i}.).
# q, k, v are one stacked matrix here and three there (see _from_llama_like).
_LAYER_NAMES = {"attn.out_proj": "self_attn.o_proj", "mlp.gate_proj": "mlp.gate_proj",
                "mlp.up_proj": "mlp.up_proj", "mlp.down_proj": "mlp.down_proj",
                "attn.q_norm": "self_attn.q_norm", "attn.k_norm": "self_attn.k_norm"}
_NORM_NAMES = {  # norm_placement -> the block's norms
    "pre": {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"},
    "post": {"attn_post_norm": "post_attention_layernorm", "mlp_post_norm": "post_feedforward_layernorm"},
    "sandwich": {"attn_norm": "input_layernorm", "attn_post_norm": "post_attention_layernorm",
                 "mlp_norm": "pre_feedforward_layernorm", "mlp_post_norm": "post_feedforward_layernorm"},
}
_LAYER_TYPES = {"full_attention": "global", "sliding_attention": "local"}


def _rope(c: Mapping, layer_type: str = "full_attention") -> tuple[float | None, dict | None]:
    """(rope_theta, rope scaling or None) of config.json; transformers >= 5 keeps them in
    rope_parameters, per layer type for Gemma 3."""
    theta, scaling = c.get("rope_theta"), c.get("rope_scaling")
    params = c.get("rope_parameters")
    if params and layer_type in params:
        params = params[layer_type]
    if params:
        theta = params.get("rope_theta", theta)
        scaling = params if params.get("rope_type", "default") != "default" else None
    return theta, scaling


def _config_from_llama_like(c: Mapping, model_type: str) -> ModelConfig:
    _, fixed = FAMILIES[model_type]
    rope_theta, scaling = _rope(c)
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind != "llama3":
            raise ConfigError(f"unsupported rope scaling {kind!r} (only Llama 3.1 'llama3' scaling is known)")
        scaling = {"factor": float(scaling["factor"]), "low_freq_factor": float(scaling["low_freq_factor"]),
                   "high_freq_factor": float(scaling["high_freq_factor"]),
                   "original_context_length": int(scaling["original_max_position_embeddings"])}
    fields = {**_PLAIN, **fixed}
    if model_type == "llama":
        if bool(c.get("mlp_bias", False)) != bool(c.get("attention_bias", False)):
            raise ConfigError("attention_bias and mlp_bias differ; scratchlm has one bias switch for both")
        fields["bias"] = bool(c.get("attention_bias", False))
    elif c.get("attention_bias"):
        raise ConfigError(f"{model_type} with attention_bias=true is not supported")
    if c.get("use_sliding_window"):
        raise ConfigError(f"{model_type} with use_sliding_window=true is not supported")
    if model_type == "gemma3_text":
        for cap in ("final_logit_softcapping", "attn_logit_softcapping"):
            if c.get(cap) is not None:
                raise ConfigError(f"gemma3_text with {cap}={c[cap]} is not supported (Gemma 3 has none)")
        if c.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
            raise ConfigError(f"gemma3_text with hidden_activation={c['hidden_activation']!r} is not supported")
        n = c["num_hidden_layers"]
        types = c.get("layer_types") or [
            "full_attention" if (i + 1) % c.get("sliding_window_pattern", 6) == 0 else "sliding_attention"
            for i in range(n)]
        local_theta, _ = _rope(c, "sliding_attention")
        layer_types = [_LAYER_TYPES[t] for t in types]
        fields.update(query_pre_attn_scalar=float(c["query_pre_attn_scalar"]), layer_types=layer_types,
                      sliding_window=c["sliding_window"] if "local" in layer_types else None,
                      rope_local_theta=float(c.get("rope_local_base_freq") or local_theta))
    if model_type in MOE_FAMILIES:
        fields.update(_moe_config_from_hf(c, model_type))
    dtype = str(c.get("torch_dtype") or c.get("dtype") or "float32").replace("torch.", "")
    return ModelConfig(
        vocab_size=c["vocab_size"], context_length=c["max_position_embeddings"], d_model=c["hidden_size"],
        n_layers=c["num_hidden_layers"], n_heads=c["num_attention_heads"],
        n_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"], d_ff=c["intermediate_size"],
        head_dim=c.get("head_dim"), rope_theta=float(rope_theta or 10000.0), rope_scaling=scaling,
        tie_embeddings=bool(c.get("tie_word_embeddings", model_type == "gemma3_text")),
        norm_eps=c.get("rms_norm_eps", 1e-6), dtype=dtype if dtype in ("float32", "bfloat16", "float16") else "float32",
        **fields)


def _moe_config_from_hf(c: Mapping, model_type: str) -> dict:
    """The mixture-of-experts fields of a Mixtral / Qwen3-MoE config.json."""
    if model_type == "mixtral":
        if c.get("sliding_window") is not None:
            raise ConfigError(f"mixtral with sliding_window={c['sliding_window']} is not supported "
                              "(Mixtral 8x7B has none)")
        return dict(n_experts=c["num_local_experts"], experts_per_token=c["num_experts_per_tok"],
                    d_ff_expert=c["intermediate_size"], router_aux_loss_coef=float(c.get("router_aux_loss_coef", 0.0)))
    if c.get("decoder_sparse_step", 1) != 1 or c.get("mlp_only_layers"):
        raise ConfigError("qwen3_moe with dense layers (decoder_sparse_step != 1 or mlp_only_layers) is not "
                          "supported: every layer must be a mixture of experts")
    n_experts = c["num_experts"] if "num_experts" in c else c["num_local_experts"]  # transformers >= 5 renames it
    return dict(n_experts=n_experts, experts_per_token=c["num_experts_per_tok"],
                d_ff_expert=c["moe_intermediate_size"], norm_topk_prob=bool(c.get("norm_topk_prob", True)),
                router_aux_loss_coef=float(c.get("router_aux_loss_coef", 0.0)))


def hf_family(config: ModelConfig) -> str:
    """The model_type of the Llama-shaped transformers family that has ``config``'s shape."""
    for model_type, (_, fixed) in FAMILIES.items():
        wanted = {**_PLAIN, **fixed}
        if model_type == "gemma3_text":  # the window, its layers and the scalar are free
            for free in ("query_pre_attn_scalar", "sliding_window", "rope_local_theta"):
                wanted.pop(free)
        if (model_type in MOE_FAMILIES) != bool(config.n_experts):
            continue
        if all(getattr(config, k) == v for k, v in wanted.items()):
            return model_type
    raise ConfigError("no Hugging Face family has this model's shape, so it cannot be exported (scratchlm "
                      "exports GPT-2, " + ", ".join(arch for arch, _ in FAMILIES.values()) + ")")


def _layer_names(config: ModelConfig) -> dict[str, str]:
    """scratchlm -> HF names of one layer's tensors, except the stacked q, k, v."""
    names = {**_NORM_NAMES[config.norm_placement]}
    names.update({k: v for k, v in _LAYER_NAMES.items() if config.qk_norm or "_norm" not in k})
    if config.mlp not in ("swiglu", "geglu"):
        names.pop("mlp.gate_proj")
    if config.n_experts:  # the experts' names: _experts_from_hf
        for proj in ("gate_proj", "up_proj", "down_proj"):
            names.pop(f"mlp.{proj}")
    out = {f"{ours}.weight": f"{theirs}.weight" for ours, theirs in names.items()}
    if config.bias:
        out.update({f"{ours}.bias": f"{theirs}.bias" for ours, theirs in names.items() if "norm" not in ours})
    return out


def convert_hf_state_dict(state: Mapping[str, torch.Tensor], config: ModelConfig, model_type: str) -> dict[str, torch.Tensor]:
    """Rename (and transpose / stack) a Hugging Face state dict into scratchlm's keys."""
    if model_type == "gpt2":
        return _from_gpt2(state, config)
    if model_type in FAMILIES:
        return _from_llama_like(state, config)
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


def _from_llama_like(state, config):
    get = _getter(state, "model.")
    out = {"tok_emb.weight": get("embed_tokens.weight"), "final_norm.weight": get("norm.weight")}
    names = _layer_names(config)
    for i in range(config.n_layers):
        a = f"layers.{i}.self_attn"
        out[f"blocks.{i}.attn.qkv_proj.weight"] = torch.cat(
            [get(f"{a}.q_proj.weight"), get(f"{a}.k_proj.weight"), get(f"{a}.v_proj.weight")], dim=0)
        if config.bias or config.qkv_bias:
            out[f"blocks.{i}.attn.qkv_proj.bias"] = torch.cat(
                [get(f"{a}.q_proj.bias"), get(f"{a}.k_proj.bias"), get(f"{a}.v_proj.bias")], dim=0)
        for ours, theirs in names.items():
            out[f"blocks.{i}.{ours}"] = get(f"layers.{i}.{theirs}")
        if config.n_experts:
            out.update(_experts_from_hf(state, get, i, config))
    tied = config.tie_embeddings or "lm_head.weight" not in state
    out["lm_head.weight"] = out["tok_emb.weight"] if tied else state["lm_head.weight"]
    _check_family(state, out, config)
    return out


def _check_family(state, out, config) -> None:
    """A checkpoint of another family (QK-norm or post-norm weights this config has no place
    for) is an error, not weights silently left out."""
    taken = {"model.embed_tokens.weight", "embed_tokens.weight", "lm_head.weight", "model.norm.weight", "norm.weight"}
    names = set(_layer_names(config).values()) | {f"self_attn.{p}_proj.{w}" for p in "qkv" for w in ("weight", "bias")}
    left = sorted(k for k in state if k not in taken and k.split(".", 3)[-1] not in names
                  and not k.endswith("rotary_emb.inv_freq") and not (config.n_experts and _EXPERT_KEY.search(k)))
    if left:
        raise CheckpointError(f"the checkpoint has weights this {hf_family_name(config)} config has no place for "
                              f"({', '.join(left[:3])}{' ...' if len(left) > 3 else ''}): it is another family's")


# The experts' names in the checkpoints: (gate, up, down) of expert j, under the MoE block.
EXPERT_NAMES = {"block_sparse_moe": ("w1", "w3", "w2"),  # Mixtral's hub files
                "mlp": ("gate_proj", "up_proj", "down_proj")}  # Qwen3-MoE (and Mixtral in transformers >= 5)
_EXPERT_KEY = re.compile(r"layers\.\d+\.(block_sparse_moe|mlp)\.(gate\.weight|experts\.)")


def _experts_from_hf(state, get, i: int, config: ModelConfig) -> dict[str, torch.Tensor]:
    """One MoE layer's router and experts, stacked as moe.MoE holds them, from a checkpoint
    with one tensor per expert (the hub files) or the stacked tensors (transformers >= 5)."""
    def has(key):
        return key in state or "model." + key in state

    block = next((b for b in EXPERT_NAMES if has(f"layers.{i}.{b}.gate.weight")), "mlp")
    m, ours = f"layers.{i}.{block}", f"blocks.{i}.mlp"
    out = {f"{ours}.router.weight": get(f"{m}.gate.weight")}
    if has(f"{m}.experts.gate_up_proj"):
        out[f"{ours}.gate_up_proj"] = get(f"{m}.experts.gate_up_proj")  # (E, 2f, d)
        out[f"{ours}.down_proj"] = get(f"{m}.experts.down_proj")  # (E, d, f)
        return out
    names = next((n for n in EXPERT_NAMES.values() if has(f"{m}.experts.0.{n[0]}.weight")), EXPERT_NAMES[block])
    gate, up, down = ([get(f"{m}.experts.{j}.{name}.weight") for j in range(config.n_experts)] for name in names)
    out[f"{ours}.gate_up_proj"] = torch.stack([torch.cat([g, u]) for g, u in zip(gate, up)])  # (E, 2f, d)
    out[f"{ours}.down_proj"] = torch.stack(down)  # (E, d, f)
    return out


def _experts_to_hf(state, i: int, config: ModelConfig, model_type: str) -> dict[str, torch.Tensor]:
    """The inverse of _experts_from_hf, in the hub's layout (one tensor per expert)."""
    block = "block_sparse_moe" if model_type == "mixtral" else "mlp"
    m, ours, f = f"model.layers.{i}.{block}", f"blocks.{i}.mlp", config.d_ff_expert
    gate, up, down = EXPERT_NAMES[block]
    out = {f"{m}.gate.weight": state[f"{ours}.router.weight"]}
    for j in range(config.n_experts):
        gate_up = state[f"{ours}.gate_up_proj"][j]
        out[f"{m}.experts.{j}.{gate}.weight"] = gate_up[:f].contiguous()
        out[f"{m}.experts.{j}.{up}.weight"] = gate_up[f:].contiguous()
        out[f"{m}.experts.{j}.{down}.weight"] = state[f"{ours}.down_proj"][j].contiguous()
    return out


def hf_family_name(config: ModelConfig) -> str:
    try:
        return hf_family(config)
    except ConfigError:
        return "model"


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
    model_type = hf_family(config)  # raises for a shape no family has
    out = {"model.embed_tokens.weight": state["tok_emb.weight"], "model.norm.weight": state["final_norm.weight"]}
    q, kv = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    names = _layer_names(config)
    for i in range(config.n_layers):
        a = f"model.layers.{i}.self_attn"
        wq, wk, wv = state[f"blocks.{i}.attn.qkv_proj.weight"].split([q, kv, kv], dim=0)
        out[f"{a}.q_proj.weight"], out[f"{a}.k_proj.weight"], out[f"{a}.v_proj.weight"] = \
            wq.contiguous(), wk.contiguous(), wv.contiguous()
        if config.bias or config.qkv_bias:
            bq, bk, bv = state[f"blocks.{i}.attn.qkv_proj.bias"].split([q, kv, kv], dim=0)
            out[f"{a}.q_proj.bias"], out[f"{a}.k_proj.bias"], out[f"{a}.v_proj.bias"] = bq, bk, bv
        for ours, theirs in names.items():
            out[f"model.layers.{i}.{theirs}"] = state[f"blocks.{i}.{ours}"]
        if config.n_experts:
            out.update(_experts_to_hf(state, i, config, model_type))
    if not config.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    return out


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
    model_type = hf_family(config)  # raises for a shape no family has
    scaling = None
    if config.rope_scaling:
        s = config.rope_scaling
        scaling = {"rope_type": "llama3", "factor": s["factor"], "low_freq_factor": s["low_freq_factor"],
                   "high_freq_factor": s["high_freq_factor"],
                   "original_max_position_embeddings": s["original_context_length"]}
    out = {"model_type": model_type, "architectures": [FAMILIES[model_type][0]], "hidden_size": config.d_model,
           "intermediate_size": config.d_ff, "num_hidden_layers": config.n_layers,
           "num_attention_heads": config.n_heads, "num_key_value_heads": config.n_kv_heads,
           "head_dim": config.head_dim, "max_position_embeddings": config.context_length,
           "rms_norm_eps": config.norm_eps, "rope_theta": config.rope_theta, "rope_scaling": scaling,
           "attention_bias": config.bias, "hidden_act": "silu", **common}
    if model_type == "llama":
        out["mlp_bias"] = config.bias
    if model_type == "gemma3_text":
        out.update(hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=_int_if_whole(config.query_pre_attn_scalar or config.head_dim),
                   sliding_window=config.sliding_window, rope_local_base_freq=config.rope_local_theta or config.rope_theta,
                   layer_types=[{v: k for k, v in _LAYER_TYPES.items()}[t] for t in config.layer_types],
                   final_logit_softcapping=None, attn_logit_softcapping=None)
        del out["hidden_act"]
    if model_type == "mixtral":  # Mixtral's intermediate_size is its experts'
        out.update(intermediate_size=config.d_ff_expert, num_local_experts=config.n_experts,
                   num_experts_per_tok=config.experts_per_token, router_aux_loss_coef=config.router_aux_loss_coef,
                   sliding_window=None)
    if model_type == "qwen3_moe":
        out.update(moe_intermediate_size=config.d_ff_expert, num_experts=config.n_experts,
                   num_experts_per_tok=config.experts_per_token, norm_topk_prob=config.norm_topk_prob,
                   router_aux_loss_coef=config.router_aux_loss_coef, decoder_sparse_step=1, mlp_only_layers=[],
                   use_sliding_window=False)
    return out


def _int_if_whole(x: float) -> int | float:
    """transformers' Gemma3TextConfig types query_pre_attn_scalar as an int."""
    return int(x) if float(x).is_integer() else x


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
