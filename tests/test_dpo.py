"""Preference tuning (DPO, robust DPO, hinge, IPO, SimPO): the loss and metrics equal TRL's on
the same models and batch, log-probs equal a transformers model's, masks, the LoRA reference,
a tiny model that learns a preference, exact resume, and clear errors for bad data."""

import json
import math
import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from scratchlm import ModelConfig, Transformer
from scratchlm.checkpoint import load_model, save_model
from scratchlm.cli import main
from scratchlm.posttrain import DataError, DPOConfig, DPOTask, collate_pairs, dpo_loss, load_pairs, make_pairs
from scratchlm.posttrain.dpo import preference_loss, sequence_logps, token_kl, train_dpo
from scratchlm.posttrain.preference_data import response_segments
from scratchlm.tokenizer import CharTokenizer
from scratchlm.train.core import Trainer

LETTERS = "abcdefghijklmnopqrstuvwxyz ?.:#ABCDEFGHIJKLMNOPQRSTUVWXYZ"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOWELS, CONSONANTS = "aeiou", "bcdfg"


def char_tokenizer():
    return CharTokenizer.train(LETTERS + "\n", special_tokens=SPECIALS)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def model_dir(path, tokenizer, preset="gpt-tiny", seed=0, **changes):
    torch.manual_seed(seed)
    save_model(path, Transformer(ModelConfig.preset(preset, vocab_size=tokenizer.vocab_size, **changes)), tokenizer)
    return path


def synthetic_pairs(n, seed):
    """The rule to learn: after "x:" the good answer is vowels, after "y:" consonants; each
    rejected answer is the other kind. A random model prefers one kind for both prompts, so
    it is right on about half the pairs."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        kind = rng.choice("xy")
        good, bad = (VOWELS, CONSONANTS) if kind == "x" else (CONSONANTS, VOWELS)
        length = rng.randint(3, 6)
        rows.append({"prompt": f"{kind}:", "chosen": "".join(rng.choice(good) for _ in range(length)),
                     "rejected": "".join(rng.choice(bad) for _ in range(length))})
    return rows


# ----------------------------------------------------------------------------------------
# Equal to TRL
# ----------------------------------------------------------------------------------------
def hf_tokenizer(tok: CharTokenizer):
    """A transformers tokenizer that encodes exactly like ``tok``: a BPE with no merges is
    one token per character; the special tokens get the ids that follow."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(tok.chars)}, merges=[]))
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    hf.add_special_tokens({"additional_special_tokens": SPECIALS[1:]})
    assert [hf.convert_tokens_to_ids(s) for s in SPECIALS] == [tok.special_tokens[s] for s in SPECIALS]
    return hf


def hf_llama(vocab_size, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, attn_implementation="eager")
    return LlamaForCausalLM(config).float()


def text_pairs(n, seed):
    rng = random.Random(seed)
    word = lambda k: "".join(rng.choice(LETTERS[:26]) for _ in range(k))  # noqa: E731
    return [{"prompt": word(rng.randint(2, 8)) + ":", "chosen": word(rng.randint(1, 9)),
             "rejected": word(rng.randint(1, 9))} for _ in range(n)]


@pytest.mark.parametrize("loss_type,label_smoothing", [("sigmoid", 0.0), ("robust", 0.2), ("hinge", 0.0),
                                                       ("ipo", 0.0)])
def test_loss_and_metrics_equal_trl_dpo_trainer(tmp_path, loss_type, label_smoothing):
    """TRL's DPOTrainer and ours on the same policy, the same (different) reference model
    and the same batch: the same loss, rewards, accuracy and margin within 1e-5."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer

    from scratchlm.hf import from_hf_model

    tok = char_tokenizer()
    policy, reference = hf_llama(tok.vocab_size, 0), hf_llama(tok.vocab_size, 1)
    ours, our_ref = from_hf_model(policy), from_hf_model(reference)  # copies, taken before TRL wraps them
    rows = text_pairs(6, seed=3)
    beta = 0.3
    args = TRLConfig(output_dir=str(tmp_path / "trl"), loss_type=[loss_type], beta=beta,
                     label_smoothing=label_smoothing, per_device_train_batch_size=6, max_length=None,
                     gradient_checkpointing=False, report_to="none", use_cpu=True, bf16=False, logging_steps=1)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=hf_tokenizer(tok))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, batch).item()
    trl = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    pairs, _ = make_pairs(rows, tok, "raw", max_length=64)
    x, y = collate_pairs(pairs, tok.eot_id)
    # The same token ids as TRL's batch (right-padded, chosen rows first), one shorter: inputs vs targets.
    T = x.shape[1] + 1
    assert torch.equal(batch["input_ids"][:, :T - 1], x) and int(batch["completion_mask"].sum()) == int((y >= 0).sum())
    ours.train()
    ref_logps = sequence_logps(our_ref(x), y)[0]
    loss, metrics = dpo_loss(ours, x, y, ref_logps, loss_type, beta=beta, label_smoothing=label_smoothing)
    assert loss.item() == pytest.approx(trl_loss, abs=1e-5)
    for ours_name, trl_name in [("chosen_reward", "rewards/chosen"), ("rejected_reward", "rewards/rejected"),
                                ("reward_accuracy", "rewards/accuracies"), ("reward_margin", "rewards/margins"),
                                ("chosen_logp", "logps/chosen"), ("rejected_logp", "logps/rejected")]:
        assert metrics[ours_name].item() == pytest.approx(trl[trl_name], abs=1e-5), ours_name
    assert 0 < trl["rewards/accuracies"] < 1  # a real comparison: the two models disagree on some pairs


@pytest.mark.parametrize("loss_type,label_smoothing", [("sigmoid", 0.1), ("simpo", 0.0), ("simpo", 0.1)])
def test_smoothed_and_reference_free_losses_equal_trl_cpo_loss(loss_type, label_smoothing):
    """Conservative DPO (label smoothing) and SimPO: TRL writes both in CPOTrainer.cpo_loss,
    which takes the two scores of a pair. cDPO is its sigmoid loss on the log-ratios; SimPO
    its simpo loss on the per-token mean log-probs."""
    pytest.importorskip("trl")
    from trl.experimental.cpo import CPOTrainer

    g = torch.Generator().manual_seed(0)
    B = 16
    chosen, rejected = -20 * torch.rand(B, generator=g), -20 * torch.rand(B, generator=g)
    ref_chosen, ref_rejected = -20 * torch.rand(B, generator=g), -20 * torch.rand(B, generator=g)
    n_chosen, n_rejected = torch.randint(1, 12, (B,), generator=g), torch.randint(1, 12, (B,), generator=g)
    beta, gamma = 0.5, 0.7
    settings = SimpleNamespace(alpha=0.0, beta=beta, label_smoothing=label_smoothing, simpo_gamma=gamma,
                               loss_type=loss_type, accelerator=SimpleNamespace(device=torch.device("cpu")))
    if loss_type == "simpo":
        scores = chosen / n_chosen, rejected / n_rejected
        refs = (None, None)
    else:
        scores = chosen - ref_chosen, rejected - ref_rejected
        refs = (ref_chosen, ref_rejected)
    trl_losses, trl_chosen, trl_rejected = CPOTrainer.cpo_loss(settings, *scores)
    losses, chosen_r, rejected_r = preference_loss(loss_type, chosen, rejected, *refs, n_chosen, n_rejected,
                                                   beta=beta, label_smoothing=label_smoothing, simpo_gamma=gamma)
    torch.testing.assert_close(losses, trl_losses, atol=1e-5, rtol=0)
    torch.testing.assert_close(chosen_r, trl_chosen, atol=1e-5, rtol=0)
    torch.testing.assert_close(rejected_r, trl_rejected, atol=1e-5, rtol=0)


def test_sequence_logps_equal_a_transformers_model():
    """log p(response | prompt) of each row, summed over the response's tokens only: our
    model and a transformers Llama with the same weights agree."""
    pytest.importorskip("transformers")
    from scratchlm.hf import from_hf_model

    tok = char_tokenizer()
    hf = hf_llama(tok.vocab_size, 0).eval()
    ours = from_hf_model(hf).eval()
    pairs, _ = make_pairs(text_pairs(5, seed=1), tok, "raw", max_length=64)
    x, y = collate_pairs(pairs, tok.eot_id)
    with torch.no_grad():
        logits = hf(input_ids=x).logits.float().log_softmax(-1)
        reference = (logits.gather(-1, y.clamp(min=0)[..., None])[..., 0] * (y >= 0)).sum(-1)
        logps, tokens = sequence_logps(ours(x), y)
    torch.testing.assert_close(logps, reference, atol=1e-5, rtol=0)
    assert tokens.tolist() == [sum(p.chosen.trainable[1:]) for p in pairs] + [sum(p.rejected.trainable[1:])
                                                                             for p in pairs]


def test_kl_metric_is_the_token_level_kl_on_response_positions():
    g = torch.Generator().manual_seed(0)
    logits, ref_logits = torch.randn(4, 7, 11, generator=g), torch.randn(4, 7, 11, generator=g)
    y = torch.randint(0, 11, (4, 7), generator=g)
    y[:, :3] = -100  # prompt
    y[1, 5:] = -100  # padding
    per_position = F.kl_div(ref_logits.log_softmax(-1), logits.log_softmax(-1), log_target=True,
                            reduction="none").sum(-1)  # KL(pi || pi_ref) at each position
    expected = per_position[y != -100].mean()
    torch.testing.assert_close(token_kl(logits, ref_logits, y), expected, atol=1e-6, rtol=0)
    assert token_kl(logits, logits, y).abs().item() < 1e-6


# ----------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("template", ["chatml", "alpaca", "raw"])
def test_only_the_final_response_is_trainable(template):
    """The trainable tokens spell the response and its end marker, in every template; an
    earlier assistant turn in a chat prompt is context, not trained."""
    tok = char_tokenizer()
    prompt = "ab:" if template != "chatml" else [{"role": "user", "content": "hi"},
                                                  {"role": "assistant", "content": "yo"},
                                                  {"role": "user", "content": "ab:"}]
    segments = response_segments(prompt, "xyz", template)
    trained = "".join(s.text for s in segments if s.trainable)
    assert trained == {"chatml": "xyz<|im_end|>", "alpaca": "xyz<|endoftext|>", "raw": "xyz<|endoftext|>"}[template]
    pairs, _ = make_pairs([{"prompt": prompt, "chosen": "xyz", "rejected": "q"}], tok, template, 200)
    ids = pairs[0].chosen.ids
    assert tok.decode([i for i, t in zip(ids, pairs[0].chosen.trainable) if t]) == trained


def test_padding_and_prompt_positions_never_count():
    """Changing the logits where the target is prompt or padding leaves the log-probs (so the
    loss) as they were; changing a response position does not. And a pair's loss is the
    same alone or padded beside a longer pair."""
    tok = char_tokenizer()
    pairs, _ = make_pairs(text_pairs(4, seed=2), tok, "chatml", 200)
    x, y = collate_pairs(pairs, tok.eot_id)
    assert (y == -100).any(dim=1).all()  # every row has prompt (and most, padding) positions
    logits = torch.randn(*x.shape, tok.vocab_size)
    before = sequence_logps(logits, y)[0]
    noisy = logits + 5 * torch.randn_like(logits) * (y == -100)[..., None]
    torch.testing.assert_close(sequence_logps(noisy, y)[0], before, atol=0, rtol=0)
    moved = logits.clone()
    row, col = (y != -100).nonzero()[0]
    moved[row, col] += 3 * torch.randn(tok.vocab_size)
    assert not torch.equal(sequence_logps(moved, y)[0], before)

    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("gpt-tiny", vocab_size=tok.vocab_size)).eval()
    short = min(range(len(pairs)), key=lambda i: max(len(pairs[i].chosen), len(pairs[i].rejected)))
    with torch.no_grad():
        xs, ys = collate_pairs([pairs[short]], tok.eot_id)
        ref = sequence_logps(model(xs), ys)[0] - 1.0  # any reference
        alone = dpo_loss(model, xs, ys, ref)[0]
        for pad in (tok.eot_id, 0, 7):  # whatever the pad id and however much padding
            xb, yb = collate_pairs(pairs, pad)
            B = len(pairs)
            logps = sequence_logps(model(xb), yb)[0]
            assert logps[short].item() == pytest.approx(sequence_logps(model(xs), ys)[0][0].item(), abs=1e-5)
            assert logps[B + short].item() == pytest.approx(sequence_logps(model(xs), ys)[0][1].item(), abs=1e-5)
        assert torch.isfinite(alone)


@pytest.mark.parametrize("preset", ["llama-tiny", "gemma3-tiny"])  # gemma3: rows past its window of 16
def test_a_pairs_prompt_runs_once_with_the_same_loss_and_gradients(monkeypatch, preset):
    """With the response spans each pair's prompt runs once for its two rows (response_logits):
    the logits at the response positions, the loss, the metrics and the gradients equal those of
    the plain forward over 2B rows, in both layouts of shared_prompt.py."""
    from scratchlm import shared_prompt
    from scratchlm.posttrain.dpo import response_logits, response_spans

    tok = char_tokenizer()
    pairs, _ = make_pairs(text_pairs(5, seed=4), tok, "chatml", 200)
    x, y = collate_pairs(pairs, tok.eot_id)
    spans = response_spans(y)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset(preset, vocab_size=tok.vocab_size, context_length=256))
    assert x.shape[1] > 2 * (model.config.sliding_window or 0)
    m = (y != -100).flatten()
    logits, index = response_logits(model, x, spans)
    assert len(index) < x.numel() and set(m.nonzero()[:, 0].tolist()) <= set(index.tolist())
    torch.testing.assert_close(logits[m[index]], model(x).flatten(0, 1)[m], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        ref_logits = model(x) + 0.1 * torch.randn(*x.shape, tok.vocab_size)  # any reference
    ref = sequence_logps(ref_logits, y)[0]
    ref_logits = (ref_logits.flatten(0, 1), torch.arange(x.numel()))  # the plain layout: every position
    results, cached = [], []
    real_cached = shared_prompt._cached_hidden
    monkeypatch.setattr(shared_prompt, "_cached_hidden", lambda *a: cached.append(1) or real_cached(*a))
    for layout in (None, "packed", "cached"):
        if layout:  # the one layout, whatever the cost estimate says
            monkeypatch.setattr(shared_prompt, "_layout_cost",
                                lambda *a, packed, layout=layout: float(packed != (layout == "packed")))
        model.zero_grad()
        loss, metrics = dpo_loss(model, x, y, ref, ref_logits=ref_logits, spans=spans if layout else None)
        loss.backward()
        results.append((loss, metrics, [p.grad.clone() for p in model.parameters()]))
    # A wrapped policy (DDP: no shared prompt, every position) beside a reference that gives
    # the responses only: the KL metric compares the same positions.
    class Wrapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, ids):
            return self.inner(ids)

    with torch.no_grad():
        compact = response_logits(model, x, spans)
        wrapped_kl = dpo_loss(Wrapped(model), x, y, ref, ref_logits=compact, spans=spans)[1]["kl"]
        plain_kl = dpo_loss(model, x, y, ref, ref_logits=(model(x).flatten(0, 1), torch.arange(x.numel())))[1]["kl"]
    assert wrapped_kl.item() == pytest.approx(plain_kl.item(), abs=1e-6) and abs(plain_kl.item()) < 1e-5
    assert cached  # the cached layout ran (with a sliding window too)
    (loss, metrics, grads) = results[0]
    for loss2, metrics2, grads2 in results[1:]:
        assert loss2.item() == pytest.approx(loss.item(), abs=1e-6)
        assert all(metrics2[k].item() == pytest.approx(metrics[k].item(), abs=1e-5) for k in metrics)
        for a, b in zip(grads, grads2, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------
def preference_accuracy(model, pairs, pad_id):
    """The share of pairs on which ``model`` gives the chosen response the higher log-prob."""
    x, y = collate_pairs(pairs, pad_id)
    with torch.no_grad():
        logps = sequence_logps(model.eval()(x), y)[0]
    return (logps[:len(pairs)] > logps[len(pairs):]).float().mean().item()


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "simpo"])
def test_tiny_model_learns_the_preference_on_held_out_pairs(tmp_path, loss):
    tok = char_tokenizer()
    base = model_dir(tmp_path / "base", tok, context_length=32)
    data = write_jsonl(tmp_path / "train.jsonl", synthetic_pairs(256, seed=0))
    val = write_jsonl(tmp_path / "val.jsonl", synthetic_pairs(64, seed=1))
    val_pairs, _ = make_pairs(load_pairs(val), tok, "raw", 33)
    before = preference_accuracy(load_model(base)[0], val_pairs, tok.eot_id)
    beta = {"sigmoid": 0.5, "ipo": 0.5, "simpo": 2.0}[loss]
    result = train_dpo(base, data, tmp_path / "run", val_data=str(val), template="raw", loss=loss, beta=beta,
                       max_steps=60, batch_size=16, lr=3e-3, warmup_steps=5, eval_every=60, progress=False,
                       plot=False, quiet=True)
    after = preference_accuracy(load_model(tmp_path / "run" / "latest")[0], val_pairs, tok.eot_id)
    assert 0.3 <= before <= 0.7, before
    assert result.val["val_reward_accuracy"] >= 0.9 and after >= 0.9, (result.val, after)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert {"train_loss", "reward_accuracy", "chosen_reward", "rejected_reward", "reward_margin"} <= set(train_rows[0])
    assert ("kl" in train_rows[0]) == (loss != "simpo")


def lora_setup(tmp_path, **options):
    tok = char_tokenizer()
    base = model_dir(tmp_path / "base", tok, preset="llama-tiny", context_length=32)
    data = write_jsonl(tmp_path / "train.jsonl", synthetic_pairs(32, seed=0))
    cfg = DPOConfig.from_dict(dict(model=str(base), data=str(data), out_dir=str(tmp_path / "run"), template="raw",
                                   lora=True, lora_rank=4, lora_targets="qkv_proj,down_proj", lr=1e-2, batch_size=8,
                                   max_steps=5, warmup_steps=0, val_fraction=0.25, progress=False, plot=False,
                                   **options))
    return tok, base, cfg


def test_dropout_is_off_by_default_so_step_0_rewards_are_ties(tmp_path):
    """With dropout in the model, the policy's first loss is exactly log 2 (every reward 0)
    only because training turns dropout off, as the reference runs."""
    tok = char_tokenizer()
    base = model_dir(tmp_path / "base", tok, context_length=32, dropout=0.3)
    data = write_jsonl(tmp_path / "train.jsonl", synthetic_pairs(16, seed=0))
    common = dict(template="raw", max_steps=1, batch_size=8, val_fraction=0.0, progress=False, plot=False, quiet=True)
    off = train_dpo(base, data, tmp_path / "off", **common)
    on = train_dpo(base, data, tmp_path / "on", disable_dropout=False, **common)
    assert off.losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert on.losses[0] != pytest.approx(math.log(2), abs=1e-4)
    assert load_model(tmp_path / "off" / "latest")[0].config.dropout == 0.3  # the saved config keeps it


def test_lora_reference_is_the_base_model_and_only_adapters_train(tmp_path):
    tok, base, cfg = lora_setup(tmp_path)
    task = DPOTask(cfg, quiet=True)
    original = {k: v.clone() for k, v in load_model(base)[0].state_dict().items()}
    Trainer(cfg, task, quiet=True).run()
    trained = task.net.state_dict()
    adapters = {k for k in trained if ".lora_" in k}
    assert adapters and all(not torch.equal(trained[k], torch.zeros_like(trained[k])) for k in adapters
                            if k.endswith("lora_B"))
    for name, value in trained.items():  # every base weight as it was
        if name not in adapters:
            assert torch.equal(value, original[name.replace(".base.", ".")]), name
    assert {n for n, p in task.net.named_parameters() if p.requires_grad} == adapters
    # The reference (adapters off) is exactly the base model; the policy is not.
    x, y = collate_pairs(task.train_pairs[:8], task.pad_id)
    fresh = load_model(base)[0].eval()
    with torch.no_grad():
        expected = sequence_logps(fresh(x), y)[0]
        policy = sequence_logps(task.net.eval()(x), y)[0]
    assert torch.equal(task.reference_logps(x, y), expected)
    assert not torch.allclose(policy, expected)
    assert task.reference is None  # no second copy


def test_precomputed_reference_gives_the_same_run(tmp_path):
    tok = char_tokenizer()
    base = model_dir(tmp_path / "base", tok, context_length=32)
    data = write_jsonl(tmp_path / "train.jsonl", synthetic_pairs(48, seed=0))
    common = dict(template="raw", max_steps=4, batch_size=8, lr=3e-3, warmup_steps=0, eval_every=2,
                  progress=False, plot=False, quiet=True)
    live = train_dpo(base, data, tmp_path / "live", **common)
    pre = train_dpo(base, data, tmp_path / "pre", precompute_ref=True, **common)
    assert pre.losses == pytest.approx(live.losses, abs=1e-6)
    assert pre.val["val_reward_accuracy"] == live.val["val_reward_accuracy"]


@pytest.mark.parametrize("variant", ["full", "lora", "precompute"])
def test_resume_continues_exactly(tmp_path, variant):
    """6 steps straight == 3 steps, then --resume to 6, with dropout on (--no-disable-dropout):
    the same loss at every step and the same weights, bit for bit."""
    tok = char_tokenizer()
    base = model_dir(tmp_path / "base", tok, context_length=32, dropout=0.2)
    data = write_jsonl(tmp_path / "train.jsonl", synthetic_pairs(40, seed=0))
    common = dict(template="raw", batch_size=4, lr=1e-3, min_lr=1e-3, warmup_steps=0, val_fraction=0.0,
                  progress=False, plot=False, quiet=True, lora=variant == "lora", lora_dropout=0.3, disable_dropout=False,
                  precompute_ref=variant == "precompute")
    once = train_dpo(base, data, tmp_path / "once", max_steps=6, **common)
    first = train_dpo(base, data, tmp_path / "twice", max_steps=6, stop_at_step=3, **common)
    second = train_dpo(base, data, tmp_path / "twice", max_steps=6, resume=True, **common)
    assert first.losses + second.losses == once.losses
    if variant == "lora":
        from scratchlm.lora import load_adapter

        a, b = load_model(base)[0], load_model(base)[0]
        load_adapter(a, tmp_path / "once" / "latest")
        load_adapter(b, tmp_path / "twice" / "latest")
    else:
        a, b = load_model(tmp_path / "once" / "latest")[0], load_model(tmp_path / "twice" / "latest")[0]
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_ctrl_c_saves_a_checkpoint_that_resumes(tmp_path):
    import os
    import signal

    from scratchlm.checkpoint import load_train_state

    class Interrupted(DPOTask):
        def micro_batch(self, step, micro, rank, world, model):
            if step == 2:
                os.kill(os.getpid(), signal.SIGINT)  # as if the user pressed Ctrl-C during step 3
            return super().micro_batch(step, micro, rank, world, model)

    tok = char_tokenizer()
    base = model_dir(tmp_path / "base", tok, context_length=32)
    data = write_jsonl(tmp_path / "train.jsonl", synthetic_pairs(32, seed=0))
    cfg = DPOConfig(model=str(base), data=str(data), out_dir=str(tmp_path / "run"), template="raw", max_steps=5,
                    batch_size=4, lr=1e-3, progress=False, plot=False, device="cpu")
    result = Trainer(cfg, Interrupted(cfg, quiet=True), quiet=True).run()
    assert result.interrupted and result.step == 3
    assert load_train_state(tmp_path / "run" / "latest")["step"] == 3
    load_model(tmp_path / "run" / "latest")  # a whole model directory
    resumed = train_dpo(base, data, tmp_path / "run", template="raw", max_steps=5, batch_size=4, lr=1e-3,
                        resume=True, progress=False, plot=False, quiet=True)
    assert resumed.step == 5 and len(resumed.losses) == 2


# ----------------------------------------------------------------------------------------
# Data errors and the command line
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("row,message", [
    ('{"prompt": "a", "chosen": "b"}', "missing field 'rejected'"),
    ('{"prompt": "a", "chosen": "b", "rejected": ""}', "'rejected' is empty"),
    ('{not json', "not valid JSON"),
    ('["a", "b", "c"]', "expected a JSON object"),
    ('{"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "chosen": "c", '
     '"rejected": "d"}', "ends with an assistant message"),
    ('{"prompt": [{"role": "robot", "content": "a"}], "chosen": "c", "rejected": "d"}', "role 'robot'"),
    ('{"prompt": "a", "chosen": [{"role": "user", "content": "c"}], "rejected": "d"}', "one assistant message"),
])
def test_bad_rows_name_the_file_and_row(tmp_path, row, message, capsys):
    good = '{"prompt": "a", "chosen": "b", "rejected": "c"}'
    path = tmp_path / "pairs.jsonl"
    path.write_text(f"{good}\n\n{row}\n")
    with pytest.raises(DataError, match=r"pairs\.jsonl row 3: .*" + message.replace("[", r"\[")):
        load_pairs(path)
    base = model_dir(tmp_path / "base", char_tokenizer(), context_length=32)
    code = main(["posttrain", "dpo", str(base), "--data", str(path), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("scratchlm: error:") and "pairs.jsonl row 3" in err


def test_a_pair_the_template_cannot_lay_out_names_its_row(tmp_path):
    """Alpaca holds one exchange: a multi-turn prompt is an error that names the file's row,
    also after the held-out split has shuffled the pairs."""
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}] * 5 + [{"prompt": turns, "chosen": "d", "rejected": "e"}]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    base = model_dir(tmp_path / "base", char_tokenizer(), context_length=32)
    cfg = DPOConfig(model=str(base), data=str(path), template="alpaca", val_fraction=0.5, max_steps=1)
    with pytest.raises(DataError, match=r"pairs\.jsonl row 6: .*one instruction"):
        DPOTask(cfg, quiet=True)


def test_cli_other_bad_input_is_one_line(tmp_path, capsys):
    base = model_dir(tmp_path / "base", char_tokenizer(), context_length=32)
    data = write_jsonl(tmp_path / "d.jsonl", synthetic_pairs(4, seed=0))
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": [{"role": "user", "content": "x:"}], "chosen": "a",
                                                  "rejected": "b"}])
    cases = [(["--data", str(tmp_path / "missing.jsonl")], "missing.jsonl"),
             (["--data", str(data), "--beta", "0"], "beta"),
             (["--data", str(data), "--loss", "kto"], "loss"),
             (["--data", str(data), "--loss", "robust", "--label-smoothing", "0.5"], "label_smoothing"),
             (["--data", str(chat), "--template", "raw"], "raw"),
             (["--data", str(data), "--lora", "--lora-targets", "q_proj"], "q_proj")]
    for extra, needle in cases:
        code = main(["posttrain", "dpo", str(base), "--out", str(tmp_path / "run"), "--max-steps", "1", *extra])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and needle in err, (extra, err)


def test_cli_dpo_end_to_end(tmp_path, capsys):
    base = model_dir(tmp_path / "base", char_tokenizer(), context_length=32)
    data = write_jsonl(tmp_path / "d.jsonl", synthetic_pairs(24, seed=0))
    chat = write_jsonl(tmp_path / "v.jsonl", [{"prompt": [{"role": "user", "content": p["prompt"]}],
                                               "chosen": [{"role": "assistant", "content": p["chosen"]}],
                                               "rejected": p["rejected"]} for p in synthetic_pairs(6, seed=1)])
    code = main(["posttrain", "dpo", str(base), "--data", str(data), "--val-data", str(chat), "--out",
                 str(tmp_path / "run"), "--max-steps", "3", "--batch-size", "4", "--eval-every", "2",
                 "--no-progress", "--template", "chatml"])
    assert code == 0, capsys.readouterr().err
    assert "done at step 3" in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [2, 3] and all("val_reward_accuracy" in r for r in evals)
    assert (tmp_path / "run" / "latest" / "prompt_format.json").exists()
    # MODEL is anything load_any opens: a preset too (random weights, its own tokenizer).
    code = main(["posttrain", "dpo", "gpt-tiny", "--data", str(data), "--out", str(tmp_path / "preset"),
                 "--max-steps", "1", "--batch-size", "4", "--no-progress", "--template", "chatml", "--lora"])
    assert code == 0 and (tmp_path / "preset" / "latest" / "adapter_config.json").exists()
