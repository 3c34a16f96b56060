"""GRPO: the objective equals TRL's GRPOTrainer on fixed inputs, masks, LoRA's reference,
a tiny model that learns the arithmetic task, exact resume, the verifiers and the CLI."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from scratchlm import ModelConfig, Transformer
from scratchlm.checkpoint import load_model, save_model
from scratchlm.cli import main
from scratchlm.errors import ConfigError, DataError, NotFound
from scratchlm.eval.generative import final_number
from scratchlm.lora import adapters_disabled, apply_lora, lora_layers
from scratchlm.posttrain.grpo import (
    GRPOConfig,
    GRPOTask,
    group_advantages,
    grpo,
    grpo_loss,
    pad_rows,
    token_logprobs,
)
from scratchlm.posttrain.rewards import (
    TEMPLATES,
    ArithmeticTask,
    GSM8KTask,
    call_reward,
    correct_reward,
    format_reward,
    load_reward_function,
)
from scratchlm.tokenizer import CharTokenizer
from scratchlm.train.core import Trainer
from scratchlm.train.distributed import Processes
from scratchlm.train.task import Run

LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:;!?#+=-'\n()"


def model_dir(path, preset="gpt-tiny", seed=0, **changes):
    tok = CharTokenizer.train(LETTERS, special_tokens=["<|endoftext|>"])
    torch.manual_seed(seed)
    config = ModelConfig.preset(preset, vocab_size=tok.vocab_size, context_length=96, **changes)
    save_model(path, Transformer(config), tok)
    return path


def run_options(tmp_path, name, **changes):
    options = dict(task="arithmetic", max_operand=2, ops="+", batch_size=4, group_size=4, max_new_tokens=3,
                   lr=3e-3, eval_prompts=16, eval_every=1000, progress=False, plot=False, device="cpu",
                   out_dir=str(tmp_path / name), n_samples=2)
    return {**options, **changes}


def local_run(cfg, out_dir):
    """The run a task is given by the core, for a task used outside it."""
    return Run(cfg, Processes(), torch.device("cpu"), None, False, out_dir)


def fixed_inputs(seed=0, N=6, T=5, G=3):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(N, T, generator=g) * 3
    old = logps + 0.3 * torch.randn(N, T, generator=g)  # ratios well inside and outside the clip range
    ref = logps + 0.2 * torch.randn(N, T, generator=g)
    mask = torch.ones(N, T)
    mask[0, 3:], mask[2, 1:], mask[4, 4:] = 0, 0, 0  # completions of different lengths
    rewards = torch.rand(N, generator=g).round()
    return logps, old, ref, mask, rewards


# ----------------------------------------------------------------------------------------
# Against TRL
# ----------------------------------------------------------------------------------------
def trl_compute_loss(logps, old, ref, mask, advantages, **config):
    """TRL's GRPOTrainer._compute_loss, the function itself, on fixed per-token log-probs.

    The trainer object it runs on is a stand-in carrying what __init__ sets from a real
    trl.GRPOConfig (grpo_trainer.py: epsilon_low = args.epsilon, ...), one process, no
    gradient accumulation; the model's forward (_get_per_token_logps_and_entropies) returns
    ``logps``. Returns (loss, TRL's logged metrics)."""
    import types
    from collections import defaultdict

    import trl
    from trl.trainer.grpo_trainer import GRPOTrainer

    args = trl.GRPOConfig(output_dir="unused", report_to="none", use_cpu=True, **config)
    N, T = logps.shape
    fake = types.SimpleNamespace(
        args=args, beta=args.beta, loss_type=args.loss_type, epsilon_low=args.epsilon,
        epsilon_high=args.epsilon_high if args.epsilon_high is not None else args.epsilon,
        importance_sampling_level=args.importance_sampling_level, top_entropy_quantile=args.top_entropy_quantile,
        off_policy_mask_threshold=args.off_policy_mask_threshold, use_vllm=False,
        vllm_importance_sampling_correction=args.vllm_importance_sampling_correction,
        max_completion_length=args.max_completion_length, aux_loss_enabled=False, _entropy_bonus_enabled=False,
        current_gradient_accumulation_steps=1, model=types.SimpleNamespace(training=True),
        accelerator=types.SimpleNamespace(num_processes=1, reduce=lambda x, reduction: x, gather=lambda x: x),
        _metrics={"train": defaultdict(list)},
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None))
    inputs = {"prompt_ids": torch.zeros(N, 2, dtype=torch.long), "prompt_mask": torch.ones(N, 2),
              "completion_ids": torch.zeros(N, T, dtype=torch.long), "completion_mask": mask,
              "advantages": advantages, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": mask.sum()}
    if old is None:
        del inputs["old_per_token_logps"]
    loss = GRPOTrainer._compute_loss(fake, None, inputs)
    return loss, {k: v[0] for k, v in fake._metrics["train"].items()}


def trl_advantages(rewards, G, scale_rewards):
    """The advantages of GRPOTrainer._generate_and_score_completions ("sum_then_normalize",
    one reward function of weight 1), written out from its source with TRL's own nanstd."""
    from trl.trainer.utils import nanstd

    mean = torch.nanmean(rewards.view(-1, G), dim=1).repeat_interleave(G, dim=0)
    if scale_rewards in ("group", "none"):
        std = nanstd(rewards.view(-1, G), dim=1).repeat_interleave(G, dim=0)
    else:
        std = nanstd(rewards).expand_as(rewards)
    advantages = rewards - mean
    if scale_rewards != "none":
        advantages = advantages / (std + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_equal_trl(scale):
    pytest.importorskip("trl")
    for seed in range(3):
        rewards = torch.rand(12, generator=torch.Generator().manual_seed(seed)) * 2
        rewards[4:8] = 1.0  # a group with one reward for all: zero advantage, no division by zero
        torch.testing.assert_close(group_advantages(rewards, 4, scale), trl_advantages(rewards, 4, scale),
                                   rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta, eps_high, fresh, correction", [
    (0.0, None, False, True), (0.04, None, False, True), (0.1, 0.28, False, False), (0.04, None, True, True),
    (0.04, 0.28, True, False)])
def test_loss_kl_and_clipping_equal_trl(loss_type, beta, eps_high, fresh, correction):
    """fresh: one update per batch of samples, no old log-probs (TRL and we use logps.detach())."""
    pytest.importorskip("trl")
    logps, old, ref, mask, rewards = fixed_inputs(seed=1)
    adv = group_advantages(rewards, 3)
    old = None if fresh else old
    config = dict(loss_type=loss_type, beta=beta, epsilon=0.2, epsilon_high=eps_high, max_completion_length=5,
                  use_bias_correction_kl=correction)
    ours_x, trl_x = logps.clone().requires_grad_(True), logps.clone().requires_grad_(True)
    ours, metrics = grpo_loss(ours_x, old, ref, adv, mask, epsilon_low=0.2, epsilon_high=eps_high or 0.2, beta=beta,
                              kl_correction=correction, loss_type=loss_type, max_completion_length=5,
                              num_items=mask.sum())
    theirs, trl_metrics = trl_compute_loss(trl_x, old, ref, mask, adv, **config)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours_x.grad, trl_x.grad, rtol=1e-6, atol=1e-7)
    pairs = {"clip_low": "clip_ratio/low_mean", "clip_high": "clip_ratio/high_mean",
             "clip_fraction": "clip_ratio/region_mean"} | ({"kl": "kl"} if beta else {})
    for ours_name, trl_name in pairs.items():
        assert metrics[ours_name].item() == pytest.approx(trl_metrics[trl_name], rel=1e-6, abs=1e-7), ours_name
    if not fresh:
        assert trl_metrics["clip_ratio/region_mean"] > 0  # the inputs do exercise clipping


# ----------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------
def test_pad_rows_marks_exactly_the_completion_targets():
    ids, mask = pad_rows([[5, 6, 7, 1, 2], [8, 3]], starts=[3, 1], pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 1, 2], [8, 3, 0, 0, 0]]
    # target j is ids[j + 1]: row 0's completion is ids 1, 2 (targets 2, 3); row 1's is id 3 (target 0)
    assert mask.tolist() == [[0, 0, 1, 1], [1, 0, 0, 0]]


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_prompt_and_padding_never_count(loss_type):
    logps, old, ref, mask, rewards = fixed_inputs()
    adv = group_advantages(rewards, 3)
    x = logps.clone().requires_grad_(True)
    loss, metrics = grpo_loss(x, old, ref, adv, mask, beta=0.1, loss_type=loss_type, max_completion_length=5)
    loss.backward()
    assert torch.all(x.grad[mask == 0] == 0) and torch.any(x.grad[mask == 1] != 0)
    other = -torch.rand(3, *logps.shape) * 5  # any other (finite) values at the masked places
    junk, junk_old, junk_ref = (torch.where(mask == 1, t, o) for t, o in zip((logps, old, ref), other))
    loss2, metrics2 = grpo_loss(junk, junk_old, junk_ref, adv, mask, beta=0.1, loss_type=loss_type,
                                max_completion_length=5)
    assert torch.equal(loss, loss2)
    assert all(torch.equal(metrics[k], metrics2[k]) for k in metrics)


def test_right_padding_changes_no_log_prob():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("llama-tiny", vocab_size=50)).eval()
    rows = [[1, 2, 3, 4, 5, 6], [7, 8, 9]]
    ids, mask = pad_rows(rows, [2, 1], pad_id=0)
    with torch.no_grad():
        batched = token_logprobs(model, ids, temperature=0.7)
        for i, row in enumerate(rows):
            alone = token_logprobs(model, torch.tensor([row]), temperature=0.7)[0]
            torch.testing.assert_close(batched[i, :len(row) - 1], alone, rtol=1e-5, atol=1e-5)
            # temperature: the log-softmax of logits / T
            logits = model(torch.tensor([row]))[0, :-1] / 0.7
            torch.testing.assert_close(alone, logits.log_softmax(-1).gather(-1, torch.tensor(row[1:])[:, None])[:, 0])


@pytest.mark.parametrize("layout", ["packed", "cached"])
@pytest.mark.parametrize("preset", ["llama-tiny", "gpt-tiny", "moe-tiny"])
def test_shared_prompts_give_the_full_forwards_log_probs_and_gradients(preset, layout, monkeypatch):
    """Each group's prompt runs once (shared_prompt.py, in either layout): the completions'
    log-probs and the gradients of a loss on them equal the plain forward's over the full rows."""
    from scratchlm import shared_prompt
    from scratchlm.shared_prompt import can_share

    monkeypatch.setattr(shared_prompt, "_layout_cost", lambda *a, packed: float(packed != (layout == "packed")))

    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset(preset, vocab_size=50, context_length=64))
    gen = torch.Generator().manual_seed(1)
    rows, starts = [], []
    for g in range(3):  # 3 prompts of different lengths, 4 completions of different lengths each
        prompt = torch.randint(0, 50, (4 + 3 * g,), generator=gen).tolist()
        for _ in range(4):
            n = int(torch.randint(1, 9, (1,), generator=gen))
            rows.append(prompt + torch.randint(0, 50, (n,), generator=gen).tolist())
            starts.append(len(prompt))
    ends = [len(r) for r in rows]
    ids, mask = pad_rows(rows, starts, pad_id=0)
    assert can_share(model, ids, starts, ends)
    plain = token_logprobs(model, ids, temperature=0.7)
    shared = token_logprobs(model, ids, 0.7, starts, ends)
    m = mask == 1
    torch.testing.assert_close(shared[m], plain[m], rtol=1e-5, atol=1e-5)
    assert torch.all(shared[:, :min(starts) - 1] == 0)
    weights = torch.randn(mask.shape, generator=gen) * mask  # any loss on the completion tokens
    grads = [torch.autograd.grad((lp * weights).sum(), list(model.parameters()), allow_unused=True)
             for lp in (plain, shared)]
    for a, b in zip(*grads, strict=True):
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    # Where the KV-cache trick does not apply, the plain forward runs.
    assert not can_share(torch.nn.Sequential(model), ids, starts, ends)
    assert not can_share(model, ids, [60] * len(rows), [66] * len(rows))  # prompt + completion > context


# ----------------------------------------------------------------------------------------
# LoRA: the reference is the base, only adapters train
# ----------------------------------------------------------------------------------------
def test_adapters_disabled_is_exactly_the_base_model():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("llama-tiny", vocab_size=50)).eval()
    base = Transformer(model.config).eval()
    base.load_state_dict(model.state_dict())
    apply_lora(model, rank=2, targets="qkv_proj,out_proj,down_proj")
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B)  # adapters that change the output
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        assert not torch.allclose(model(ids), base(ids))
        with adapters_disabled(model):
            assert torch.equal(model(ids), base(ids))
        assert not torch.allclose(model(ids), base(ids))  # and back on afterwards


def test_lora_run_trains_only_adapters_and_its_kl_is_to_the_base(tmp_path):
    base_dir = model_dir(tmp_path / "base")
    cfg = GRPOConfig(model=str(base_dir), max_steps=3, beta=0.05, lora=True, lora_rank=2,
                     **run_options(tmp_path, "lora", lr=3e-2))
    task = GRPOTask(cfg, quiet=True)
    result = Trainer(cfg, task, quiet=True).run()
    assert result.step == 3
    start, _ = load_model(base_dir)
    for name, p in task.net.state_dict().items():  # the base weights, as loaded
        if "lora_" not in name:
            assert torch.equal(p, start.state_dict()[name.replace(".base.", ".")]), name
    assert any(torch.any(layer.lora_B != 0) for layer in lora_layers(task.net).values())
    rows = [json.loads(line) for line in (tmp_path / "lora" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert train[0]["kl"] == 0.0  # the first update: the policy is still the base model exactly
    assert train[-1]["kl"] > 0.0


# ----------------------------------------------------------------------------------------
# Behaviour, resume
# ----------------------------------------------------------------------------------------
def test_grpo_raises_held_out_accuracy_of_a_tiny_model(tmp_path):
    """A random tiny model almost never writes the sum after "Answer:" (one token of ~80);
    12 GRPO steps raise its accuracy on held-out problems (questions it never trained on).
    What such a model learns first is to answer with a digit, the likeliest sums first
    (docs/reinforcement-learning.md shows a longer run)."""
    cfg = GRPOConfig(model=str(model_dir(tmp_path / "base")), max_steps=12,
                     **run_options(tmp_path, "run", batch_size=8, group_size=8, max_new_tokens=1, lr=1e-2,
                                   eval_prompts=48, format_weight=0.0))
    task = GRPOTask(cfg, quiet=True)
    task.setup(local_run(cfg, tmp_path))
    before = task.evaluate(task.base)["val_accuracy"]
    result = grpo(cfg, quiet=True)
    after = result.val["val_accuracy"]
    assert before <= 0.05 and after >= before + 0.12, (before, after)
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert {"question", "answer", "completion", "reward"} <= set(samples[0])


@pytest.mark.parametrize("num_iterations, lora", [(1, False), (2, False), (2, True)])
def test_resume_continues_exactly(tmp_path, num_iterations, lora):
    """4 steps straight == 2 (or 3) steps, then --resume to 4, dropout on: the same losses and
    weights bit for bit (the rollouts of a generation in the middle of its num_iterations
    updates are part of the checkpoint; sampling draws from a generator seeded by the step)."""
    base = model_dir(tmp_path / "base", dropout=0.1)
    common = dict(max_steps=4, num_iterations=num_iterations, beta=0.04, lora=lora, lora_rank=2,
                  **run_options(tmp_path, "x"))
    once = grpo(GRPOConfig(model=str(base), **{**common, "out_dir": str(tmp_path / "once")}), quiet=True)
    first = grpo(GRPOConfig(model=str(base), stop_at_step=(3 if num_iterations == 2 else 2),
                            **{**common, "out_dir": str(tmp_path / "twice")}), quiet=True)
    second = grpo(GRPOConfig(model=str(base), resume=True, **{**common, "out_dir": str(tmp_path / "twice")}),
                  quiet=True)
    assert first.losses + second.losses == once.losses
    if lora:
        a, b = (load_file(str(tmp_path / run / "latest" / "adapter.safetensors")) for run in ("once", "twice"))
    else:
        a, b = (load_model(tmp_path / run / "latest")[0].state_dict() for run in ("once", "twice"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_first_update_has_ratio_one_old_logps_from_sampling(tmp_path):
    """With num_iterations 2 the log-probs recorded at sampling time equal the policy's at
    the first update (the cached decode and the training forward agree): nothing clips."""
    cfg = GRPOConfig(model=str(model_dir(tmp_path / "base", preset="llama-tiny")), max_steps=1, num_iterations=2,
                     **run_options(tmp_path, "r"))
    task = GRPOTask(cfg, quiet=True)
    task.setup(local_run(cfg, tmp_path))
    model = task.model(None)
    batch = task.micro_batch(0, 0, 0, 1, model)
    with torch.no_grad():
        logps = token_logprobs(model, batch["ids"], cfg.temperature)
    m = batch["mask"] == 1
    torch.testing.assert_close(logps[m], batch["old_logps"][m], rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------
# Verifiers and tasks
# ----------------------------------------------------------------------------------------
def _solve(question: str) -> int:
    """The answer of a generated word problem, worked out from its words."""
    a, b = (int(n) for n in re.findall(r"\d+", question))
    for op, templates in TEMPLATES.items():
        for t in templates:
            pattern = re.escape(t).replace(r"\{a\}", r"\d+").replace(r"\{b\}", r"\d+")
            pattern = re.sub(r"\\\{[nt]\\\}", r"\\w+", pattern)
            if re.fullmatch(pattern, question):
                return {"+": a + b, "-": a - b, "*": a * b}[op]
    raise AssertionError(question)


def test_arithmetic_problems_are_right_and_the_held_out_split_is_disjoint():
    import random

    task = ArithmeticTask(max_operand=30, ops="+-*", seed=3)
    train = task.train(300, random.Random(0))
    heldout = task.heldout(50)
    for p in train + heldout:
        assert int(p.answer) == _solve(p.question) >= 0
    assert not {p.question for p in train} & {p.question for p in heldout}
    assert [p.question for p in task.heldout(50)] == [p.question for p in heldout]  # fixed
    assert {p.question[:3] for p in train} > {"Ada"}  # varied
    with pytest.raises(ConfigError):
        ArithmeticTask(ops="/")


def test_final_number_and_format_rewards():
    completions = ["3 + 4 = 7. #### 7", "#### 1,234", "the answer is 12 and then 13", "#### 7 apples", "no number",
                   "7.0", "####8"]
    gold = ["7", "1234", "12", "7", "1", "7", "8"]
    assert correct_reward(["q"] * 7, completions, answer=gold) == [
        float(final_number(c) == g) for c, g in zip(completions, gold)] == [1, 1, 0, 1, 0, 1, 1]
    assert format_reward(["q"] * 7, completions) == [1, 1, 0, 0, 0, 0, 1]


def test_user_reward_function_by_path(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text("def short(prompts, completions, **kwargs):\n"
                    "    return [1.0 / (1 + len(c)) for c in completions]\n"
                    "def bad(prompts, completions, **kwargs):\n    return [1.0]\n")
    fn = load_reward_function(f"{path}:short")
    assert call_reward(fn, ["p", "p"], ["ab", ""], ["1", "2"]) == [1 / 3, 1.0]
    with pytest.raises(DataError, match="returned 1 rewards for 2"):
        call_reward(load_reward_function(f"{path}:bad"), ["p", "p"], ["a", "b"], ["1", "2"])
    with pytest.raises(ConfigError, match="no function"):
        load_reward_function(f"{path}:nothing")
    with pytest.raises(NotFound):
        load_reward_function(f"{tmp_path}/none.py:short")
    with pytest.raises(ConfigError, match="FILE.py:FUNCTION"):
        load_reward_function("just_a_name")


def test_gsm8k_file_split_and_bad_rows_name_file_and_row(tmp_path):
    rows = [{"question": f"What is {i} plus 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(40)]
    path = tmp_path / "gsm.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = GSM8KTask(path, val_fraction=0.2)
    assert len(task.train_set) + len(task.val_set) == 40 and task.val_set
    assert not {p.question for p in task.train_set} & {p.question for p in task.val_set}
    assert task.train_set[0].answer == final_number(rows[[r["question"] for r in rows].index(
        task.train_set[0].question)]["answer"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + '{"question": "q", "answer": "no number"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: .*final number"):
        GSM8KTask(bad)
    bad.write_text(json.dumps(rows[0]) + "\n\n{oops\n")
    with pytest.raises(DataError, match=r"bad.jsonl:3: not valid JSON"):
        GSM8KTask(bad)


# ----------------------------------------------------------------------------------------
# Families and the command line
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["gpt-tiny", "llama-tiny"])
def test_cli_runs_on_every_family(tmp_path, preset, capsys):
    base = model_dir(tmp_path / "base", preset=preset)
    code = main(["posttrain", "grpo", str(base), "--task", "arithmetic", "--out", str(tmp_path / "out"),
                 "--max-steps", "2", "--batch-size", "2", "--group-size", "2", "--max-new-tokens", "3",
                 "--eval-prompts", "4", "--beta", "0.1", "--num-iterations", "2", "--no-progress", "--no-plot"])
    assert code == 0
    assert "done at step 2" in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    for key in ("reward", "accuracy", "completion_length", "kl", "clip_fraction", "sample_time_s",
                "update_time_s"):
        assert key in train[-1], key
    assert "val_accuracy" in [r for r in rows if r["kind"] == "eval"][-1]
    assert load_model(tmp_path / "out" / "latest")[0].config.vocab_size == load_model(base)[0].config.vocab_size


def test_cli_gsm8k_file_user_reward_and_chat_template(tmp_path):
    """A local GSM8K file, a reward function by path, a chat model's format (chatml: the
    answer ends with <|im_end|>, which is the completion's last token and trained)."""
    tok = CharTokenizer.train(LETTERS, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    torch.manual_seed(0)
    save_model(tmp_path / "chat", Transformer(ModelConfig.preset("llama-tiny", vocab_size=tok.vocab_size,
                                                                 context_length=160)), tok)
    rows = [{"question": f"What is {i} plus 1?", "answer": f"{i} + 1 = {i + 1}. #### {i + 1}"} for i in range(30)]
    data = tmp_path / "gsm.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "mine.py").write_text("def short(prompts, completions, **kw):\n"
                                      "    return [-len(c) / 10 for c in completions]\n")
    cfg = GRPOConfig(model=str(tmp_path / "chat"), data=str(data), template="chatml",
                     reward=f"{tmp_path / 'mine.py'}:short", max_steps=1,
                     **run_options(tmp_path, "g", max_new_tokens=6, task="gsm8k"))
    task = GRPOTask(cfg, quiet=True)
    task.setup(local_run(cfg, tmp_path))
    assert task.prompt_text("Q?").startswith("<|im_start|>user\nQ?")
    assert task.stop_ids[0] == tok.special_tokens["<|im_end|>"]
    model = task.model(None)
    batch = task.micro_batch(0, 0, 0, 1, model)
    ids, mask = batch["ids"], batch["mask"]
    for row in range(len(ids)):
        targets = ids[row, 1:][mask[row] == 1].tolist()
        if tok.special_tokens["<|im_end|>"] in targets:  # a completion that ended on the end of turn
            assert targets[-1] == tok.special_tokens["<|im_end|>"]
    code = main(["posttrain", "grpo", str(tmp_path / "chat"), "--task", "gsm8k", "--data", str(data), "--template",
                 "chatml", "--reward", f"{tmp_path / 'mine.py'}:short", "--out", str(tmp_path / "out"),
                 "--max-steps", "1", "--batch-size", "2", "--group-size", "2", "--max-new-tokens", "4",
                 "--eval-prompts", "2", "--no-progress", "--no-plot"])
    assert code == 0
    assert json.loads((tmp_path / "out" / "latest" / "prompt_format.json").read_text())["template"] == "chatml"


@pytest.mark.parametrize("argv, message", [
    (["--task", "gsm8k"], "needs --data"),
    (["--task", "gsm8k", "--data", "missing.jsonl"], "not found"),
    (["--group-size", "1"], "group_size must be >= 2"),
    (["--reward", "nofile.py:f"], "not found"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    base = model_dir(tmp_path / "base")
    code = main(["posttrain", "grpo", str(base), "--out", str(tmp_path / "out"), "--max-steps", "1", *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_ctrl_c_saves_and_the_run_resumes_exactly(tmp_path):
    import os
    import signal

    class Interrupted(GRPOTask):
        def micro_batch(self, step, micro, rank, world, model):
            if step == 1:
                os.kill(os.getpid(), signal.SIGINT)  # as if the user pressed Ctrl-C during step 2
            return super().micro_batch(step, micro, rank, world, model)

    base = model_dir(tmp_path / "base")
    common = dict(max_steps=3, **run_options(tmp_path, "x"))
    straight = grpo(GRPOConfig(model=str(base), **{**common, "out_dir": str(tmp_path / "straight")}), quiet=True)
    cfg = GRPOConfig(model=str(base), **{**common, "out_dir": str(tmp_path / "cut")})
    first = Trainer(cfg, Interrupted(cfg, quiet=True), quiet=True).run()
    assert first.interrupted and first.step == 2
    second = grpo(cfg.replace(resume=True), quiet=True)
    assert first.losses + second.losses == straight.losses
