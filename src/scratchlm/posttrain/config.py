"""The settings of `scratchlm posttrain dpo`: fine-tuning's options (the model, the data,
LoRA, the training core's LoopConfig) plus the preference objective.

>>> cfg = DPOConfig(model="base", data="pairs.jsonl")
>>> cfg.loss, cfg.beta, cfg.lr, cfg.out_dir
('sigmoid', 0.1, 1e-06, 'runs/dpo')
>>> DPOConfig(model="base", data="pairs.jsonl", lora=True).lr     # adapters learn with a larger rate
5e-05
>>> DPOConfig(model="base", data="pairs.jsonl", loss="simpo").needs_reference
False
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal

from ..finetune.config import FinetuneConfig
from ..train.config import need, option

# The objectives (dpo.py): with a reference model, and without one.
REFERENCE_LOSSES = ("sigmoid", "robust", "hinge", "ipo")
REFERENCE_FREE_LOSSES = ("simpo",)
LossType = Literal["sigmoid", "robust", "hinge", "ipo", "simpo"]


@dataclass
class DPOConfig(FinetuneConfig):
    """`scratchlm posttrain dpo`."""

    command = "scratchlm posttrain dpo"
    default_lr: typing.ClassVar[float] = 1e-6

    data: str = option("", "preference pairs (JSONL: prompt, chosen, rejected; text or chat messages)")
    val_data: str | None = option(None, "held-out pairs (default: --val-fraction of --data)")
    out_dir: str = option("runs/dpo")
    epochs: float | None = option(1.0)
    batch_size: int = option(8, "pairs per micro-batch, per process (the model sees twice as many rows)")
    lr: float | None = option(None, "peak learning rate (default 1e-6; 5e-5 with --lora)")
    eval_every: int = option(50, "validate every N steps (val_reward_accuracy, val_loss, ...)")
    template: Literal["auto", "alpaca", "llama3", "qwen3", "chatml", "qwen", "gemma", "olmo2", "plain", "raw"] = option(
        "auto", "prompt format (auto: the model's recorded or chat template, else alpaca; raw: prompt and "
        "response text as they are, then the end-of-text token)")
    # the objective
    loss: LossType = option("sigmoid", "sigmoid (DPO), robust (DPO with flipped labels), hinge (SLiC), "
                            "ipo (IPO), simpo (SimPO: no reference model)")
    beta: float = option(0.1, "how far the policy may move from the reference (IPO: its tau; SimPO: the "
                         "reward scale)")
    label_smoothing: float = option(0.0, "probability that a pair's labels are flipped (conservative DPO for "
                                    "sigmoid and simpo; robust DPO for robust)")
    simpo_gamma: float = option(0.5, "SimPO's target margin, in units of beta")
    disable_dropout: bool = option(True, "train without dropout (the reference runs without it; as TRL)")
    precompute_ref: bool = option(False, "compute the reference log-probabilities once, up front (a full "
                                  "model then trains without a second copy in memory)")

    def validate(self) -> None:
        if self.lr is None:
            self.lr = 5e-5 if self.lora else self.default_lr
        super().validate()
        need(self.beta > 0, f"beta must be > 0, got {self.beta}")
        limit = 0.5 if self.loss == "robust" else 1.0
        need(0 <= self.label_smoothing < limit,
             f"label_smoothing must be in [0, {limit}) for the {self.loss} loss, got {self.label_smoothing}")

    @property
    def needs_reference(self) -> bool:
        return self.loss in REFERENCE_LOSSES


__all__ = ["DPOConfig", "REFERENCE_LOSSES", "REFERENCE_FREE_LOSSES"]
