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


# ---- the training configs (train/config.py) --------------------------------------------------
def test_optional_fields_take_none_or_their_type():
    from dataclasses import dataclass

    from scratchlm.train import TrainConfig
    from scratchlm.train.config import Config, option

    @dataclass
    class Old(Config):
        steps: int | None = option(None, "old spelling")
        rate: float | None = option(None, "new spelling")

    assert Old.from_dict({"steps": None, "rate": 1}).rate == 1.0  # an int where a float goes becomes a float
    assert Old.from_dict({"steps": 4}).steps == 4
    with pytest.raises(ConfigError, match="steps must be int or none, got 2.5"):
        Old.from_dict({"steps": 2.5})
    with pytest.raises(ConfigError, match="steps must be int or none, got True"):
        Old.from_dict({"steps": True})
    assert TrainConfig.from_dict({"context_length": None, "max_steps": None, "epochs": 2}).epochs == 2.0
    with pytest.raises(ConfigError, match="context_length must be int or none"):
        TrainConfig.from_dict({"context_length": "long"})
    with pytest.raises(ConfigError, match="precision must be one of 'auto', 'bf16', 'fp32', got 'fp8'"):
        TrainConfig.from_dict({"precision": "fp8"})
    with pytest.raises(ConfigError, match="model_config must be dict or none"):
        TrainConfig.from_dict({"model_config": [1]})


@pytest.mark.parametrize("key,value", [("lr", float("inf")), ("weight_decay", float("nan")),
                                       ("max_minutes", float("inf")), ("beta2", float("-inf"))])
def test_non_finite_numbers_are_refused(key, value):
    from scratchlm.finetune.config import InstructConfig
    from scratchlm.train import TrainConfig

    with pytest.raises(ConfigError, match=f"{key} must be a finite number"):
        TrainConfig.from_dict({key: value})
    with pytest.raises(ConfigError, match=f"{key} must be a finite number"):
        InstructConfig(model="m", data="d", **{key: value})


def test_command_line_non_finite_and_both_spellings(capsys, tmp_path):
    import argparse

    from scratchlm.cli import main
    from scratchlm.cli.options import add_config_options, config_from_args
    from scratchlm.train import TrainConfig

    for argv in (["train", "--lr", "inf"], ["train", "--weight_decay", "nan"],
                 ["finetune", "instruct", "m", "--data", "d", "--weight-decay", "nan"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "must be a finite number" in err[0], err
    p = argparse.ArgumentParser()
    add_config_options(p, TrainConfig)
    for spelling in ("--max_steps", "--max-steps"):
        assert config_from_args(TrainConfig, p.parse_args([spelling, "7"])).max_steps == 7
    assert config_from_args(TrainConfig, p.parse_args(["--context-length", "none"])).context_length is None


def test_every_command_reads_a_config_file(tmp_path):
    import argparse

    from scratchlm.cli.options import add_config_file_option, add_config_options, config_from_args
    from scratchlm.finetune.config import ClassifyConfig, InstructConfig

    (tmp_path / "sft.toml").write_text('model = "base"\ndata = "d.jsonl"\nlr = 3e-4\nlora = true\nmax_steps = 9\n')
    p = argparse.ArgumentParser()
    add_config_file_option(p)
    add_config_options(p, InstructConfig)
    cfg = config_from_args(InstructConfig, p.parse_args(["--config", str(tmp_path / "sft.toml"), "--max-steps", "5"]))
    assert (cfg.model, cfg.lr, cfg.lora, cfg.max_steps, cfg.out_dir) == ("base", 3e-4, True, 5, "runs/instruct")
    (tmp_path / "clf.yaml").write_text("data: x.csv\ntrain: '2'\nfancy: 1\n")
    q = argparse.ArgumentParser()
    add_config_file_option(q)
    add_config_options(q, ClassifyConfig)
    with pytest.raises(ConfigError, match=r"clf\.yaml: unknown option\(s\): fancy"):
        config_from_args(ClassifyConfig, q.parse_args(["base", "--config", str(tmp_path / "clf.yaml")]))
    (tmp_path / "clf.yaml").write_text("data: x.csv\ntrain: '2'\n")
    cfg = config_from_args(ClassifyConfig, q.parse_args(["base", "--config", str(tmp_path / "clf.yaml"), "--lora"]))
    assert (cfg.trainable, cfg.lr, cfg.epochs) == (2, 1e-3, 3.0)  # LoRA's default rate
    assert ClassifyConfig(model="b", data="d").lr == 5e-4


def test_repository_config_files_are_valid():
    """configs/*: every file fills its command's config class (the demo's is checked against
    the demo's own settings in test_train.py)."""
    from pathlib import Path

    from scratchlm.finetune.config import InstructConfig
    from scratchlm.train import TrainConfig
    from scratchlm.train.config import read_config_file

    configs = Path(__file__).resolve().parent.parent / "configs"
    assert TrainConfig.from_file(configs / "demo.yaml").d_model == 256
    cfg = InstructConfig.from_dict({**read_config_file(configs / "instruct-lora.toml"), "model": "m", "data": "d"})
    assert cfg.lora and cfg.lora_config().targets == ["qkv_proj", "out_proj", "up_proj", "down_proj"]
    assert cfg.lr == 1e-3  # LoRA's default rate
