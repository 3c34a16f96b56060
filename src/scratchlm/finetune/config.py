"""The settings of `scratchlm finetune instruct|classify`: the training core's LoopConfig
with fine-tuning's defaults, the starting model, the data and LoRA.

>>> cfg = InstructConfig(model="base", data="d.jsonl")
>>> cfg.lr, cfg.epochs, cfg.batch_size, cfg.out_dir
(0.0001, 3.0, 8, 'runs/instruct')
>>> InstructConfig(model="base", data="d.jsonl", lora=True).lr   # adapters learn with a larger rate
0.001
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal

from ..train.config import LoopConfig, need, option


@dataclass
class FinetuneConfig(LoopConfig):
    """What instruction tuning and classification share."""

    default_lr: typing.ClassVar[float] = 1e-4

    model: str = option("", "model directory (or Hugging Face directory / hub id, or preset) to start from",
                        positional=True)
    data: str = option("", "training data file")
    val_data: str | None = option(None, "validation file (default: --val-fraction of --data)")
    val_fraction: float = option(0.1, "share of --data held out for validation, without --val-data")
    # the loop, with fine-tuning's defaults
    out_dir: str = option("runs/finetune")
    epochs: float | None = option(3.0, "passes over the training set (max_steps wins when set)")
    batch_size: int = option(8, "examples per micro-batch, per process")
    lr: float | None = option(None, "peak learning rate (default 1e-4 for instructions, 5e-4 for "
                                    "classification; 1e-3 with --lora)")
    min_lr: float = option(0.0)
    warmup_steps: int = option(10)
    weight_decay: float = option(0.0)
    beta2: float = option(0.999)
    precision: Literal["auto", "bf16", "fp32"] = option("fp32")
    eval_every: int = option(50, "validate (and print samples) every N steps")
    log_every: int = option(1)
    save_every: int = option(200)
    seed: int = option(0)
    # LoRA
    lora: bool = option(False, "train LoRA adapters instead of the weights")
    lora_rank: int = option(8, "rank of each adapter")
    lora_alpha: float = option(16.0, "adapter scale: the update is alpha / rank * B A")
    lora_dropout: float = option(0.0, "dropout on the adapters' input")
    lora_targets: str = option("qkv_proj,out_proj", "comma-separated layers: qkv_proj, out_proj, gate_proj, "
                               "up_proj, down_proj, lm_head (or full names / glob patterns like 'blocks.11.*')")

    def validate(self) -> None:
        if self.lr is None:
            self.lr = 1e-3 if self.lora else self.default_lr
        self.min_lr = min(self.min_lr, self.lr)
        super().validate()
        need(bool(self.model), "give the model to start from (a model directory, a Hugging Face id or a preset)")
        need(bool(self.data), "give the training data (--data FILE)")
        need(0 <= self.val_fraction < 1, f"val_fraction must be in [0, 1), got {self.val_fraction}")

    def lora_config(self):
        """The LoRAConfig these options describe, or None without --lora."""
        if not self.lora:
            return None
        from ..lora import LoRAConfig

        return LoRAConfig(rank=self.lora_rank, alpha=self.lora_alpha, dropout=self.lora_dropout,
                          targets=self.lora_targets, base_model=self.model)


@dataclass
class InstructConfig(FinetuneConfig):
    """`scratchlm finetune instruct`."""

    command = "scratchlm finetune instruct"

    data: str = option("", "instruction file (.json array or .jsonl): alpaca records or chats")
    out_dir: str = option("runs/instruct")
    template: Literal["auto", "alpaca", "llama3", "qwen3", "chatml", "qwen", "gemma", "olmo2", "plain"] = option(
        "auto", "prompt format (auto: the model's recorded or chat template, else alpaca)")
    train_on_prompt: bool = option(False, "also put the prompt tokens in the loss")
    packing: bool = option(False, "pack several examples per row (less padding)")
    n_samples: int = option(2, "validation prompts answered at each evaluation", aliases=("--samples",))
    sample_tokens: int = option(64, "tokens of each sample answer")
    merge: bool = option(False, "with --lora: also write OUT/merged, adapters folded in")

    def validate(self) -> None:
        super().validate()
        need(self.n_samples >= 0 and self.sample_tokens >= 0, "samples and sample_tokens must be >= 0")


@dataclass
class ClassifyConfig(FinetuneConfig):
    """`scratchlm finetune classify`."""

    command = "scratchlm finetune classify"
    default_lr: typing.ClassVar[float] = 5e-4

    data: str = option("", "CSV file with a header (see --text-column, --label-column)")
    out_dir: str = option("runs/classify")
    test_data: str | None = option(None, "test file (default: --test-fraction of --data)")
    val_fraction: float = option(0.1, "share of --data for validation, without --val-data/--test-data")
    test_fraction: float = option(0.1, "share of --data for the test, without --val-data/--test-data")
    text_column: str = option("text", "CSV column of the texts")
    label_column: str = option("label", "CSV column of the labels")
    labels: str | None = option(None, "comma-separated label set (default: the labels of --data)")
    train: str = option("head", "what trains: 'head', N (head + last N blocks), 'all' (ignored with --lora)")

    def validate(self) -> None:
        super().validate()
        need(self.train in ("head", "all") or self.train.isdigit(),
             f"--train must be 'head', 'all' or a number of blocks, got {self.train!r}")
        need(0 <= self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1,
             f"val_fraction + test_fraction must be < 1, got {self.val_fraction} + {self.test_fraction}")

    @property
    def trainable(self) -> str | int:
        return int(self.train) if self.train.isdigit() else self.train

    @property
    def label_set(self) -> list[str] | None:
        return [x.strip() for x in self.labels.split(",") if x.strip()] if self.labels else None


__all__ = ["FinetuneConfig", "InstructConfig", "ClassifyConfig"]
