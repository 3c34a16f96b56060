"""Mixture of experts: routing, grouped experts, the balancing loss, Mixtral / Qwen3-MoE
equal to transformers', export, training, decode layouts, LoRA and bad configs."""

import json

import pytest
import torch
import torch.nn.functional as F

from scratchlm.config import ConfigError, ModelConfig
from scratchlm.model import Transformer
from scratchlm.moe import MoE, load_balancing_loss, route, router_stats

IDS = torch.tensor([[5, 17, 42, 8, 3, 99, 7, 61, 23, 11, 250, 4]])


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_moe(**changes) -> ModelConfig:
    return ModelConfig.preset("moe-tiny", **{"vocab_size": 300, **changes})


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


@pytest.mark.parametrize("grouped_mm", [True, False], ids=["grouped_mm", "a matmul pair per expert"])
def test_grouped_experts_gradients_equal_a_per_token_loop(grouped_mm, monkeypatch):
    if not grouped_mm:  # the path of a PyTorch without F.grouped_mm (< 2.10) or off the CPU
        monkeypatch.delattr(F, "grouped_mm", raising=False)
    elif not hasattr(F, "grouped_mm"):
        pytest.skip("this PyTorch has no F.grouped_mm")
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


@pytest.mark.parametrize("weights", [None, "fp32", "int8", "int4"])
def test_the_one_token_decode_path_equals_the_grouped_path(weights):
    """At batch 1 under no_grad MoE.forward runs MoE.one_token (the k experts' calls only):
    the same sum as experts_forward's sort-and-scatter, in every decode layout."""
    from scratchlm.decode_weights import prepare_for_decode
    from scratchlm.moe import experts_forward

    torch.manual_seed(0)
    model = Transformer(tiny_moe(n_experts=8, experts_per_token=3)).eval()
    if weights:
        prepare_for_decode(model, weights, group_size=32)
    moe = model.blocks[0].mlp
    x = torch.randn(1, 64).to(model.tok_emb.weight.dtype)
    with torch.no_grad():
        got = moe(x[None])[0]
        want = experts_forward(x, *route(moe.router(x), 3), moe.expert, 8)
    tol = 1e-6 if x.dtype == torch.float32 else 2e-2  # bf16 activations: the three terms added in another order
    assert torch.allclose(got, want, atol=tol, rtol=tol)


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
        assert {"task_loss", "moe_aux_loss", "moe_load_max", "moe_load_entropy"} <= set(row)
        # train_loss = cross-entropy + coef * aux (coef 0.01 in moe-tiny)
        assert abs(row["train_loss"] - (row["task_loss"] + 0.01 * row["moe_aux_loss"])) < 1e-4
        assert 1.5 < row["moe_aux_loss"] < 4  # about k = 2 when balanced, up to E = 4 when collapsed
    from scratchlm.checkpoint import load_model

    model, _ = load_model(tmp_path / "run" / "latest")
    assert model.config.n_experts == 4


def _first_train_row(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in rows if r["kind"] == "train")


def _fine_tuning_base(tmp_path):
    """A moe-tiny model directory with a character tokenizer (ChatML tokens)."""
    from scratchlm.checkpoint import save_model
    from scratchlm.tokenizer import CharTokenizer

    tok = CharTokenizer.train("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,?!\n",
                              special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    torch.manual_seed(0)
    save_model(tmp_path / "base", Transformer(tiny_moe(vocab_size=tok.vocab_size, context_length=64)), tok)
    return tmp_path / "base"


LOOP = dict(max_steps=2, batch_size=4, lr=1e-3, warmup_steps=0, log_every=1, eval_every=1000, save_every=1000,
            progress=False, plot=False, precision="fp32", device="cpu")


@pytest.mark.parametrize("lora", [False, True])
def test_instruction_tuning_a_moe_adds_the_balancing_loss(tmp_path, lora):
    """The core adds coef * load_balancing_loss to InstructTask's masked cross-entropy and logs
    the routers: the first step's numbers equal those computed here, apart, on the same
    batch and the initial weights."""
    import copy

    from scratchlm.finetune import InstructConfig
    from scratchlm.finetune.instruct import InstructTask, masked_loss
    from scratchlm.train.core import Trainer

    base = _fine_tuning_base(tmp_path)
    chats = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
             for q, a in [("Sky?", "Blue."), ("Fruit?", "An apple."), ("Two and three?", "Five."), ("Hi?", "Hello!")]]
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    cfg = InstructConfig.from_dict(dict(model=str(base), data=str(tmp_path / "chats.jsonl"), out_dir=str(tmp_path / "run"),
                                        val_fraction=0.0, sample_tokens=0, lora=lora, **LOOP))
    task = InstructTask(cfg, quiet=True)
    trainer = Trainer(cfg, task, quiet=True)
    initial = copy.deepcopy(trainer.raw_model).train()
    x, y = task.micro_batch(0, 0, 0, 1, initial)
    trainer.run()
    ce = masked_loss(initial(x), y)
    aux = load_balancing_loss(initial.router_logits(), 2)
    row = _first_train_row(tmp_path / "run")
    assert row["task_loss"] == pytest.approx(ce.item(), rel=1e-5)
    assert row["moe_aux_loss"] == pytest.approx(aux.item(), rel=1e-5)
    assert row["train_loss"] == pytest.approx((ce + 0.01 * aux).item(), rel=1e-5)  # moe-tiny's coef: 0.01
    stats = router_stats(initial.router_logits(), 2)
    assert row["moe_load_max"] == pytest.approx(stats["moe_load_max"].item(), rel=1e-5)
    assert row["moe_load_entropy"] == pytest.approx(stats["moe_load_entropy"].item(), rel=1e-5)


def test_classifying_with_a_moe_backbone_adds_the_balancing_loss(tmp_path):
    """The same for ClassifyTask, where the MoE layers sit inside the Classifier's backbone."""
    import copy

    from scratchlm.finetune import ClassifyConfig
    from scratchlm.finetune.classify import ClassifyTask
    from scratchlm.train.core import Trainer

    base = _fine_tuning_base(tmp_path)
    rows = ["text,label"] + [f"{w} {w} {w},{label}" for w, label in
                             [("good", "pos"), ("bad", "neg"), ("nice", "pos"), ("sad", "neg")] * 3]
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    cfg = ClassifyConfig.from_dict(dict(model=str(base), data=str(tmp_path / "data.csv"), out_dir=str(tmp_path / "run"),
                                        train="all", val_fraction=0.0, test_fraction=0.0, **LOOP))
    task = ClassifyTask(cfg, quiet=True)
    trainer = Trainer(cfg, task, quiet=True)
    initial = copy.deepcopy(trainer.raw_model).train()
    ids, lengths, labels = task.micro_batch(0, 0, 0, 1, initial)
    trainer.run()
    ce = F.cross_entropy(initial(ids, lengths).float(), labels)
    aux = load_balancing_loss(initial.backbone.router_logits(), 2)
    row = _first_train_row(tmp_path / "run")
    assert {"train_accuracy", "moe_load_max", "moe_load_entropy"} <= set(row)
    assert row["task_loss"] == pytest.approx(ce.item(), rel=1e-5)
    assert row["moe_aux_loss"] == pytest.approx(aux.item(), rel=1e-5)
    assert row["train_loss"] == pytest.approx((ce + 0.01 * aux).item(), rel=1e-5)


def test_the_balancing_loss_takes_the_router_logits():
    """add_balancing_loss counts a forward once and lets go of its graph; a dense model and
    an eval-mode forward add nothing."""
    from scratchlm.moe import add_balancing_loss

    model = Transformer(tiny_moe()).train()
    model(IDS)
    loss, metrics = add_balancing_loss(model, torch.tensor(1.0))
    assert set(metrics) == {"task_loss", "moe_aux_loss", "moe_load_max", "moe_load_entropy"}
    assert model.router_logits() == [] and add_balancing_loss(model, loss) == (loss, {})
    with torch.no_grad():
        model.eval()(IDS)
    assert add_balancing_loss(model, loss) == (loss, {})
    dense = Transformer(ModelConfig.preset("llama-tiny")).train()
    dense(IDS)
    assert add_balancing_loss(dense, loss) == (loss, {})


# ---- against transformers ------------------------------------------------------------------------
def _transformers():
    return pytest.importorskip("transformers")


FAMILIES = ["mixtral", "qwen3_moe"]


def hf_moe(kind="mixtral", vocab=300):
    """A tiny random MixtralForCausalLM (4 experts, top-2) or Qwen3MoeForCausalLM (8 experts,
    top-2 without renormalising, QK-norm, head_dim 16 apart from d_model / n_heads = 8)."""
    transformers = _transformers()
    torch.manual_seed(0)
    shape = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=128, tie_word_embeddings=False, num_experts_per_tok=2)
    if kind == "mixtral":
        cfg = transformers.MixtralConfig(**shape, intermediate_size=48, num_local_experts=4, sliding_window=None,
                                         router_aux_loss_coef=0.02)
        model = transformers.MixtralForCausalLM(cfg)
    else:
        cfg = transformers.Qwen3MoeConfig(**shape, intermediate_size=64, moe_intermediate_size=24, num_experts=8,
                                          head_dim=16, norm_topk_prob=False, router_aux_loss_coef=0.001)
        model = transformers.Qwen3MoeForCausalLM(cfg)
    with torch.no_grad():  # sharper logits: greedy choices are then not near-ties
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(4.0)
    return model.eval()


def copy_block(ours: MoE, theirs) -> MoE:
    """transformers' MixtralSparseMoeBlock / Qwen3MoeSparseMoeBlock weights into ours."""
    with torch.no_grad():
        ours.router.weight.copy_(theirs.gate.weight)
        ours.gate_up_proj.copy_(theirs.experts.gate_up_proj)
        ours.down_proj.copy_(theirs.experts.down_proj)
    return ours


def test_mixtral_block_routes_and_computes_as_transformers():
    transformers = _transformers()
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(hidden_size=64, intermediate_size=96, num_local_experts=8, num_experts_per_tok=2)
    theirs = MixtralSparseMoeBlock(cfg).eval()
    for p in theirs.parameters():
        torch.nn.init.normal_(p, std=0.1)
    ours = copy_block(MoE(tiny_moe(n_experts=8, experts_per_token=2, d_ff_expert=96)).eval(), theirs)
    x = torch.randn(3, 7, 64)
    with torch.no_grad():
        _, their_weights, their_experts = theirs.gate(x.view(-1, 64))
        weights, experts = route(ours.router(x.view(-1, 64)), 2)
        assert torch.equal(experts, their_experts)  # the same experts, in the same order
        assert torch.allclose(weights, their_weights, atol=1e-6)
        assert torch.allclose(ours(x), theirs(x), atol=1e-5)


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_qwen3_moe_block_routes_and_computes_as_transformers(norm_topk_prob):
    transformers = _transformers()
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(hidden_size=64, moe_intermediate_size=32, num_experts=16,
                                      num_experts_per_tok=4, norm_topk_prob=norm_topk_prob)
    theirs = Qwen3MoeSparseMoeBlock(cfg).eval()
    for p in theirs.parameters():
        torch.nn.init.normal_(p, std=0.1)
    ours = copy_block(MoE(tiny_moe(n_experts=16, experts_per_token=4, d_ff_expert=32,
                                   norm_topk_prob=norm_topk_prob)).eval(), theirs)
    x = torch.randn(2, 9, 64)
    with torch.no_grad():
        _, their_weights, their_experts = theirs.gate(x.view(-1, 64))
        weights, experts = route(ours.router(x.view(-1, 64)), 4, norm_topk_prob)
        assert torch.equal(experts, their_experts)
        assert torch.allclose(weights, their_weights, atol=1e-6)
        assert torch.allclose(ours(x), theirs(x), atol=1e-5)


def test_load_balancing_loss_equals_transformers():
    _transformers()
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    torch.manual_seed(0)
    for E, k in ((4, 2), (8, 2), (16, 4)):
        logits = [torch.randn(20, E) * 2 for _ in range(3)]
        want = load_balancing_loss_func(tuple(logits), E, k)
        assert torch.allclose(load_balancing_loss(logits, k), want, atol=1e-6)
    # And in the model: our training forward keeps the router logits transformers returns.
    hf = hf_moe("mixtral")
    ours = from_hf(hf).train()
    out = hf(IDS, output_router_logits=True)
    ours(IDS)
    for mine, theirs in zip(ours.router_logits(), out.router_logits):
        assert torch.allclose(mine, theirs, atol=1e-5)
    assert torch.allclose(load_balancing_loss(ours.router_logits(), 2), out.aux_loss, atol=1e-6)


def from_hf(hf):
    from scratchlm.hf import from_hf_model

    return from_hf_model(hf)


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("use_sdpa", [True, False])
def test_logits_equal_transformers(kind, use_sdpa):
    hf = hf_moe(kind)
    ours = from_hf(hf).eval()
    c = ours.config
    assert (c.n_experts, c.experts_per_token, c.router_aux_loss_coef, c.norm_topk_prob) == (
        (4, 2, 0.02, True) if kind == "mixtral" else (8, 2, 0.001, False))
    ours.use_sdpa = use_sdpa
    with torch.no_grad():
        assert torch.allclose(ours(IDS), hf(IDS).logits, atol=1e-4)
        # Cached, token by token after a prefix: the same numbers.
        cache = ours.new_cache(1, IDS.shape[1])
        steps = [ours(IDS[:, :5], cache=cache)] + [ours(IDS[:, t:t + 1], cache=cache) for t in range(5, IDS.shape[1])]
        assert torch.allclose(torch.cat(steps, dim=1), hf(IDS).logits, atol=1e-4)


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_generation_equals_transformers(kind, use_cache):
    from scratchlm.generate import generate

    hf = hf_moe(kind)
    ours = from_hf(hf).eval()
    prompt = IDS[:, :5]
    want = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=16,
                       use_cache=use_cache, eos_token_id=None, pad_token_id=0)[0, 5:].tolist()
    [c] = generate(ours, None, prompt.tolist(), max_new_tokens=16, use_cache=use_cache, ignore_eos=True)
    assert c.token_ids == want


@pytest.mark.parametrize("kind", FAMILIES)
def test_left_padded_batch_equals_transformers(kind):
    from scratchlm.generate import generate

    hf = hf_moe(kind)
    ours = from_hf(hf).eval()
    prompts = [[5, 17, 42, 8, 3, 99], [7, 61]]
    [a, b] = generate(ours, None, prompts, max_new_tokens=10, ignore_eos=True)
    for prompt, got in zip(prompts, (a, b)):
        ids = torch.tensor([prompt])
        want = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=10,
                           eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert got.token_ids == want


@pytest.mark.parametrize("kind", FAMILIES)
def test_directory_round_trip(kind, tmp_path):
    transformers = _transformers()
    from scratchlm.hf import load_hf, save_hf

    hf = hf_moe(kind)
    hf.save_pretrained(tmp_path / "hf")
    ours, _ = load_hf(tmp_path / "hf", with_tokenizer=False)
    with torch.no_grad():
        want = hf(IDS).logits
        assert torch.allclose(ours(IDS), want, atol=1e-4)
    save_hf(tmp_path / "back", ours)
    saved = json.loads((tmp_path / "back" / "config.json").read_text())
    assert saved["model_type"] == kind
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert type(again) is type(hf)
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, want)  # same weights, same code: bit for bit
    # scratchlm's own directory format keeps the experts too.
    from scratchlm.checkpoint import load_model, save_model

    save_model(tmp_path / "ours", ours)
    reloaded, _ = load_model(tmp_path / "ours")
    assert reloaded.config == ours.config
    with torch.no_grad():
        assert torch.equal(reloaded(IDS), ours(IDS))


# Model cards: Mixtral 8x7B "46.7B total, 12.9B active"; Qwen3-30B-A3B "30.5B total, 3.3B activated".
PUBLISHED = {"mixtral-8x7b": (46_702_792_704, 12.9), "qwen3-30b-a3b": (30_532_122_624, 3.3)}


@pytest.mark.parametrize("name", PUBLISHED)
def test_preset_parameter_counts_equal_transformers(name):
    transformers = _transformers()
    from scratchlm.hf import hf_config_dict

    config = ModelConfig.preset(name)
    c = hf_config_dict(config)
    cls = {"mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
           "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM)}[c["model_type"]]
    with torch.device("meta"):
        ours = Transformer(config)
        theirs = cls[1](cls[0](**{k: v for k, v in c.items() if k not in ("model_type", "architectures")}))
    total, active = PUBLISHED[name]
    assert ours.num_parameters() == sum(p.numel() for p in theirs.parameters()) == total
    # Mixtral's 12.88B is rounded to 12.9, Qwen's 3.35B cut to 3.3: both within 0.06B.
    assert abs(ours.num_active_parameters() / 1e9 - active) < 0.06


def test_unsupported_hf_moe_configs_are_refused():
    from scratchlm.hf import config_from_hf

    with pytest.raises(ConfigError, match="sliding_window=64"):
        config_from_hf(hf_moe("mixtral").config.to_dict() | {"sliding_window": 64})
    with pytest.raises(ConfigError, match="every layer must be a mixture of experts"):
        config_from_hf(hf_moe("qwen3_moe").config.to_dict() | {"mlp_only_layers": [0]})


def test_a_checkpoint_of_one_family_loaded_as_another_is_an_error(tmp_path):
    from scratchlm.hf import load_hf
    from scratchlm.state_dict import CheckpointError

    hf_moe("mixtral").save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps(config | {"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="does not match config.json"):
        load_hf(tmp_path / "m", with_tokenizer=False)


# ---- decode layouts and LoRA -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_moe():
    """moe-tiny on bytes, trained for a few seconds on the Python language reference (random
    weights would say nothing about quantization: every layout is near-uniform on them)."""
    from scratchlm.corpus import python_reference

    torch.manual_seed(0)
    data = torch.tensor(list("\n".join(python_reference()[:40]).encode()), dtype=torch.long)
    train, held_out = data[:-4096], data[-4096:]
    model = Transformer(tiny_moe(vocab_size=256))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(80):
        starts = torch.randint(0, len(train) - 65, (8,), generator=g).tolist()
        batch = torch.stack([train[s:s + 65] for s in starts])
        loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), held_out.view(-1, 128)


@torch.no_grad()
def perplexity(model, chunks):
    return F.cross_entropy(model(chunks[:, :-1]).float().flatten(0, 1), chunks[:, 1:].flatten()).exp().item()


@pytest.mark.parametrize("weights, max_ratio", [("fp32", 1.0001), ("int8", 1.02), ("int4", 1.06)])
def test_decode_layouts_on_a_moe_model(trained_moe, weights, max_ratio):
    import copy

    from scratchlm.decode_weights import Int4Linear, Int8Linear, TransposedLinear, int4_fits, prepare_for_decode
    from scratchlm.generate import generate

    model, held_out = trained_moe
    ppl = perplexity(model, held_out)
    assert ppl < 20, f"the model did not learn (perplexity {ppl:.1f} of 256 bytes): the check would be void"
    fast = prepare_for_decode(copy.deepcopy(model), weights, group_size=32)
    layer = {"fp32": TransposedLinear, "int8": Int8Linear, "int4": Int4Linear}[weights]
    moe = fast.blocks[0].mlp
    # int4 needs whole runs of 64 inputs and tiles of 16 rows: an expert's down projection (96
    # inputs) and the router (4 experts) keep int8
    expected = lambda m: Int8Linear if weights == "int4" and not int4_fits(m.out_features, m.in_features, 32) else layer
    assert type(moe.router) is expected(moe.router)
    assert all(type(m) is expected(m) for pair in moe.expert_layers for m in pair)
    assert any(type(m) is layer for pair in moe.expert_layers for m in pair)
    assert not hasattr(moe, "gate_up_proj")  # the stacked copy is gone
    assert perplexity(fast, held_out) / ppl < max_ratio
    prompt = list(b"The ")
    [a] = generate(fast, None, [prompt], max_new_tokens=8)
    [b] = generate(model, None, [prompt], max_new_tokens=8)
    assert a.token_ids[:2] == b.token_ids[:2]


def test_lora_on_the_attention_of_a_moe_model():
    from scratchlm.lora import apply_lora, merge_lora

    torch.manual_seed(0)
    model = Transformer(tiny_moe())
    before = model(IDS).detach()
    wrapped = apply_lora(model, rank=4, targets=["qkv_proj", "out_proj"])
    assert len(wrapped) == 4 and torch.equal(model(IDS), before)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.5)
    for _ in range(3):
        F.cross_entropy(model(IDS)[0, :-1], IDS[0, 1:]).backward()
        opt.step()
        opt.zero_grad()
    after = model(IDS).detach()
    assert not torch.allclose(after, before)
    merge_lora(model)
    assert torch.allclose(model(IDS), after, atol=1e-5)


def test_gguf_export_refuses_a_moe_model():
    from scratchlm.errors import ScratchLMError
    from scratchlm.gguf_io.save import check_exportable

    with pytest.raises(ScratchLMError, match="mixture-of-experts models cannot be written to GGUF"):
        check_exportable(tiny_moe())


def test_tiny_presets_export_as_their_families():
    from scratchlm.hf import hf_config_dict

    assert hf_config_dict(ModelConfig.preset("moe-tiny"))["architectures"] == ["MixtralForCausalLM"]
    c = hf_config_dict(ModelConfig.preset("qwen3-moe-tiny"))
    assert c["architectures"] == ["Qwen3MoeForCausalLM"] and c["head_dim"] == 32 and c["num_experts"] == 8
    with pytest.raises(ConfigError, match="no Hugging Face family"):  # Mixtral always renormalises
        hf_config_dict(ModelConfig.preset("moe-tiny", norm_topk_prob=False))
