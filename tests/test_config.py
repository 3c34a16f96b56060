"""ModelConfig: presets match published parameter counts, validation, JSON round trip."""

import pytest
import torch

from scratchlm import ModelConfig, Transformer
from scratchlm.config import ConfigError

# Published parameter counts (GPT-2 with its tied head; Llama from the model cards /
# the Hugging Face checkpoints' safetensors metadata).
PUBLISHED = {
    "gpt2": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
    "llama2-7b": 6_738_415_616,
    "llama2-13b": 13_015_864_320,
    "llama3-8b": 8_030_261_248,
    "llama3.1-8b": 8_030_261_248,
    "llama3.2-1b": 1_235_814_400,
    "llama3.2-3b": 3_212_749_824,
    "smollm2-135m": 134_515_008,
    "smollm2-360m": 361_821_120,
    "smollm2-1.7b": 1_711_376_384,
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_preset_parameter_count_matches_published(name):
    with torch.device("meta"):  # no memory: shapes only
        model = Transformer(ModelConfig.preset(name))
    assert model.num_parameters() == PUBLISHED[name]


@pytest.mark.parametrize("name", ["smollm2-135m", "smollm2-360m", "smollm2-1.7b"])
def test_smollm2_presets_match_transformers_llama_of_the_same_shape(name):
    """The same shape built by transformers' LlamaConfig has exactly as many parameters."""
    transformers = pytest.importorskip("transformers")
    cfg = ModelConfig.preset(name)
    hf_config = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=cfg.context_length,
        rope_theta=cfg.rope_theta, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings)
    with torch.device("meta"):
        ours = Transformer(cfg)
        theirs = transformers.LlamaForCausalLM(hf_config)
    n_theirs = sum(p.numel() for p in theirs.parameters())  # a tied matrix is counted once
    assert ours.num_parameters() == n_theirs == PUBLISHED[name]


@pytest.mark.parametrize("name", ModelConfig.presets())
def test_every_preset_json_round_trip(name, tmp_path):
    config = ModelConfig.preset(name)
    assert ModelConfig.from_json(config.to_json()) == config
    config.save(tmp_path / "config.json")
    assert ModelConfig.load(tmp_path / "config.json") == config


def test_defaults_fill_in():
    config = ModelConfig(d_model=64, n_heads=4, n_layers=1, vocab_size=10, context_length=8)
    assert config.n_kv_heads == 4 and config.d_ff == 256 and config.head_dim == 16


@pytest.mark.parametrize("changes, message", [
    (dict(d_model=100, n_heads=12), "does not divide d_model"),
    (dict(n_heads=12, n_kv_heads=5), "does not divide n_heads"),
    (dict(norm="batchnorm"), "norm must be one of"),
    (dict(mlp="tanh"), "mlp must be one of"),
    (dict(positions="alibi"), "positions must be one of"),
    (dict(vocab_size=0), "vocab_size must be a positive integer"),
    (dict(dropout=1.0), "dropout"),
    (dict(dtype="int8"), "dtype"),
    (dict(rope_scaling={"factor": 8.0}), "rope_scaling"),
])
def test_bad_config_is_a_clear_error(changes, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**changes)


def test_unknown_preset_and_option():
    with pytest.raises(ConfigError, match="unknown preset 'gpt5'"):
        ModelConfig.preset("gpt5")
    with pytest.raises(ConfigError, match="unknown config option"):
        ModelConfig.from_dict({"d_model": 64, "n_head": 4})


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        ModelConfig.load(tmp_path / "nope.json")
