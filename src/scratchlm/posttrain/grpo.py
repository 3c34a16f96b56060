"""GRPO: reinforcement learning with verifiable rewards, one group of samples at a time.

    a batch of P prompts (rewards.py: arithmetic, GSM8K)
      -> G completions per prompt, sampled by the batched, cached generate (temperature, top-p)
      -> a reward per completion from the verifiers (right final number, answer format, yours)
      -> advantages: each reward minus its group's mean, over the group's std (no critic:
         the group is the baseline)
      -> num_iterations policy updates on the clipped ratio objective, old log-probs recorded
         at sampling time, an optional KL term to a reference model
      -> OUT/latest, OUT/best (by held-out accuracy): model dirs or LoRA adapter dirs

The objective, per completion token t of completion i (TRL's GRPOTrainer, `_compute_loss`):

    ratio_t = exp(logp_t - old_logp_t)
    loss_t  = -min(ratio_t * A_i, clip(ratio_t, 1 - eps_low, 1 + eps_high) * A_i) + beta * kl_t
    kl_t    = exp(ref_logp_t - logp_t) - (ref_logp_t - logp_t) - 1           (k3 estimator, >= 0)

and ``loss_type`` says how the token losses are averaged: "grpo" per completion, then over
completions (long answers weigh less per token); "bnpo" over the micro-batch's tokens;
"dr_grpo" over rows * max_new_tokens (a constant: no length bias); "dapo" over every
completion token of the optimizer step.

>>> rewards = torch.tensor([1.0, 0.0, 0.0, 0.0,   1.0, 1.0, 1.0, 1.0])   # two groups of 4
>>> group_advantages(rewards, 4)            # the lone right answer stands out; a uniform group teaches nothing
tensor([ 1.4997, -0.4999, -0.4999, -0.4999,  0.0000,  0.0000,  0.0000,  0.0000])
"""

from __future__ import annotations

import copy
import json
import random
import time
from pathlib import Path

import torch

from ..chat import chat_stops, read_prompt_format, render_chat, resolve_template
from ..errors import ConfigError
from ..finetune.instruct import load_base, save_tuned, tuned_model
from ..lora import adapters_disabled, count_parameters
from ..shared_prompt import can_share, continuation_logprobs
from ..train.core import Task, Trainer, TrainResult, eval_mode
from ..train.distributed import is_main_process, process_group
from .grpo_config import GRPOConfig
from .rewards import ArithmeticTask, GSM8KTask, call_reward, correct_reward, format_reward, load_reward_function

# How a raw (not chat) prompt asks for the answer; a chat prompt says the same in the user turn.
RAW_PROMPT = "Question: {question}\nAnswer:"
INSTRUCTION = "{question}\nEnd your answer with '#### ' and the number."
RAW_STOPS = ["\nQuestion:", "\n\n"]


# ----------------------------------------------------------------------------------------
# The pieces of the objective (pure functions of tensors: the tests compare them with TRL)
# ----------------------------------------------------------------------------------------
def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group") -> torch.Tensor:
    """rewards (N,), N = prompts * group_size, the groups contiguous -> advantages (N,).

    A_i = r_i - mean(group), divided by std(group) + 1e-4 ("group"), by the std of the
    whole batch ("batch"), or not at all ("none", Dr. GRPO). std is the unbiased one, as TRL's."""
    grouped = rewards.view(-1, group_size)  # (P, G)
    mean = grouped.mean(dim=1).repeat_interleave(group_size)  # (N,)
    advantages = rewards - mean
    if scale == "group":
        advantages = advantages / (grouped.std(dim=1).repeat_interleave(group_size) + 1e-4)
    elif scale == "batch":
        advantages = advantages / (rewards.std() + 1e-4)
    elif scale != "none":
        raise ConfigError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale!r}")
    return advantages


def token_logprobs(model: torch.nn.Module, ids: torch.Tensor, temperature: float = 1.0,
                   starts: list[int] | None = None, ends: list[int] | None = None) -> torch.Tensor:
    """ids (N, L) -> log-probabilities (N, L - 1) of ids[:, 1:] under ``model``, its logits
    divided by ``temperature`` (the distribution the completions were sampled from). Rows are
    right-padded: under causal attention a real token never sees the padding after it.

    With ``starts`` and ``ends`` (row i: prompt ids[i, :starts[i]], completion up to ends[i])
    the log-probs are those of the completions only (shared_prompt.py: each distinct prompt
    runs once for its whole group), equal to these at the completion targets and 0 before."""
    if starts is not None and can_share(model, ids, starts, ends):
        return continuation_logprobs(model, ids, starts, ends, temperature)
    logits = model(ids)[:, :-1].float() / temperature  # (N, L - 1, V), in float32
    targets = ids[:, 1:]
    return logits.gather(-1, targets[..., None]).squeeze(-1) - logits.logsumexp(-1)


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor | None, ref_logps: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, *, epsilon_low: float = 0.2, epsilon_high: float = 0.2,
              beta: float = 0.0, kl_correction: bool = True, loss_type: str = "dapo",
              max_completion_length: int | None = None, num_items: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped policy-ratio objective; see the module docstring.

    logps, old_logps, ref_logps, mask: (N, T), mask 1 on completion tokens (0 on prompt and
    padding: they never count); advantages (N,). old_logps None: the samples are fresh from
    this very policy (one update per batch), the ratio is 1 and only its gradient matters.
    ``kl_correction``: the KL term times the ratio, so that its gradient is the unbiased
    reverse-KL gradient (DeepSeek-V3.2; TRL's use_bias_correction_kl, on by default there).
    ``max_completion_length``: dr_grpo's constant. ``num_items``: dapo's token count (the
    completion tokens of the whole step, divided by the micro-batches the core averages).
    Returns (loss, metrics): kl, clip fractions (low, high, region), all token means."""
    mask = mask.to(logps.dtype)
    old_logps = logps.detach() if old_logps is None else old_logps
    ratio = torch.exp(logps - old_logps)  # (N, T)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    A = advantages[:, None]  # (N, 1)
    per_token = -torch.min(ratio * A, clipped * A)
    kl = None
    if beta != 0.0:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1  # (N, T)
        if kl_correction:  # the samples came from the old policy: weigh by the ratio (unbiased gradient)
            kl = kl * ratio
        per_token = per_token + beta * kl
    tokens = mask.sum().clamp(min=1.0)
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / tokens
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (per_token.size(0) * max_completion_length)
    elif loss_type == "dapo":
        loss = (per_token * mask).sum() / (num_items if num_items is not None else tokens)
    else:
        raise ConfigError(f"loss_type must be grpo, bnpo, dr_grpo or dapo, got {loss_type!r}")
    ratio = ratio.detach()
    low = ((ratio < 1 - epsilon_low) & (A < 0)).to(mask.dtype)  # clipping took the gradient away
    high = ((ratio > 1 + epsilon_high) & (A > 0)).to(mask.dtype)
    metrics = {"clip_low": (low * mask).sum() / tokens, "clip_high": (high * mask).sum() / tokens,
               "clip_fraction": (((low + high) > 0).to(mask.dtype) * mask).sum() / tokens}
    if kl is not None:
        metrics["kl"] = (kl.detach() * mask).sum() / tokens
    return loss, metrics


# ----------------------------------------------------------------------------------------
# Rollouts: prompts -> groups of completions -> rewards -> one tensor batch
# ----------------------------------------------------------------------------------------
def pad_rows(rows: list[list[int]], starts: list[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt + completion rows -> ids (N, L) right-padded, mask (N, L - 1) over the targets
    ids[:, 1:]: 1 where the target is a completion token (row i's from ``starts[i]`` on)."""
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), L - 1)
    for i, (row, start) in enumerate(zip(rows, starts, strict=True)):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, start - 1:len(row) - 1] = 1.0  # target j is ids[j + 1]
    return ids, mask


def batched_logprobs(model, ids: torch.Tensor, temperature: float, rows: int, starts: list[int],
                     ends: list[int]) -> torch.Tensor:
    """token_logprobs of the completions without gradients, ``rows`` at a time."""
    with eval_mode(model):
        return torch.cat([token_logprobs(model, ids[i:i + rows], temperature, starts[i:i + rows], ends[i:i + rows])
                          for i in range(0, len(ids), rows)])


class GRPOTask(Task):
    """GRPO as a task of the training core (train/core.py)."""

    title = "GRPO"
    best_metric = "val_accuracy"
    best_mode = "max"

    def __init__(self, cfg: GRPOConfig, quiet: bool = False):
        self.cfg, self.quiet = cfg, quiet
        torch.manual_seed(cfg.seed)  # a preset name builds random weights
        self.base, self.tokenizer = load_base(cfg.model)
        if cfg.task == "arithmetic":
            self.problems = ArithmeticTask(cfg.max_operand, cfg.ops, cfg.seed, cfg.val_fraction)
        else:
            self.problems = GSM8KTask(cfg.data, cfg.val_data, cfg.val_fraction, cfg.seed)
        self.heldout = self.problems.heldout(cfg.eval_prompts)
        self.rewards = [(correct_reward, cfg.correct_weight), (format_reward, cfg.format_weight)]
        if cfg.reward:
            self.rewards.append((load_reward_function(cfg.reward), cfg.reward_weight))
        self.rewards = [(fn, w) for fn, w in self.rewards if w != 0]
        model_dir = cfg.model if Path(cfg.model).is_dir() else None
        self.template = self._template(model_dir)
        eot = self.tokenizer.eot_id
        self.stop, self.stop_ids = (RAW_STOPS, [eot] if eot is not None else []) if self.template == "raw" \
            else chat_stops(self.template, self.tokenizer)
        self.pad_id = eot if eot is not None else 0
        self.lora = cfg.lora_config()
        self.buffer: dict | None = None  # the rollouts of the current generation (saved on checkpoints)
        self.times = {"sample_time_s": 0.0, "update_time_s": 0.0}  # totals, resumed with the run
        self._returned_at: float | None = None

    def _template(self, model_dir) -> str:
        if self.cfg.template != "auto":
            return self.cfg.template if self.cfg.template == "raw" else resolve_template(self.cfg.template,
                                                                                         self.tokenizer)
        own = (read_prompt_format(model_dir) if model_dir else None) or getattr(self.tokenizer, "chat_template", None)
        return resolve_template(None, self.tokenizer, model_dir) if own else "raw"

    def prompt_text(self, question: str) -> str:
        if self.template == "raw":
            return RAW_PROMPT.format(question=question)
        return render_chat([{"role": "user", "content": INSTRUCTION.format(question=question)}], self.template,
                           self.tokenizer)

    # ---- the model and its reference --------------------------------------------------------
    def setup(self, run) -> None:
        super().setup(run)
        if run.sharded:
            raise ConfigError("GRPO samples from the whole model: use --distributed ddp")

    def model(self, resume_from: Path | None) -> torch.nn.Module:
        # The reference: with LoRA the same model under adapters_disabled, else (with a KL term) a
        # frozen copy of the starting weights.
        self.ref = None
        if self.lora is None and self.cfg.beta != 0.0:
            self.ref = copy.deepcopy(self.base).requires_grad_(False).eval().to(self.run.device)
        self.net = tuned_model(self.base, self.lora, resume_from)
        trainable, total = count_parameters(self.net)
        if not self.quiet and is_main_process():
            print(f"GRPO on {self.problems.name}: {self.cfg.batch_size} prompts x {self.cfg.group_size} completions "
                  f"per step, {len(self.heldout)} held-out problems; template {self.template}; training "
                  f"{trainable:,} of {total:,} parameters")
        return self.net

    def ref_logprobs(self, ids: torch.Tensor, rows: int, starts: list[int], ends: list[int]) -> torch.Tensor:
        if self.ref is not None:
            return batched_logprobs(self.ref, ids, self.cfg.temperature, rows, starts, ends)
        with adapters_disabled(self.net):
            return batched_logprobs(self.net, ids, self.cfg.temperature, rows, starts, ends)

    # ---- sampling -------------------------------------------------------------------------------
    def complete(self, model, questions: list[str], temperature: float, generator=None):
        """Completions of ``questions``: (prompt ids, completion ids with the stop id that ended
        it, texts), sampled by the batched cached generate."""
        from ..generate import encode_prompts, generate

        texts = [self.prompt_text(q) for q in questions]
        prompts = encode_prompts(self.tokenizer, texts, model.config.vocab_size)
        room = model.config.context_length - self.cfg.max_new_tokens
        prompts = [p[-room:] for p in prompts]  # a prompt too long for the context loses its start
        top_p = self.cfg.top_p if temperature > 0 and self.cfg.top_p < 1 else None
        with eval_mode(model):
            out = generate(model, self.tokenizer, prompts, max_new_tokens=self.cfg.max_new_tokens,
                           temperature=temperature, top_p=top_p, generator=generator, stop=self.stop or None,
                           stop_token_ids=self.stop_ids)
        completions = []
        for c in out:
            ids = list(c.token_ids)
            # A row that ended on a stop id: the id is part of the answer (the policy learns to stop).
            # generate() does not say which stop id it was; with several (a chat format's end of turn
            # and end of text) the first, the format's end of turn, stands for it.
            if c.completion_tokens > len(ids) and self.stop_ids:
                ids.append(self.stop_ids[0])
            completions.append(ids)
        return prompts, completions, [c.text for c in out], [c.finish_reason for c in out]

    def score(self, questions: list[str], texts: list[str], answers: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(total reward (N,), correct (N,)) of completions ``texts``."""
        prompts = [self.prompt_text(q) for q in questions]
        total = torch.zeros(len(texts))
        correct = None
        for fn, weight in self.rewards:
            values = torch.tensor(call_reward(fn, prompts, texts, answers))
            total += weight * values
            if fn is correct_reward:
                correct = values
        if correct is None:
            correct = torch.tensor(correct_reward(prompts, texts, answers))
        return total, correct

    def rollout(self, model, generation: int, rank: int) -> dict:
        """Sample, score and record one generation: the batch of the next num_iterations steps."""
        cfg, G = self.cfg, self.cfg.group_size
        start = time.perf_counter()
        rng = random.Random(f"{cfg.seed}-{generation}-{rank}")  # a function of the data position
        problems = self.problems.train(cfg.batch_size, rng)
        questions = [p.question for p in problems for _ in range(G)]  # (N,), each group contiguous
        answers = [p.answer for p in problems for _ in range(G)]
        device = self.run.device
        generator = torch.Generator(device=device).manual_seed((cfg.seed * 1_000_003 + generation) * 1009 + rank)
        prompts, completions, texts, reasons = self.complete(model, questions, cfg.temperature, generator)
        rewards, correct = self.score(questions, texts, answers)
        advantages = group_advantages(rewards, G, cfg.scale_rewards)
        starts, ends = [len(p) for p in prompts], [len(p) + len(c) for p, c in zip(prompts, completions)]
        ids, mask = pad_rows([p + c for p, c in zip(prompts, completions)], starts, self.pad_id)
        truncated = torch.tensor([r == "length" for r in reasons], dtype=torch.float32)
        if cfg.mask_truncated:
            mask = mask * (1 - truncated)[:, None]
        ids, mask = ids.to(device), mask.to(device)
        rows = len(ids) // cfg.grad_accum
        buffer = {"generation": generation, "ids": ids.cpu(), "mask": mask.cpu(), "advantages": advantages,
                  "starts": starts, "ends": ends,
                  "stats": {"reward": rewards.mean().item(), "accuracy": correct.mean().item(),
                            "reward_std": rewards.view(-1, G).std(dim=1).mean().item(),
                            "completion_length": sum(len(c) for c in completions) / len(completions),
                            "truncated": truncated.mean().item()}}
        if cfg.num_iterations > 1:  # the sampling policy's log-probs, for the ratio of later updates
            buffer["old_logps"] = batched_logprobs(model, ids, cfg.temperature, rows, starts, ends).cpu()
        if cfg.beta != 0.0:
            buffer["ref_logps"] = self.ref_logprobs(ids, rows, starts, ends).cpu()
        self.times["sample_time_s"] += time.perf_counter() - start
        if self.run.procs.is_main and cfg.n_samples:
            with open(self.run.out_dir / "samples.jsonl", "a") as f:
                for i in range(min(cfg.n_samples, len(texts))):
                    f.write(json.dumps({"generation": generation, "question": questions[i], "answer": answers[i],
                                        "completion": texts[i], "reward": rewards[i].item()}) + "\n")
        return buffer

    # ---- the core's interface ---------------------------------------------------------------------
    def _count_update_time(self) -> None:
        """Time since the last batch went out: the core's loss, backward and optimizer step
        (counted at the next batch, evaluation or checkpoint, whichever comes first)."""
        if self._returned_at is not None:
            self.times["update_time_s"] += time.perf_counter() - self._returned_at
            self._returned_at = None

    def micro_batch(self, step, micro, rank, world, model):
        self._count_update_time()
        generation = step // self.cfg.num_iterations
        if self.buffer is None or self.buffer["generation"] != generation:
            self.buffer = self.rollout(model, generation, rank)
        b, A = self.buffer, self.cfg.grad_accum
        rows = len(b["ids"]) // A
        part = slice(micro * rows, (micro + 1) * rows)
        batch = {k: b[k][part] for k in ("ids", "mask", "advantages", "old_logps", "ref_logps", "starts", "ends")
                 if k in b}
        batch["num_items"] = b["mask"].sum().clamp(min=1.0) / A  # dapo: the step's tokens (the core divides by A)
        batch["stats"] = {k: torch.tensor(v) for k, v in {**b["stats"], **self.times}.items()}
        batch["tokens"] = int(batch["mask"].sum())  # on the CPU still: no device sync
        self._returned_at = time.perf_counter()
        return batch

    def loss(self, model, batch):
        cfg = self.cfg
        logps = token_logprobs(model, batch["ids"], cfg.temperature, batch.get("starts"), batch.get("ends"))
        loss, metrics = grpo_loss(logps, batch.get("old_logps"), batch.get("ref_logps"), batch["advantages"],
                                  batch["mask"], epsilon_low=cfg.epsilon, epsilon_high=cfg.epsilon_high,
                                  beta=cfg.beta, kl_correction=cfg.kl_correction, loss_type=cfg.loss_type,
                                  max_completion_length=cfg.max_new_tokens,
                                  num_items=batch["num_items"])
        return loss, {**metrics, **batch["stats"]}, batch["tokens"]

    def evaluate(self, model) -> dict[str, float]:
        """Greedy answers to the held-out problems: accuracy, mean reward, length."""
        self._count_update_time()
        questions = [p.question for p in self.heldout]
        answers = [p.answer for p in self.heldout]
        texts, lengths = [], []
        for i in range(0, len(questions), 64):
            _, completions, t, _ = self.complete(model, questions[i:i + 64], temperature=0.0)
            texts += t
            lengths += [len(c) for c in completions]
        rewards, correct = self.score(questions, texts, answers)
        self.last_eval = list(zip(questions, texts))
        return {"val_accuracy": correct.mean().item(), "val_reward": rewards.mean().item(),
                "val_completion_length": sum(lengths) / len(lengths)}

    def sample(self, model) -> list[str]:
        return [f"{q[:50]!r} -> {t!r}" for q, t in getattr(self, "last_eval", [])[:2]]

    def save(self, directory, weights, extra) -> None:
        save_tuned(directory, self.net, self.tokenizer, self.template, self.lora, str(self.cfg.model), weights, extra)

    def state_dict(self) -> dict:
        self._count_update_time()
        return {"buffer": self.buffer, "times": dict(self.times)}

    def load_state_dict(self, state: dict) -> None:
        self.buffer = state.get("buffer")
        self.times.update(state.get("times", {}))


def grpo(cfg: GRPOConfig, quiet: bool = False) -> TrainResult:
    """Run `scratchlm posttrain grpo` as ``cfg`` says."""
    with process_group():
        return Trainer(cfg, GRPOTask(cfg, quiet), quiet=quiet).run()


__all__ = ["grpo", "GRPOTask", "GRPOConfig", "group_advantages", "token_logprobs", "grpo_loss",
           "pad_rows"]
