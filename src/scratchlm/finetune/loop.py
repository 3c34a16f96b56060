"""The fine-tuning loop shared by instruction tuning and classification.

It is the pretraining loop (train.py) with the data and the loss handed in: the same
warmup + cosine schedule (``lr_at``), AdamW groups (``make_optimizer``), precision choice,
torchrun/DDP processes, Ctrl-C handling and atomic checkpoints, reused from train.py.
What differs is supplied by the task:

    batch(g)            the g-th micro-batch of the run (epochs of shuffled examples)
    loss(model, batch)  -> (mean loss, tokens in the batch)
    evaluate(model)     -> {"val_loss": ..., ...}
    save(dir, state)    writes a checkpoint (model dir or adapter dir, + train_state.pt)
    samples(model)      -> a few answers to print and log (optional)

One optimizer step reads ``grad_accum`` micro-batches per process; micro-batch number
``g = (step * grad_accum + micro) * world_size + rank``, so a resumed run continues with
exactly the batches it would have seen.

A run folder holds ``metrics.jsonl``, ``loss.png``, ``latest/`` (what ``--resume``
continues; the final result) and ``best/`` (lowest validation loss).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from ..train import all_reduce_values, StopFlag, autocast_dtype, init_processes, lr_at, make_optimizer


@dataclass
class LoopConfig:
    """Optimisation settings (the fields lr_at and make_optimizer read share train.py's names)."""

    out_dir: str = "runs/finetune"
    epochs: float = 3.0
    max_steps: Optional[int] = None  # overrides epochs
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    min_lr: float = 0.0
    warmup_steps: int = 10
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0
    eval_every: int = 50
    save_every: int = 200
    seed: int = 0
    resume: bool = False
    precision: str = "fp32"  # "auto" | "bf16" | "fp32"
    device: str = "auto"
    distributed: str = "ddp"  # fine-tuning supports DDP (FSDP: use train.py)
    progress: bool = True
    plot: bool = True

    def __post_init__(self):
        for name in ("batch_size", "grad_accum", "eval_every", "save_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.max_steps is None and not self.epochs > 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ValueError(f"need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclass
class LoopResult:
    step: int
    tokens: int
    val: dict = field(default_factory=dict)  # the last evaluation
    losses: list = field(default_factory=list)  # train loss of each step of this run
    interrupted: bool = False
    out_dir: Path = Path(".")


class Finetuner:
    """Runs the loop. ``n_batches`` is the number of micro-batches in one epoch."""

    def __init__(self, cfg: LoopConfig, model: torch.nn.Module, n_batches: int,
                 batch: Callable[[int], tuple], loss: Callable, evaluate: Callable[[torch.nn.Module], dict],
                 save: Callable[[Path, Optional[dict]], None], samples: Optional[Callable] = None,
                 state: Optional[dict] = None, quiet: bool = False):
        self.cfg, self.quiet = cfg, quiet
        self.procs, self.device = init_processes(cfg.device)
        self.autocast = autocast_dtype(cfg.precision, self.device)
        self.raw_model = model.to(self.device).train()
        self.model = self.raw_model
        if self.procs.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(model, device_ids=ids)
        if n_batches < 1:
            raise ValueError("no training batches: the training set is empty")
        steps_per_epoch = max(1, n_batches // (cfg.grad_accum * self.procs.world_size))
        if cfg.max_steps is None:
            cfg.max_steps = max(1, math.ceil(cfg.epochs * steps_per_epoch))
        self.steps_per_epoch = steps_per_epoch
        self.batch, self.loss_fn, self.evaluate_fn = batch, loss, evaluate
        self.save_fn, self.samples_fn = save, samples
        self.optimizer = make_optimizer(self.model, cfg, self.device)
        self.run_dir = Path(cfg.out_dir)
        self.step, self.tokens, self.best_val = 0, 0, math.inf
        if state is not None:  # resume: optimizer moments, counters and RNG as they were
            self.optimizer.load_state_dict(state["optimizer"])
            self.step, self.tokens = int(state["step"]), int(state["tokens"])
            self.best_val = float(state["best_val"])
            torch.set_rng_state(state["rng_cpu"])

    # ---- pieces ------------------------------------------------------------------------------
    def _autocast(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def train_step(self) -> tuple[float, int]:
        """One optimizer step over grad_accum micro-batches; (mean loss, tokens) of all ranks."""
        cfg, A, W = self.cfg, self.cfg.grad_accum, self.procs.world_size
        lr = lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total, tokens = 0.0, 0
        for micro in range(A):
            batch = self.batch((self.step * A + micro) * W + self.procs.rank)
            batch = tuple(t.to(self.device) for t in batch)
            last = micro == A - 1
            sync = contextlib.nullcontext() if (last or not self.procs.distributed) else self.model.no_sync()
            with sync:
                with self._autocast():
                    loss, n = self.loss_fn(self.model, batch)
                (loss / A).backward()
            total += loss.item()
            tokens += n
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.lr = lr
        total, tokens = all_reduce_values([total / A, float(tokens)], self.device, self.procs)
        self.tokens += int(tokens)
        return total / W, int(tokens)

    @torch.no_grad()
    def evaluate(self) -> dict:
        self.raw_model.eval()
        rng = torch.get_rng_state()  # sampling must not move the training RNG (exact resume)
        try:
            with self._autocast():
                metrics = self.evaluate_fn(self.raw_model)
                samples = self.samples_fn(self.raw_model) if (self.samples_fn and self.procs.is_main) else None
        finally:
            torch.set_rng_state(rng)
            self.raw_model.train()
        if samples:
            metrics["samples"] = samples
        return metrics

    def save(self, directory: Path, with_state: bool = True) -> None:
        if not self.procs.is_main:
            return
        state = None
        if with_state:
            state = {"step": self.step, "tokens": self.tokens, "best_val": self.best_val,
                     "optimizer": self.optimizer.state_dict(), "rng_cpu": torch.get_rng_state(),
                     "loop_config": json.dumps(asdict(self.cfg))}
        self.save_fn(directory, state)

    # ---- the loop ------------------------------------------------------------------------------
    def run(self) -> LoopResult:
        from tqdm.auto import tqdm

        cfg, main = self.cfg, self.procs.is_main
        metrics_path = self.run_dir / "metrics.jsonl"
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if not cfg.resume and metrics_path.exists():
                metrics_path.unlink()
        log = open(metrics_path, "a") if main else None
        result = LoopResult(self.step, self.tokens, out_dir=self.run_dir)
        bar = tqdm(total=cfg.max_steps, initial=self.step, unit="step", dynamic_ncols=True,
                   desc="fine-tuning", disable=not (main and cfg.progress and not self.quiet))

        def write(record: dict):
            if log is not None:
                log.write(json.dumps(record) + "\n")
                log.flush()

        def eval_and_log():
            metrics = self.evaluate()
            write({"kind": "eval", "step": self.step, "tokens": self.tokens, **metrics})
            result.val = metrics
            if main and not self.quiet and metrics:
                shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
                bar.write(f"step {self.step}" + (f": {shown}" if shown else ""))
                for s in metrics.get("samples", []):
                    bar.write(f"  sample: {s}")
            if metrics.get("val_loss", math.inf) < self.best_val:
                self.best_val = metrics["val_loss"]
                self.save(self.run_dir / "best", with_state=False)

        last_eval = -1
        try:
            with StopFlag() as stop:
                start, window_tokens = time.perf_counter(), 0
                while self.step < cfg.max_steps:
                    stop_now = stop.raised
                    if self.procs.distributed:
                        [flag] = all_reduce_values([float(stop_now)], self.device, self.procs, "max")
                        stop_now = flag > 0
                    if stop_now:
                        result.interrupted = True
                        break
                    loss, tokens = self.train_step()
                    result.losses.append(loss)
                    window_tokens += tokens
                    now = time.perf_counter()
                    tps = window_tokens / max(1e-9, now - start)
                    write({"kind": "train", "step": self.step, "tokens": self.tokens, "lr": self.lr,
                           "train_loss": loss, "tokens_per_s": tps,
                           "epoch": round(self.step / self.steps_per_epoch, 3)})
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}")
                    if self.step % cfg.eval_every == 0:
                        eval_and_log()
                        last_eval = self.step
                    if self.step % cfg.save_every == 0:
                        self.save(self.run_dir / "latest")
            if last_eval != self.step and not result.interrupted:
                eval_and_log()
            self.save(self.run_dir / "latest")  # also on Ctrl-C: no work is lost
        finally:
            bar.close()
            if log is not None:
                log.close()
        if main and cfg.plot and metrics_path.exists():
            from ..plots import plot_loss

            plot_loss(metrics_path, self.run_dir / "loss.png", title="fine-tuning")
        result.step, result.tokens = self.step, self.tokens
        return result
