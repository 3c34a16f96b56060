"""Hugging Face <-> scratchlm weights.

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

from typing import Mapping

import torch

from .config import ModelConfig


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
                raise ValueError(f"unsupported rope scaling {kind!r} (only Llama 3.1 'llama3' scaling is known)")
            scaling = {"factor": float(scaling["factor"]), "low_freq_factor": float(scaling["low_freq_factor"]),
                       "high_freq_factor": float(scaling["high_freq_factor"]),
                       "original_context_length": int(scaling["original_max_position_embeddings"])}
        head_dim = c.get("head_dim")
        if head_dim is not None and head_dim != c["hidden_size"] // c["num_attention_heads"]:
            raise ValueError(f"head_dim={head_dim} differs from hidden_size / num_attention_heads; not supported")
        dtype = str(c.get("torch_dtype") or c.get("dtype") or "float32").replace("torch.", "")
        return ModelConfig(
            vocab_size=c["vocab_size"], context_length=c["max_position_embeddings"], d_model=c["hidden_size"],
            n_layers=c["num_hidden_layers"], n_heads=c["num_attention_heads"],
            n_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"], d_ff=c["intermediate_size"],
            norm="rmsnorm", mlp="swiglu", positions="rope", rope_theta=float(rope_theta or 10000.0),
            rope_scaling=scaling, bias=bool(c.get("attention_bias", False)),
            tie_embeddings=bool(c.get("tie_word_embeddings", False)), norm_eps=c.get("rms_norm_eps", 1e-6),
            dtype=dtype if dtype in ("float32", "bfloat16", "float16") else "float32")
    raise ValueError(f"unsupported model_type {model_type!r}: scratchlm loads 'gpt2' and 'llama'")


def convert_hf_state_dict(state: Mapping[str, torch.Tensor], config: ModelConfig, model_type: str) -> dict[str, torch.Tensor]:
    """Rename (and transpose / stack) a Hugging Face state dict into scratchlm's keys."""
    if model_type == "gpt2":
        return _from_gpt2(state, config)
    if model_type == "llama":
        return _from_llama(state, config)
    raise ValueError(f"unsupported model_type {model_type!r}")


def _from_gpt2(state, config):
    s = {k.removeprefix("transformer."): v for k, v in state.items()}
    out = {"tok_emb.weight": s["wte.weight"], "pos_emb.weight": s["wpe.weight"],
           "final_norm.weight": s["ln_f.weight"], "final_norm.bias": s["ln_f.bias"]}
    conv1d = {"attn.c_attn": "attn.qkv_proj", "attn.c_proj": "attn.out_proj",
              "mlp.c_fc": "mlp.up_proj", "mlp.c_proj": "mlp.down_proj"}
    norms = {"ln_1": "attn_norm", "ln_2": "mlp_norm"}
    for i in range(config.n_layers):
        for theirs, ours in conv1d.items():
            out[f"blocks.{i}.{ours}.weight"] = s[f"h.{i}.{theirs}.weight"].t()  # Conv1D (in, out) -> Linear (out, in)
            out[f"blocks.{i}.{ours}.bias"] = s[f"h.{i}.{theirs}.bias"]
        for theirs, ours in norms.items():
            out[f"blocks.{i}.{ours}.weight"] = s[f"h.{i}.{theirs}.weight"]
            out[f"blocks.{i}.{ours}.bias"] = s[f"h.{i}.{theirs}.bias"]
    out["lm_head.weight"] = s.get("lm_head.weight", s["wte.weight"])
    return out


def _from_llama(state, config):
    s = {k.removeprefix("model."): v for k, v in state.items()}
    out = {"tok_emb.weight": s["embed_tokens.weight"], "final_norm.weight": s["norm.weight"]}
    for i in range(config.n_layers):
        a = f"layers.{i}.self_attn"
        out[f"blocks.{i}.attn.qkv_proj.weight"] = torch.cat(
            [s[f"{a}.q_proj.weight"], s[f"{a}.k_proj.weight"], s[f"{a}.v_proj.weight"]], dim=0)
        if config.bias:
            out[f"blocks.{i}.attn.qkv_proj.bias"] = torch.cat(
                [s[f"{a}.q_proj.bias"], s[f"{a}.k_proj.bias"], s[f"{a}.v_proj.bias"]], dim=0)
            out[f"blocks.{i}.attn.out_proj.bias"] = s[f"{a}.o_proj.bias"]
        out[f"blocks.{i}.attn.out_proj.weight"] = s[f"{a}.o_proj.weight"]
        out[f"blocks.{i}.attn_norm.weight"] = s[f"layers.{i}.input_layernorm.weight"]
        out[f"blocks.{i}.mlp_norm.weight"] = s[f"layers.{i}.post_attention_layernorm.weight"]
        for proj in ("gate_proj", "up_proj", "down_proj"):
            out[f"blocks.{i}.mlp.{proj}.weight"] = s[f"layers.{i}.mlp.{proj}.weight"]
    out["lm_head.weight"] = state.get("lm_head.weight", s["embed_tokens.weight"])
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
            out[f"{a}.o_proj.weight"] = state[f"blocks.{i}.attn.out_proj.weight"]
            out[f"model.layers.{i}.input_layernorm.weight"] = state[f"blocks.{i}.attn_norm.weight"]
            out[f"model.layers.{i}.post_attention_layernorm.weight"] = state[f"blocks.{i}.mlp_norm.weight"]
            for proj in ("gate_proj", "up_proj", "down_proj"):
                out[f"model.layers.{i}.mlp.{proj}.weight"] = state[f"blocks.{i}.mlp.{proj}.weight"]
        if not config.tie_embeddings:
            out["lm_head.weight"] = state["lm_head.weight"]
        return out
    raise ValueError("only GPT-2-shaped (learned, layernorm, gelu, bias) and Llama-shaped "
                     "(rope, rmsnorm, swiglu) models can be exported to Hugging Face")


def load_hf_state_dict(model, state: Mapping[str, torch.Tensor], model_type: str) -> None:
    """Load a Hugging Face state dict into a scratchlm Transformer (strict: every key must match)."""
    ours = convert_hf_state_dict(state, model.config, model_type)
    expected = model.state_dict()
    for key, tensor in ours.items():
        if key not in expected:
            raise ValueError(f"unexpected weight {key}")
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(f"shape mismatch for {key}: checkpoint {tuple(tensor.shape)}, model {tuple(expected[key].shape)}")
    missing = set(expected) - set(ours)
    if missing:
        raise ValueError(f"missing weights: {', '.join(sorted(missing)[:5])}")
    model.load_state_dict(ours, strict=True)


def from_hf_model(hf_model):
    """A scratchlm Transformer holding the weights of an in-memory transformers model."""
    from .model import Transformer

    config = config_from_hf(hf_model.config)
    config = config.replace(dtype=str(next(hf_model.parameters()).dtype).replace("torch.", ""))
    model = Transformer(config)
    load_hf_state_dict(model, hf_model.state_dict(), hf_model.config.model_type)
    return model
