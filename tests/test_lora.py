"""LoRA: identity at initialisation, gradients only on adapters, merge == base + adapter,
adapters saved and reloaded on their own, bad settings rejected clearly."""

import copy
import json

import pytest
import torch
import torch.nn as nn

from scratchlm import ModelConfig, Transformer
from scratchlm.checkpoint import load_model, save_model
from scratchlm.cli import main
from scratchlm.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LoRAError,
    LoRALinear,
    apply_lora,
    load_adapter,
    lora_layers,
    lora_state_dict,
    merge_lora,
    save_adapter,
)

ALL_GPT = ["qkv_proj", "out_proj", "up_proj", "down_proj", "lm_head"]
ALL_LLAMA = ALL_GPT + ["gate_proj"]


def tiny(preset="gpt-tiny", seed=0, **changes):
    torch.manual_seed(seed)
    return Transformer(ModelConfig.preset(preset, context_length=32, **changes)).eval()


def randomise_adapters(model, seed=1):
    """B is zero at initialisation; give it values so that the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.05)


IDS = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("preset,targets", [("gpt-tiny", ALL_GPT), ("llama-tiny", ALL_LLAMA)])
def test_at_initialisation_the_output_equals_the_base_model(preset, targets):
    model = tiny(preset)
    before = model(IDS)
    wrapped = apply_lora(model, rank=4, alpha=8, targets=targets)
    assert len(wrapped) == len([t for t in targets if t != "lm_head"]) * 2 + 1  # 2 blocks + the head
    assert torch.equal(model(IDS), before)


def test_lora_linear_matches_the_formula():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = LoRALinear(base, rank=3, alpha=6.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 6)
    A, B = layer.lora_A, layer.lora_B
    expected = x @ base.weight.T + base.bias + (6.0 / 3) * (x @ A.T @ B.T)
    torch.testing.assert_close(layer(x), expected)


def test_only_adapter_parameters_get_gradients():
    model = tiny("llama-tiny").train()
    apply_lora(model, rank=4, targets=["qkv_proj", "down_proj"])
    logits = model(IDS)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), IDS.flatten()).backward()
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.requires_grad and p.grad is not None, name
        else:
            assert not p.requires_grad and p.grad is None, name
    # B = 0 at first, so A's gradient is zero but B's is not: learning starts through B.
    for layer in lora_layers(model).values():
        assert layer.lora_B.grad.abs().sum() > 0


def test_a_training_step_changes_only_the_adapters():
    model = tiny().train()
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, rank=4, targets=ALL_GPT)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(IDS).flatten(0, 1), IDS.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
    state = model.state_dict()
    for key, value in frozen.items():
        wrapped = key.replace(".weight", ".base.weight").replace(".bias", ".base.bias")
        assert torch.equal(state.get(key, state.get(wrapped)), value), key
    assert any(v.abs().sum() > 0 for k, v in lora_state_dict(model).items() if k.endswith("lora_B"))


@pytest.mark.parametrize("preset,targets", [("gpt-tiny", ALL_GPT), ("llama-tiny", ALL_LLAMA)])
def test_merged_logits_equal_base_plus_adapter(preset, targets):
    model = tiny(preset)
    embedding = model.tok_emb.weight.detach().clone()
    apply_lora(model, rank=4, alpha=8, targets=targets)
    randomise_adapters(model)
    with torch.no_grad():
        adapted = model(IDS)
        base_out = tiny(preset)(IDS)
    assert not torch.allclose(adapted, base_out, atol=1e-3)  # the adapter does change the output
    merge_lora(model)
    assert not lora_layers(model) and all(isinstance(m, nn.Linear) for n, m in model.named_modules()
                                          if n.endswith(("_proj", "lm_head")))
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), adapted, atol=2e-5, rtol=1e-4)
    # An adapted head of a tied model gets its own matrix; the input embedding is untouched.
    assert torch.equal(model.tok_emb.weight, embedding)
    if ModelConfig.preset(preset).tie_embeddings:
        assert model.config.tie_embeddings is False
        assert model.lm_head.weight.data_ptr() != model.tok_emb.weight.data_ptr()


def test_merged_model_saves_and_loads_as_a_plain_model(tmp_path):
    model = tiny()
    apply_lora(model, rank=2, targets=["qkv_proj", "lm_head"])
    randomise_adapters(model)
    with torch.no_grad():
        adapted = model(IDS)
    save_model(tmp_path / "merged", merge_lora(model))
    again, _ = load_model(tmp_path / "merged", with_tokenizer=False)
    with torch.no_grad():
        torch.testing.assert_close(again(IDS), adapted, atol=2e-5, rtol=1e-4)


def test_saved_adapter_reloads_on_the_base_model(tmp_path):
    base = tiny("llama-tiny")
    model = copy.deepcopy(base)
    apply_lora(model, rank=4, alpha=16, dropout=0.1, targets=["qkv_proj", "up_proj"])
    randomise_adapters(model)
    model.eval()
    with torch.no_grad():
        adapted = model(IDS)
    save_adapter(tmp_path / "adapter", model, base_model="some/base")
    record = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert (record["rank"], record["alpha"], record["dropout"], record["base_model"]) == (4, 16, 0.1, "some/base")
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter" / ADAPTER_WEIGHTS))
    assert set(saved) == set(lora_state_dict(model)) and all("lora_" in k for k in saved)  # adapters only
    fresh = copy.deepcopy(base)
    load_adapter(fresh, tmp_path / "adapter")
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(IDS), adapted)
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == set(saved)


def test_adapter_for_another_model_is_rejected(tmp_path):
    model = tiny()
    apply_lora(model, rank=4)
    save_adapter(tmp_path / "a", model)
    wider = tiny(d_model=128, n_heads=4, d_ff=256)
    with pytest.raises(LoRAError, match="shape"):
        load_adapter(wider, tmp_path / "a")
    llama = tiny("llama-tiny")
    with pytest.raises(LoRAError, match="missing|unexpected|shape"):
        load_adapter(llama, tmp_path / "a")


def test_bad_settings_are_clear_errors():
    with pytest.raises(LoRAError, match="q_proj.*qkv_proj"):
        apply_lora(tiny(), targets=["q_proj"])
    with pytest.raises(LoRAError, match="rank"):
        apply_lora(tiny(), rank=0)
    with pytest.raises(LoRAError, match="dropout"):
        apply_lora(tiny(), dropout=1.5)
    model = tiny()
    apply_lora(model)
    with pytest.raises(LoRAError, match="already"):
        apply_lora(model)
    with pytest.raises(LoRAError, match="no LoRA"):
        save_adapter("/tmp/never", tiny())


def test_glob_targets_pick_single_blocks():
    model = tiny()
    assert apply_lora(model, targets=["blocks.1.*"]) == ["blocks.1.attn.qkv_proj", "blocks.1.attn.out_proj",
                                                         "blocks.1.mlp.up_proj", "blocks.1.mlp.down_proj"]


def test_merge_lora_command(tmp_path, capsys):
    base = tiny()
    save_model(tmp_path / "base", base)
    model = copy.deepcopy(base)
    apply_lora(model, rank=2, targets=["out_proj", "down_proj"])
    randomise_adapters(model)
    with torch.no_grad():
        adapted = model(IDS)
    save_adapter(tmp_path / "adapter", model)
    (tmp_path / "adapter" / "prompt_format.json").write_text('{"template": "chatml"}')
    assert main(["merge-lora", str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "out")]) == 0
    merged, _ = load_model(tmp_path / "out", with_tokenizer=False)
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS), adapted, atol=2e-5, rtol=1e-4)
    assert json.loads((tmp_path / "out" / "prompt_format.json").read_text())["template"] == "chatml"
    assert main(["merge-lora", str(tmp_path / "base"), str(tmp_path / "nope"), str(tmp_path / "o2")]) == 2
    assert "nope" in capsys.readouterr().err
