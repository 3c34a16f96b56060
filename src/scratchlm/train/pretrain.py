"""Pretraining as a task of the core: next-token prediction on token shards.

    x, y = windows of the shards (B, T), (B, T)    y is x shifted left by one token
    loss = model(x, targets=y)                      mean over B*T positions of -log p(y_t | x_<=t):
                                                    cross_entropy(logits (B, T, vocab), y) (loss.py)

A mixture-of-experts model gets ``router_aux_loss_coef * load_balancing_loss`` added to the
training loss by the core (core.py, as in every task), logged as ``moe_aux_loss`` with the
routers' balance (moe.router_stats) and the cross-entropy alone (``task_loss``).

Evaluation: the mean loss over fixed validation windows, perplexity exp(loss), and bits per
byte = loss / ln 2 * tokens per byte (comparable across tokenizers); a sampled
continuation. A run directory (``out_dir``) holds ``metrics.jsonl``, ``loss.png``,
``train_config.json`` and two model directories (checkpoint.py): ``latest/`` (with
``train_state.pt``, what ``--resume`` continues from) and ``best/`` (lowest validation loss).

>>> cfg = TrainConfig.from_dict({"batch_size": 8, "lr": 3e-4})
>>> cfg.batch_size, cfg.lr, cfg.grad_accum, cfg.max_steps
(8, 0.0003, 1, 2000)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ..checkpoint import load_config, load_model, save_model
from ..config import ModelConfig
from ..errors import ConfigError, DataError
from ..model import Transformer
from .config import LoopConfig, need, option, positive_ints
from .core import Task, Trainer, TrainResult
from .distributed import all_reduce_values, process_group
from .memory import check_fits
from .task import EvalHook


@dataclass
class PretrainConfig(LoopConfig):
    """`scratchlm train`: the loop's fields (config.py) and these."""

    command = "scratchlm train"

    # data
    data: str = option("data/prepared", "folder written by `scratchlm prepare` (shards, meta.json, tokenizer)")
    sampler: Literal["random", "sliding"] = option("random", "'random' windows (large corpora) or 'sliding' "
                                                   "windows shuffled per epoch")
    stride: int | None = option(None, "step between sliding windows (default: context_length)")
    # model
    model: str = option("gpt-small-cpu", "ModelConfig preset to start from (vocab_size comes from the data)")
    context_length: int | None = option(None, "tokens per training window (default: the preset's)")
    d_model: int | None = option(None, "width of the residual stream (default: the preset's)")
    n_layers: int | None = option(None, "number of Transformer blocks (default: the preset's)")
    n_heads: int | None = option(None, "attention heads (default: the preset's)")
    n_kv_heads: int | None = option(None, "key/value heads, for grouped-query attention (default: the preset's)")
    d_ff: int | None = option(None, "hidden width of the MLP (default: the preset's)")
    dropout: float = option(0.0, "dropout probability (0 for short runs on lots of data)")
    model_config: dict | None = option(None, "any other ModelConfig fields, as a mapping (JSON on the command line)")
    # how long (the loop's defaults for pretraining)
    max_steps: int | None = option(2000)
    # evaluation
    eval_batches: int = option(20, "validation batches per evaluation")
    sample_prompt: str = option("", "prompt of the sample printed at each evaluation ('' = start of a document)")
    sample_tokens: int = option(64, "tokens to generate for each sample (0: no samples)")

    def validate(self) -> None:
        super().validate()
        positive_ints(self, "eval_batches", "stride")
        need(0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}")
        need(self.sample_tokens >= 0, f"sample_tokens must be >= 0, got {self.sample_tokens}")


TrainConfig = PretrainConfig  # the name the rest of scratchlm (and its users) know

MODEL_KEYS = ("context_length", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff")


def model_config_for(cfg: PretrainConfig, vocab_size: int) -> ModelConfig:
    """The preset, with the fields the training config sets, and the data's vocab_size."""
    base = ModelConfig.preset(cfg.model).to_dict()
    changes = {k: getattr(cfg, k) for k in MODEL_KEYS if getattr(cfg, k) is not None}
    unknown = set(cfg.model_config or {}) - set(base)
    if unknown:
        raise ConfigError(f"model_config: unknown ModelConfig field(s): {', '.join(sorted(unknown))}")
    changes.update(cfg.model_config or {})
    # A changed width or head count would leave the preset's d_ff / n_kv_heads behind:
    # recompute them unless they were given too.
    if "d_model" in changes and "d_ff" not in changes:
        d = changes["d_model"]  # GELU MLP: 4 d; SwiGLU: Llama's 8/3 d rounded up to 64
        changes["d_ff"] = 64 * math.ceil(8 * d / 3 / 64) if base["mlp"] == "swiglu" else 4 * d
    if "n_heads" in changes and "n_kv_heads" not in changes:
        ratio = base["n_heads"] // base["n_kv_heads"]  # 1 for multi-head attention
        changes["n_kv_heads"] = changes["n_heads"] // ratio if changes["n_heads"] % ratio == 0 else changes["n_heads"]
    # Training keeps fp32 master weights (autocast does the bf16 math); vocab from the data.
    # replace() re-derives what follows the changed fields (head_dim, layer_types per layer).
    return ModelConfig.preset(cfg.model).replace(**{**changes, "vocab_size": vocab_size, "dropout": cfg.dropout,
                                                    "dtype": "float32"})


def _describe_difference(saved: ModelConfig, wanted: ModelConfig) -> str:
    a, b = saved.to_dict(), wanted.to_dict()
    diffs = [f"{k}={a[k]!r} in the checkpoint, {b[k]!r} now" for k in a if a[k] != b[k]]
    return "; ".join(diffs[:3])


class PretrainTask(Task):
    """Next-token prediction on the shards of ``cfg.data``."""

    def __init__(self, cfg: PretrainConfig):
        from ..data import load_meta
        from ..tokenizer import load_tokenizer

        self.cfg = cfg
        self.meta = load_meta(cfg.data)
        self.tokenizer = load_tokenizer(cfg.data)
        if self.tokenizer is not None and self.tokenizer.vocab_size != self.meta["vocab_size"]:
            raise DataError(f"{cfg.data}: meta.json says vocab_size {self.meta['vocab_size']:,} but the tokenizer "
                            f"there has {self.tokenizer.vocab_size:,} ids: the folder mixes two preparations "
                            "(run `scratchlm prepare` again)")
        self.model_config = model_config_for(cfg, self.meta["vocab_size"])
        val = self.meta["splits"]["val"]
        self.val_tokens_per_byte = val["tokens"] / max(1, val["bytes"])
        self.net: Transformer | None = None

    def setup(self, run) -> None:
        from ..batches import BatchSampler, eval_batches
        from ..data import load_split

        super().setup(run)
        cfg, T, procs = self.cfg, self.model_config.context_length, run.procs
        check_fits(self.model_config, cfg.batch_size, T, run.device)  # before a typo allocates
        self.batches = BatchSampler(load_split(cfg.data, "train"), T, cfg.batch_size, cfg.grad_accum,
                                    procs.world_size, cfg.sampler, cfg.stride, cfg.seed)
        self.val = eval_batches(load_split(cfg.data, "val"), T, cfg.batch_size, cfg.eval_batches,
                                procs.rank, procs.world_size)

    def model(self, resume_from: Path | None) -> Transformer:
        if resume_from is not None:
            saved = load_config(resume_from)
            if saved != self.model_config:
                raise ConfigError(f"--resume: the model config disagrees with {resume_from}: "
                                  f"{_describe_difference(saved, self.model_config)}")
            self.net, _ = load_model(resume_from, with_tokenizer=False)
        else:
            self.net = Transformer(self.model_config)
        self.title = f"{self.net.num_parameters() / 1e6:.1f}M parameters on {Path(self.cfg.data).name}"
        return self.net

    def batches_per_epoch(self) -> int:
        T = self.model_config.context_length
        return max(1, self.meta["splits"]["train"]["tokens"] // (T * self.cfg.batch_size))

    def micro_batch(self, step, micro, rank, world, model):
        return self.batches.micro_batch(step, micro, rank)

    def loss(self, model, batch):
        x, y = batch
        # The mean cross-entropy in fp32 whatever the autocast (log-softmax over a large
        # vocabulary needs it), the head and the loss in one step: no (B, T, vocab) logits (loss.py).
        loss = model(x, targets=y)
        return loss, {}, x.numel()  # a mixture of experts: the core adds its balancing loss

    def evaluate(self, model) -> dict[str, float]:
        """Mean loss over the fixed validation windows (this rank's share, summed over ranks)."""
        device = self.run.device
        total = torch.zeros((), device=device, dtype=torch.float64)
        count = 0
        for x, y in self.val:
            loss = model(x.to(device), targets=y.to(device))
            total += loss.double() * x.shape[0]
            count += x.shape[0]
        total, count = all_reduce_values([total.item(), count], device, self.run.procs)
        loss = total / max(1, count)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50)),
                "val_bpb": loss / math.log(2) * self.val_tokens_per_byte}

    def sample(self, model) -> str | None:
        return self.generate_sample(model)

    def generate_sample(self, model, max_new_tokens: int | None = None, prompt: str | None = None) -> str | None:
        """Prompt + a sampled continuation (temperature 0.8, top-k 40, fixed seed); the
        training RNG is left as it was."""
        n = self.cfg.sample_tokens if max_new_tokens is None else max_new_tokens
        if n <= 0 or self.tokenizer is None:
            return None
        from ..generate import generate
        from .core import eval_mode, rng_state, set_rng_state

        prompt = self.cfg.sample_prompt if prompt is None else prompt
        # As in training, a document starts after the end-of-text token.
        ids = [self.meta["eot_id"]] + (self.tokenizer.encode(prompt) if prompt else [])
        n = min(n, model.config.context_length - len(ids))
        if n <= 0:
            return None
        device = next(model.parameters()).device
        saved = rng_state(device)
        try:
            with eval_mode(model), self.run.autocast():
                [c] = generate(model, self.tokenizer, [ids], max_new_tokens=n, temperature=0.8, top_k=40,
                               seed=self.cfg.seed)
        finally:
            set_rng_state(saved, device)
        return prompt + c.text

    def describe(self, step, metrics, sample) -> str:
        return (f"step {step}: val loss {metrics['val_loss']:.4f}, ppl {metrics['val_ppl']:.2f}, "
                f"{metrics['val_bpb']:.3f} bits/byte")

    def save(self, directory, weights, extra) -> None:
        save_model(directory, self.net, self.tokenizer, extra=extra, state=weights)


def make_trainer(cfg: PretrainConfig, quiet: bool = False, eval_hook: EvalHook | None = None) -> Trainer:
    """The core's Trainer with the pretraining task (``trainer.task``); ``eval_hook`` scores
    ``cfg.eval_tasks`` (eval/train_hook.py builds one)."""
    return Trainer(cfg, PretrainTask(cfg), quiet=quiet, eval_hook=eval_hook)


def train(cfg: PretrainConfig, quiet: bool = False, eval_hook: EvalHook | None = None) -> TrainResult:
    """Train as ``cfg`` says; under torchrun every process calls this."""
    with process_group():
        return make_trainer(cfg, quiet=quiet, eval_hook=eval_hook).run()


__all__ = ["PretrainConfig", "TrainConfig", "PretrainTask", "model_config_for", "make_trainer", "train"]
