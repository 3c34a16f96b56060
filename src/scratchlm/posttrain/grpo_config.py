"""The settings of `scratchlm posttrain grpo`: the training core's LoopConfig with GRPO's
defaults, the task and its rewards, sampling, and the objective.

>>> cfg = GRPOConfig(model="gpt-tiny", max_steps=10)
>>> cfg.group_size, cfg.epsilon, cfg.epsilon_high, cfg.loss_type
(8, 0.2, 0.2, 'dapo')
>>> GRPOConfig(model="m", max_steps=1, group_size=1)
Traceback (most recent call last):
...
scratchlm.errors.ConfigError: group_size must be >= 2 (advantages compare completions within a group), got 1
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..train.config import LoopConfig, need, option


@dataclass
class GRPOConfig(LoopConfig):
    """`scratchlm posttrain grpo`."""

    command = "scratchlm posttrain grpo"

    model: str = option("", "model to start from (a model directory, a Hugging Face directory / id, a .gguf, "
                        "or a preset)", positional=True)
    # the task and its rewards
    task: Literal["arithmetic", "gsm8k"] = option("arithmetic", "verifiable task: 'arithmetic' (word problems "
                                                  "made on the fly) or 'gsm8k' (a local JSONL file: --data)")
    data: str | None = option(None, "gsm8k: the JSONL file of {question, answer: '... #### N'}")
    val_data: str | None = option(None, "gsm8k: held-out file (default: --val-fraction of --data)")
    val_fraction: float = option(0.1, "share of the problems held out for evaluation")
    max_operand: int = option(20, "arithmetic: the numbers go from 0 to this")
    ops: str = option("+-", "arithmetic: operations, some of '+-*'")
    reward: str | None = option(None, "a reward function of your own: FILE.py:FUNCTION, TRL's signature "
                                "f(prompts, completions, answer, **kw) -> list[float]")
    correct_weight: float = option(1.0, "weight of the correctness reward (the final number is right)")
    format_weight: float = option(0.1, "weight of the format reward (the answer ends with '#### N')")
    reward_weight: float = option(1.0, "weight of --reward")
    template: str = option("auto", "prompt format: 'auto' (the model's own, else raw 'Question: ...\\nAnswer:'), "
                           "'raw', or a built-in name (chatml, llama3, ...)")
    # sampling
    batch_size: int = option(8, "prompts per optimizer step (per process); each gets group_size completions")
    group_size: int = option(8, "completions per prompt, G (TRL's num_generations)")
    max_new_tokens: int = option(32, "the longest completion (TRL's max_completion_length)")
    temperature: float = option(1.0, "sampling temperature (the log-probabilities use the same)")
    top_p: float = option(1.0, "nucleus sampling: keep the smallest set of tokens with this much probability")
    # the objective
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = option(
        "dapo", "normalisation: 'grpo' (per sequence, then mean), 'bnpo' (per token of the micro-batch), "
                "'dr_grpo' (by rows * max_new_tokens), 'dapo' (per token of the whole step)")
    scale_rewards: Literal["group", "batch", "none"] = option(
        "group", "divide advantages by the std of the group's rewards, of the batch's, or not at all (Dr. GRPO)")
    epsilon: float = option(0.2, "clip the policy ratio below at 1 - epsilon")
    epsilon_high: float | None = option(None, "clip above at 1 + epsilon_high (default epsilon; DAPO: 0.28)")
    beta: float = option(0.0, "weight of the KL term to the reference model (0: no reference needed)")
    kl_correction: bool = option(True, "multiply the KL term by the policy ratio: its gradient is then the unbiased "
                                 "reverse-KL gradient (TRL's use_bias_correction_kl)")
    num_iterations: int = option(1, "policy updates per batch of samples (mu); old log-probs are recorded "
                                 "when it is above 1")
    mask_truncated: bool = option(False, "leave completions cut at max_new_tokens out of the loss")
    # evaluation and samples
    eval_prompts: int = option(64, "held-out problems answered (greedy) at each evaluation")
    n_samples: int = option(4, "completions written to OUT/samples.jsonl per sampling step")
    # the loop, with GRPO's defaults
    out_dir: str = option("runs/grpo")
    max_steps: int | None = option(200)
    lr: float | None = option(None, "peak learning rate (default 1e-5; 1e-4 with --lora)")
    min_lr: float = option(0.0)
    warmup_steps: int = option(0)
    weight_decay: float = option(0.0)
    beta2: float = option(0.99)
    precision: Literal["auto", "bf16", "fp32"] = option("fp32")
    eval_every: int = option(20)
    log_every: int = option(1)
    save_every: int = option(100)
    seed: int = option(0)
    # LoRA
    lora: bool = option(False, "train LoRA adapters; the reference is the same model with adapters off")
    lora_rank: int = option(8, "rank of each adapter")
    lora_alpha: float = option(16.0, "adapter scale: the update is alpha / rank * B A")
    lora_dropout: float = option(0.0, "dropout on the adapters' input")
    lora_targets: str = option("qkv_proj,out_proj", "comma-separated layers (qkv_proj, out_proj, gate_proj, "
                               "up_proj, down_proj, lm_head or glob patterns)")

    def validate(self) -> None:
        if self.lr is None:
            self.lr = 1e-4 if self.lora else 1e-5
        if self.epsilon_high is None:
            self.epsilon_high = self.epsilon
        self.min_lr = min(self.min_lr, self.lr)
        super().validate()
        need(bool(self.model), "give the model to start from (a model directory, a Hugging Face id or a preset)")
        need(self.group_size >= 2, "group_size must be >= 2 (advantages compare completions within a group), "
                                   f"got {self.group_size}")
        need(self.task != "gsm8k" or bool(self.data), "--task gsm8k needs --data FILE.jsonl")
        need(self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        need(self.temperature > 0, f"temperature must be > 0 (GRPO samples), got {self.temperature}")
        need(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        need(0 <= self.epsilon < 1 and self.epsilon_high >= 0, "epsilon must be in [0, 1) and epsilon_high >= 0")
        need(self.beta >= 0, f"beta must be >= 0, got {self.beta}")
        need(self.num_iterations >= 1, f"num_iterations must be >= 1, got {self.num_iterations}")
        need(0 < self.val_fraction < 1, f"val_fraction must be in (0, 1), got {self.val_fraction}")
        need(self.eval_prompts >= 1 and self.n_samples >= 0, "eval_prompts must be >= 1 and n_samples >= 0")
        need((self.batch_size * self.group_size) % self.grad_accum == 0,
             f"batch_size * group_size ({self.batch_size * self.group_size} completions) must split evenly "
             f"into grad_accum={self.grad_accum} micro-batches")

    def lora_config(self):
        """The LoRAConfig these options describe, or None without --lora."""
        if not self.lora:
            return None
        from ..lora import LoRAConfig

        return LoRAConfig(rank=self.lora_rank, alpha=self.lora_alpha, dropout=self.lora_dropout,
                          targets=self.lora_targets, base_model=self.model)


__all__ = ["GRPOConfig"]
