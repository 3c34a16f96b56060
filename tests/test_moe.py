"""Mixture of experts: routing, grouped experts, the balancing loss, Mixtral / Qwen3-MoE
equal to transformers', export, training, decode layouts, LoRA and bad configs."""

import json

import pytest
import torch
import torch.nn.functional as F

from scratchlm.config import ConfigError, ModelConfig
from scratchlm.model import Transformer
from scratchlm.moe import MoE, experts_forward, load_balancing_loss, route, router_stats

IDS = torch.tensor([[5, 17, 42, 8, 3, 99, 7, 61, 23, 11, 250, 4]])


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_moe(**changes) -> ModelConfig:
    return ModelConfig.preset("moe-tiny", vocab_size=300, **changes)


# ---- the layer on its own ------------------------------------------------------------------------
def naive_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token, expert by expert: what the grouped computation must equal."""
    f = moe.down_proj.shape[-1]
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        probs = F.softmax(moe.router(x[n]), dim=-1)
        top = probs.topk(moe.k)
        weights = top.values / top.values.sum() if moe.norm_topk_prob else top.values
        for w, e in zip(weights, top.indices.tolist()):
            gate, up = moe.gate_up_proj[e][:f] @ x[n], moe.gate_up_proj[e][f:] @ x[n]
            out[n] += w * (moe.down_proj[e] @ (F.silu(gate) * up))
    return out


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_grouped_experts_equal_a_per_token_loop(norm_topk_prob):
    torch.manual_seed(0)
    moe = MoE(tiny_moe(n_experts=6, experts_per_token=3, norm_topk_prob=norm_topk_prob))
    x = torch.randn(2, 9, 64)
    with torch.no_grad():
        got = moe(x)
        want = naive_moe(moe, x.reshape(-1, 64)).view(2, 9, 64)
    assert torch.allclose(got, want, atol=1e-6)


def test_grouped_experts_gradients_equal_a_per_token_loop():
    torch.manual_seed(0)
    moe = MoE(tiny_moe())
    x = torch.randn(11, 64)
    moe(x[None]).square().sum().backward()
    grads = [p.grad.clone() for p in moe.parameters()]
    moe.zero_grad()
    naive_moe(moe, x).square().sum().backward()
    for got, p in zip(grads, moe.parameters()):
        assert torch.allclose(got, p.grad, atol=1e-6)


def test_a_single_token_and_unused_experts():
    """Decoding routes one token: only k experts run, the others get no work (and zero grads)."""
    torch.manual_seed(0)
    moe = MoE(tiny_moe(n_experts=8, experts_per_token=2))
    x = torch.randn(1, 1, 64)
    with torch.no_grad():
        assert torch.allclose(moe(x)[0], naive_moe(moe, x[0]), atol=1e-6)
    weights, experts = route(moe.router(x[0]), 2)
    assert experts.shape == (1, 2) and torch.allclose(weights.sum(-1), torch.ones(1))


def test_router_stats_balanced_and_collapsed():
    E, k = 4, 2
    balanced = torch.eye(E).repeat(8, 1) * 5 + torch.roll(torch.eye(E), 1, 1).repeat(8, 1) * 4  # each expert 2x
    stats = router_stats([balanced], k)
    assert torch.isclose(stats["moe_load_max"], torch.tensor(1.0))
    assert torch.isclose(stats["moe_load_entropy"], torch.tensor(1.0))
    collapsed = torch.tensor([[9.0, 8.0, 0.0, 0.0]]).repeat(16, 1)  # always experts 0 and 1
    stats = router_stats([collapsed], k)
    assert torch.isclose(stats["moe_load_max"], torch.tensor(2.0))  # each of the 2 gets half, E / 2
    assert torch.isclose(stats["moe_load_entropy"], torch.tensor(0.5))  # log 2 / log 4


# ---- config ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("changes, message", [
    (dict(experts_per_token=5), "experts_per_token must be between 1 and n_experts=4"),
    (dict(experts_per_token=0), "experts_per_token must be between 1"),
    (dict(n_experts=-1), "n_experts must be an integer >= 0"),
    (dict(mlp="gelu"), "mixture of experts needs mlp='swiglu'"),
    (dict(d_ff_expert=0), "d_ff_expert must be a positive integer"),
    (dict(bias=True), "mixture-of-experts layers have no biases"),
    (dict(router_aux_loss_coef=-0.1), "router_aux_loss_coef must be >= 0"),
])
def test_bad_moe_configs_are_config_errors(changes, message):
    with pytest.raises(ConfigError, match=message):
        tiny_moe(**changes)


def test_config_json_round_trip_and_active_parameters():
    config = tiny_moe()
    assert ModelConfig.from_json(config.to_json()) == config
    model = Transformer(config)
    # Each layer holds 4 experts of 3 * 64 * 96 weights and a token uses 2 of them.
    assert model.num_parameters() - model.num_active_parameters() == 2 * 2 * 3 * 64 * 96
    dense = Transformer(ModelConfig.preset("llama-tiny"))
    assert dense.num_active_parameters() == dense.num_parameters()


# ---- training ------------------------------------------------------------------------------------
def test_load_balancing_loss_is_smallest_when_balanced():
    E, k = 4, 2
    uniform = torch.zeros(64, E)
    assert torch.isclose(load_balancing_loss([uniform], k), torch.tensor(float(k)))
    skewed = torch.tensor([[4.0, 3.0, 0.0, 0.0]]).repeat(64, 1)
    assert load_balancing_loss([skewed], k) > k


def test_a_tiny_moe_trains_with_the_aux_loss_in_metrics(tmp_path):
    from scratchlm.data import prepare
    from scratchlm.train import TrainConfig, make_trainer

    prepare(corpus="python-reference", out_dir=tmp_path / "data", tokenizer="char", progress=False)
    cfg = TrainConfig(data=str(tmp_path / "data"), out_dir=str(tmp_path / "run"), model="moe-tiny",
                      context_length=32, batch_size=4, max_steps=30, warmup_steps=2, lr=3e-3, min_lr=3e-4,
                      eval_every=1000, eval_batches=2, log_every=1, save_every=1000, sample_tokens=0,
                      progress=False, precision="fp32", plot=False)
    result = make_trainer(cfg, quiet=True).run()
    assert sum(result.losses[-5:]) / 5 < result.losses[0] - 0.5
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    for row in train_rows:
        assert {"ce_loss", "moe_aux_loss", "moe_load_max", "moe_load_entropy"} <= set(row)
        # train_loss = cross-entropy + coef * aux (coef 0.01 in moe-tiny)
        assert abs(row["train_loss"] - (row["ce_loss"] + 0.01 * row["moe_aux_loss"])) < 1e-4
        assert row["moe_aux_loss"] >= 2 - 1e-4  # k is the minimum
    from scratchlm.checkpoint import load_model

    model, _ = load_model(tmp_path / "run" / "latest")
    assert model.config.n_experts == 4
