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

import json
import os
from pathlib import Path
from typing import Iterator, Mapping, Optional

import torch

from .checkpoint import CheckpointError, read_json
from .config import ConfigError, ModelConfig


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
        if bool(c.get("mlp_bias", False)) != bool(c.get("attention_bias", False)):
            raise ValueError("attention_bias and mlp_bias differ; scratchlm has one bias switch for both")
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


# ----------------------------------------------------------------------------------------
# Loading a Hugging Face directory (or hub id) without holding two copies of the weights
# ----------------------------------------------------------------------------------------
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


class SafetensorsFile:
    """Reads single tensors of a .safetensors file straight into fresh tensors.

    The format: 8 bytes (little-endian u64) = header size N, then N bytes of JSON
    {name: {"dtype", "shape", "data_offsets": [begin, end]}}, then the raw data, offsets
    counted from the end of the header. Reading with ``readinto`` into an empty tensor
    puts each weight in memory once: no memory map whose pages would count a second time.
    """

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "rb")  # noqa: SIM115 - kept open while tensors are read
        size = path.stat().st_size
        try:
            n = int.from_bytes(self.file.read(8), "little")
            if not 2 <= n <= size - 8:
                raise ValueError(f"header size {n} does not fit a file of {size} bytes")
            self.header = json.loads(self.file.read(n))
            self.data_start = 8 + n
            self.header.pop("__metadata__", None)
            for name, entry in self.header.items():
                begin, end = entry["data_offsets"]
                if entry["dtype"] not in SAFETENSORS_DTYPES:
                    raise ValueError(f"{name} has unsupported dtype {entry['dtype']}")
                if self.data_start + end > size:
                    raise ValueError(f"{name} ends past the end of the file")
        except (ValueError, KeyError, TypeError) as e:
            self.file.close()
            raise CheckpointError(f"{path} is corrupt or truncated ({e})") from None

    def keys(self):
        return self.header.keys()

    def get_transposed(self, name: str, rows_per_read: int = 32) -> torch.Tensor:
        """A 2-D tensor read straight into its transpose, a few rows at a time: no full-size
        temporary (which, freed between kept tensors, would fragment the heap)."""
        entry = self.header[name]
        if len(entry["shape"]) != 2:
            return self.get_tensor(name)
        rows, cols = entry["shape"]
        dtype = SAFETENSORS_DTYPES[entry["dtype"]]
        out = torch.empty(cols, rows, dtype=dtype)  # (out, in) for a Conv1D stored (in, out)
        buffer = torch.empty(rows_per_read, cols, dtype=dtype)
        row_bytes = cols * buffer.element_size()
        begin, end = entry["data_offsets"]
        if end - begin != rows * row_bytes:
            raise CheckpointError(f"{self.path}: {name} has {end - begin} bytes, its shape needs {rows * row_bytes}")
        self.file.seek(self.data_start + begin)
        for r0 in range(0, rows, rows_per_read):
            n = min(rows_per_read, rows - r0)
            chunk = buffer[:n]
            if self.file.readinto(memoryview(chunk.view(-1).view(torch.uint8).numpy())) != n * row_bytes:
                raise CheckpointError(f"{self.path}: {name} is truncated")
            out[:, r0:r0 + n] = chunk.t()
        return out

    def get_tensor(self, name: str) -> torch.Tensor:
        entry = self.header[name]
        begin, end = entry["data_offsets"]
        tensor = torch.empty(entry["shape"], dtype=SAFETENSORS_DTYPES[entry["dtype"]])
        view = tensor.view(-1).view(torch.uint8) if tensor.numel() else tensor.view(torch.uint8)
        if view.numel() != end - begin:
            raise CheckpointError(f"{self.path}: {name} has {end - begin} bytes, its shape needs {view.numel()}")
        self.file.seek(self.data_start + begin)
        if view.numel() and self.file.readinto(memoryview(view.numpy())) != view.numel():
            raise CheckpointError(f"{self.path}: {name} is truncated")
        return tensor


class LazyWeights(Mapping):
    """A read-only {name: tensor} view of a checkpoint that reads each tensor when asked.

    safetensors files are read tensor by tensor (``SafetensorsFile``); ``pytorch_model.bin``
    files with ``torch.load(weights_only=True, mmap=True)``, which never runs pickled code.
    A sharded checkpoint's index maps each name to its file.
    """

    def __init__(self, directory: Path):
        self.directory = directory
        self.where: dict[str, Path] = {}  # tensor name -> file holding it
        self._open: dict[Path, object] = {}
        index = next((directory / f for f in WEIGHT_FILES[1::2] if (directory / f).exists()), None)
        single = next((directory / f for f in WEIGHT_FILES[0::2] if (directory / f).exists()), None)
        if (directory / "model.safetensors").exists():
            self._add_file(directory / "model.safetensors")
        elif index is not None:
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index} has no weight_map")
            for name, file in weight_map.items():
                path = directory / file
                if not path.exists():
                    raise CheckpointError(f"{directory}: shard {file} listed in {index.name} is missing "
                                          f"(incomplete download?)")
                self.where[name] = path
        elif single is not None:
            self._add_file(single)
        else:
            raise CheckpointError(f"{directory} has no weights: expected one of {', '.join(WEIGHT_FILES)}")

    def _add_file(self, path: Path) -> None:
        for name in self._handle(path).keys():
            self.where[name] = path

    def _handle(self, path: Path):
        if path not in self._open:
            if path.suffix == ".safetensors":
                self._open[path] = SafetensorsFile(path)
            else:
                try:
                    self._open[path] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except Exception as e:  # noqa: BLE001 - any failure to unpickle means a bad file
                    first = str(e).splitlines()[0] if str(e) else type(e).__name__
                    raise CheckpointError(f"{path} is corrupt or not a weights-only checkpoint ({first})") from None
        return self._open[path]

    def __getitem__(self, name: str) -> torch.Tensor:
        path = self.where[name]
        handle = self._handle(path)
        return handle.get_tensor(name) if path.suffix == ".safetensors" else handle[name]

    def transposed(self, name: str) -> torch.Tensor:
        """state[name].t().contiguous(), read without a full-size temporary when possible."""
        path = self.where[name]
        handle = self._handle(path)
        if isinstance(handle, SafetensorsFile):
            return handle.get_transposed(name)
        return handle[name].t().contiguous()

    def close(self) -> None:
        for handle in self._open.values():
            if isinstance(handle, SafetensorsFile):
                handle.file.close()
        self._open.clear()

    def __contains__(self, name) -> bool:
        return name in self.where

    def __iter__(self) -> Iterator[str]:
        return iter(self.where)

    def __len__(self) -> int:
        return len(self.where)


def is_hf_dir(path: str | os.PathLike) -> bool:
    """True for a directory whose config.json is a Hugging Face one (it names a model_type)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return "model_type" in json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def load_hf(source: str | os.PathLike, device="cpu", dtype: Optional[torch.dtype] = None,
            with_tokenizer: bool = True, revision: Optional[str] = None):
    """(model, tokenizer or None) from a Hugging Face directory, or a hub id when online.

    The model is built on the meta device (shapes only, no memory), then each converted
    tensor is handed to it as it is (``load_state_dict(assign=True)``): the weights are
    held once. The model keeps the checkpoint's dtype unless ``dtype`` is given.
    """
    from .model import Transformer

    directory = resolve_hf_source(source, revision)
    hf_config = read_json(directory / "config.json")
    try:
        config = config_from_hf(hf_config)
    except (KeyError, TypeError) as e:
        raise ConfigError(f"{directory / 'config.json'}: missing or bad field {e}") from None
    weights = LazyWeights(directory)
    try:
        state = convert_hf_state_dict(weights, config, hf_config["model_type"])
    except KeyError as e:
        raise CheckpointError(f"{directory}: weight {e} not found; the checkpoint does not match "
                              f"config.json or is incomplete") from None
    finally:
        weights.close()
    first = state["tok_emb.weight"]
    target = dtype or first.dtype
    config = config.replace(dtype=str(target).replace("torch.", ""))
    with torch.device("meta"):
        model = Transformer(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for key, tensor in state.items():
        if key not in expected:
            raise CheckpointError(f"{directory}: unexpected weight {key}")
        if tuple(tensor.shape) != expected[key]:
            raise CheckpointError(f"{directory}: shape mismatch for {key}: checkpoint {tuple(tensor.shape)}, "
                                  f"config.json implies {expected[key]}")
        if tensor.dtype != target or str(tensor.device) != str(device):
            state[key] = tensor.to(device=device, dtype=target)  # only tensors that must change are copied
    if config.tie_embeddings:
        state["lm_head.weight"] = state["tok_emb.weight"]
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"{directory}: missing weights {', '.join(missing[:3])}")
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    model.reset_tables()  # position tables were made on the meta device
    model.requires_grad_(False).eval()
    tokenizer = None
    if with_tokenizer:
        from .tokenizer import load_tokenizer

        tokenizer = load_tokenizer(directory)
    return model, tokenizer


def resolve_hf_source(source: str | os.PathLike, revision: Optional[str] = None) -> Path:
    """A local directory holding ``source``: the path itself, or a hub snapshot."""
    path = Path(source)
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"not a model directory: {path}")
        if not (path / "config.json").exists():
            raise CheckpointError(f"{path} has no config.json: not a Hugging Face model directory")
        return path
    name = str(source)
    if name.count("/") != 1 or name.startswith((".", "/")):
        raise FileNotFoundError(f"model directory not found: {source}")
    return _download(name, revision)


def _download(repo_id: str, revision: Optional[str]) -> Path:
    """Fetch config, tokenizer and weights (safetensors first, else .bin) from the hub."""
    try:
        from huggingface_hub import list_repo_files, snapshot_download
    except ImportError:
        raise FileNotFoundError(f"{repo_id}: not a local directory, and huggingface_hub is not "
                                f"installed (pip install 'scratchlm[hf]')") from None
    try:
        files = list_repo_files(repo_id, revision=revision)
        weights = ["*.safetensors", "*.safetensors.index.json"] if any(f.endswith(".safetensors") for f in files) \
            else ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
        patterns = ["config.json", "generation_config.json", "tokenizer*", "vocab.json", "merges.txt",
                    "special_tokens_map.json", *weights]
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, gated repo...
        try:  # a snapshot downloaded before is good enough
            return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
        except Exception:  # noqa: BLE001
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise FileNotFoundError(f"{repo_id}: not a local directory and not fetched from the "
                                    f"Hugging Face hub ({first})") from None


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


def save_hf(directory: str | os.PathLike, model, tokenizer=None) -> Path:
    """Write ``model`` (and its tokenizer) as a Hugging Face directory: config.json,
    model.safetensors, generation_config.json and the tokenizer files. Atomic, like
    checkpoint.save_model."""
    from safetensors.torch import save_file

    from .checkpoint import atomic_directory

    config = model.config
    hf_config = hf_config_dict(config, tokenizer)  # raises before anything is written
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    hf_state = {k: v.contiguous() for k, v in to_hf_state_dict(state, config).items()}
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        generation = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id") if hf_config[k] is not None}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        save_file(hf_state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            (tokenizer.save_hf if hasattr(tokenizer, "save_hf") else tokenizer.save)(tmp)
    return directory


# ----------------------------------------------------------------------------------------
# One entry point for "a model": our directory, an HF directory, a preset, a hub id
# ----------------------------------------------------------------------------------------
def load_any(model_ref: str | os.PathLike, device="cpu", dtype: Optional[torch.dtype] = None, seed: int = 0):
    """(model, tokenizer or None) from whatever names a model:

    - a scratchlm model directory (config.json is a ModelConfig),
    - a Hugging Face directory (config.json has a model_type),
    - a preset name such as "gpt2" or "llama-tiny" (random weights, seeded),
    - a Hugging Face hub id such as "openai-community/gpt2" (downloaded when online).
    """
    from .checkpoint import load_model
    from .model import Transformer

    path = Path(model_ref)
    if path.exists() or Path(f"{model_ref}.old").exists():
        if path.is_dir() and is_hf_dir(path):
            return load_hf(path, device=device, dtype=dtype)
        return load_model(path, device=device, dtype=dtype)
    name = str(model_ref)
    if name in ModelConfig.presets():
        config = ModelConfig.preset(name)
        torch.manual_seed(seed)
        with torch.device(device):
            model = Transformer(config)
        if dtype is not None:
            model.to(dtype)
        return model.requires_grad_(False).eval(), preset_tokenizer(config)
    # "owner/name" is a hub id, unless "owner" is a folder here: then it is a path that is missing
    # (asking the hub would only add a network error to the real one).
    if name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name.split("/")[0]).is_dir():
        return load_hf(name, device=device, dtype=dtype)
    if path.parent != Path(".") and path.parent.is_dir():
        raise FileNotFoundError(f"model directory not found: {model_ref}")
    raise FileNotFoundError(f"{model_ref}: not a model directory, a preset ({', '.join(ModelConfig.presets())}) "
                            f"or a Hugging Face id (owner/name)")


def preset_tokenizer(config: ModelConfig):
    """A tokenizer for a preset with random weights: GPT-2's own BPE when tiktoken has its
    ranks offline, else a stand-in: ids 0-255 are the bytes, the last id is <|endoftext|>,
    and each id in between decodes as "<id>" (random weights produce any id)."""
    from .tokenizer.bpe import BPETokenizer

    if config.vocab_size == 50257:
        try:
            import tiktoken

            from .tokenizer import bpe_from_tiktoken

            if _tiktoken_cached("gpt2"):
                return bpe_from_tiktoken(tiktoken.get_encoding("gpt2"))
        except Exception:  # noqa: BLE001 - fall back to bytes
            pass
    if config.vocab_size < 257:
        return None
    ranks = {bytes([b]): b for b in range(256)} | {f"<{i}>".encode(): i for i in range(256, config.vocab_size - 1)}
    return BPETokenizer(ranks, "gpt2", special_tokens={"<|endoftext|>": config.vocab_size - 1})


def _tiktoken_cached(name: str) -> bool:
    """Whether tiktoken can build ``name`` without a download."""
    import hashlib
    import tempfile

    urls = {"gpt2": ["https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
                     "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json"]}
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or \
        os.path.join(tempfile.gettempdir(), "data-gym-cache")
    return all(os.path.exists(os.path.join(cache, hashlib.sha1(u.encode()).hexdigest())) for u in urls[name])


# ----------------------------------------------------------------------------------------
# Command line: scratchlm convert / export
# ----------------------------------------------------------------------------------------
def add_commands(subparsers) -> None:
    p = subparsers.add_parser("convert", help="Hugging Face directory or hub id -> scratchlm model directory",
                              description="Read GPT-2 or Llama weights (and tokenizer) from a Hugging Face "
                                          "directory or hub id and write a scratchlm model directory.")
    p.add_argument("source", help="Hugging Face model directory or hub id (owner/name)")
    p.add_argument("out_dir", help="scratchlm model directory to write")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="store the weights in this dtype")
    p.set_defaults(func=_convert_command)

    p = subparsers.add_parser("export", help="scratchlm model directory -> Hugging Face directory",
                              description="Write a model directory in a format other tools load.")
    p.add_argument("model_dir", help="scratchlm model directory")
    p.add_argument("out_dir", help="directory to write")
    p.add_argument("--format", default="hf", choices=["hf"], help="hf: a directory transformers loads")
    p.set_defaults(func=_export_command)


def _convert_command(args) -> int:
    from .checkpoint import save_model

    dtype = getattr(torch, args.dtype) if args.dtype else None
    model, tokenizer = load_hf(args.source, dtype=dtype)
    save_model(args.out_dir, model, tokenizer)
    n = model.num_parameters()
    print(f"wrote {args.out_dir} ({n:,} parameters, {model.config.dtype}"
          f"{', tokenizer' if tokenizer is not None else ', no tokenizer'})")
    return 0


def _export_command(args) -> int:
    model, tokenizer = load_any(args.model_dir)
    save_hf(args.out_dir, model, tokenizer)
    print(f"wrote {args.out_dir} (Hugging Face {hf_config_dict(model.config)['model_type']}"
          f"{', tokenizer' if tokenizer is not None else ''})")
    return 0
