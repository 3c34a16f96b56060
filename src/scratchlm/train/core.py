"""The training core: one loop for every task (pretraining, instruction tuning,
classification, and whatever plugs in next: DPO, GRPO, ...).

The core owns everything that is the same for every task: process set-up (torchrun,
DDP / FSDP2), precision (autocast), the optimizer groups and the schedule, gradient
accumulation, clipping, the evaluation cadence, checkpoints with exact resume (every RNG:
torch CPU and CUDA, python ``random``, numpy; the task's own state; the data position is
the step), Ctrl-C, the time budget, ``metrics.jsonl`` and the progress bar. A *task*
supplies what differs: its model, its batches, its loss and metrics, its evaluation, and
how a checkpoint directory is written.

One optimizer step, with gradient accumulation over ``grad_accum`` micro-batches:

    for micro in range(grad_accum):
        batch = task.micro_batch(step, micro, rank, world, model)   moved to the device
        loss, metrics, tokens = task.loss(model, batch)              under autocast
        loss += router_aux_loss_coef * load_balancing_loss           a mixture of experts only
        (loss / grad_accum).backward()                               gradients add up
    clip the gradient norm; AdamW step at the scheduled learning rate; zero the gradients

A model with mixture-of-experts layers (moe.py), whatever the task (pretraining,
fine-tuning, a classifier over a MoE backbone, DPO, GRPO), gets the load-balancing loss of
the routers its training forwards used (``moe.add_balancing_loss``), and logs it with the
routers' balance and the task's own loss (``moe_aux_loss``, ``moe_load_max``,
``moe_load_entropy``, ``task_loss``).

Nothing in a step waits for the device: the loss and the metrics stay on it and are read
(one host sync) only every ``log_every`` steps, and before an evaluation or a checkpoint.
A loss that is not finite stops the run there with one line, and the last checkpoint
(written while the loss was finite) stays ``latest/``.

A task plugs in by subclassing ``Task``. A toy regression task, trained to the end:

>>> import tempfile
>>> class Fit(Task):
...     def model(self, resume_from):
...         self.net = torch.nn.Linear(1, 1)
...         if resume_from is not None:
...             self.net.load_state_dict(torch.load(resume_from / "net.pt", weights_only=True))
...         return self.net
...     def micro_batch(self, step, micro, rank, world, model):
...         x = torch.randn(8, 1, generator=torch.Generator().manual_seed(step))  # the data position is the step
...         return x, 3 * x + 1
...     def loss(self, model, batch):
...         x, y = batch
...         return torch.nn.functional.mse_loss(model(x), y), {}, len(x)
...     def save(self, directory, weights, extra):
...         with atomic_directory(directory, marker=("net.pt",)) as tmp:  # extra(tmp): train_state.pt
...             torch.save(weights or self.net.state_dict(), tmp / "net.pt")
...             extra(tmp)
>>> cfg = LoopConfig(out_dir=tempfile.mkdtemp(), max_steps=200, lr=0.1, min_lr=0.01, warmup_steps=5,
...                  weight_decay=0.0, progress=False, plot=False, device="cpu", precision="fp32")
>>> result = Trainer(cfg, Fit(), quiet=True).run()
>>> result.step, result.losses[-1] < 1e-3, sorted(p.name for p in (Path(cfg.out_dir) / "latest").iterdir())
(200, True, ['net.pt', 'train_config.json', 'train_state.pt'])

The interface, and why it has this shape:

- ``model(resume_from)``: the task builds its trainable module (a Transformer, a
  classifier, a model with LoRA adapters), from its own checkpoint directory on resume;
  the core moves it to the device and wraps it (DDP / FSDP2 / compile).
- ``micro_batch(step, micro, rank, world, model)``: a batch is a function of the data
  position, so resuming needs only the step. It gets the (bare) model, so a task can make
  its batches with it: GRPO samples completions with the current policy here (under
  ``eval_mode(model)``), and may cache them across steps in its own state.
- ``loss(model, batch) -> (loss, metrics, tokens)``: ``metrics`` are tensors the core
  averages and logs (reward accuracy, margins...); they are never synced per step.
- ``evaluate(model)``, ``sample(model)``: at every evaluation, in eval mode, without
  gradients, with every RNG put back afterwards (evaluation must not move training). The
  core keeps ``best/`` by ``best_metric`` (``best_mode`` "min" or "max").
- ``save(directory, weights, extra)``: a checkpoint in the task's own format (a model
  directory, an adapter directory...) written atomically, calling ``extra(tmp)`` inside
  so that the core's ``train_state.pt`` is part of the same atomic write.
- ``state_dict()`` / ``load_state_dict(state)``: the task's own state (a rollout cache, a
  running statistic), saved in ``train_state.pt`` (tensors and plain containers only).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import (
    CheckpointError,
    atomic_directory,  # noqa: F401 (the docstring example uses it)
    load_train_state,
    resolve_dir,
    save_train_state,
)
from ..errors import ConfigError, ScratchLMError
from ..moe import MoE, add_balancing_loss
from ..plots import read_metrics
from .config import LoopConfig
from .distributed import all_reduce_values, full_state, gradient_sync, init_processes, load_optimizer_state, wrap_model
from .metrics import Window
from .optim import decay_progress, lr_at, make_optimizer
from .precision import autocast, autocast_dtype
from .rng import rng_state, seed_everything, set_rng_state
from .task import EvalHook, Run, Task, TrainResult


class TrainingDiverged(ScratchLMError):
    """The loss stopped being a finite number (too high a learning rate, bad data...)."""


# ----------------------------------------------------------------------------------------
# Small pieces: eval mode, Ctrl-C, moving batches
# ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Eval mode (no dropout) and no gradients; train mode again afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def to_device(batch: Any, device: torch.device) -> Any:
    """Every tensor in (nested tuples, lists, dicts of) ``batch``, on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


class StopFlag:
    """SIGINT (Ctrl-C) sets a flag; the loop saves a checkpoint at the end of the step and
    stops. A second Ctrl-C interrupts at once."""

    def __init__(self):
        self.raised = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: no signal handling
            self._previous = None
        return self

    def _handle(self, signum, frame):
        if self.raised:
            raise KeyboardInterrupt
        self.raised = True
        print("\nscratchlm: interrupted, saving a checkpoint (Ctrl-C again to quit at once)", file=sys.stderr)

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


# ----------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------
class Trainer:
    """Runs ``task`` as ``cfg`` says; ``run()`` trains and returns a TrainResult."""

    def __init__(self, cfg: LoopConfig, task: Task, quiet: bool = False, eval_hook: EvalHook | None = None):
        self.cfg, self.task, self.quiet, self.eval_hook = cfg, task, quiet, eval_hook
        if cfg.eval_tasks and eval_hook is None:
            raise ConfigError("eval_tasks needs an evaluation hook: run `scratchlm train`, or pass "
                              "eval_hook=scratchlm.eval.training_eval_hook(...) to the trainer")
        if Path(cfg.out_dir).exists() and not Path(cfg.out_dir).is_dir():
            raise ConfigError(f"out_dir {cfg.out_dir} is a file, not a folder; choose another run folder")
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.procs, self.device = init_processes(cfg.device)
        self.sharded = self.procs.distributed and cfg.distributed == "fsdp"
        if cfg.eval_tasks and self.sharded:
            raise ConfigError("eval_tasks under FSDP: no process holds the whole model to score; run "
                              "`scratchlm eval RUN_DIR/latest --tasks ...` after training")
        self.run_dir = Path(cfg.out_dir)
        self.latest, self.best_dir = self.run_dir / "latest", self.run_dir / "best"
        self.autocast_dtype = autocast_dtype(cfg.precision, self.device)
        task.setup(Run(cfg, self.procs, self.device, self.autocast_dtype, self.sharded, self.run_dir))

        if cfg.resume:
            try:
                resolve_dir(self.latest)
            except CheckpointError:
                raise CheckpointError(f"--resume: no checkpoint in {self.latest}") from None
        seed_everything(cfg.seed)  # the same initial weights on every rank
        self.raw_model = task.model(self.latest if cfg.resume else None).to(self.device).train()
        self.has_experts = any(isinstance(m, MoE) for m in self.raw_model.modules())  # + a balancing loss
        state = load_train_state(self.latest) if cfg.resume else None
        self.wrapped = wrap_model(self.raw_model, self.procs, self.device, cfg.distributed)
        self.trainable = [p for p in self.wrapped.parameters() if p.requires_grad]
        if not self.trainable:
            raise ConfigError("nothing to train: every parameter of the model is frozen")
        self.optimizer = make_optimizer(self.wrapped, cfg, self.device, sharded=self.sharded)
        self.step, self.tokens, self.elapsed, self.lr = 0, 0, 0.0, cfg.lr
        self.best = math.inf if task.best_mode == "min" else -math.inf
        self.saved_step: int | None = None
        if state is not None:
            load_optimizer_state(self.wrapped, self.optimizer, state["optimizer"], self.sharded)
            self.step, self.tokens = int(state["step"]), int(state["tokens"])
            self.elapsed, self.saved_step = float(state.get("elapsed", 0.0)), int(state["step"])
            self.best = float(state.get("best", state.get("best_val", self.best)))
            if "rng" in state:
                set_rng_state(state["rng"], self.device)
            else:  # a checkpoint from before every RNG was saved
                torch.set_rng_state(state["rng_cpu"])
            task.load_state_dict(state.get("task", {}))
        self.model = torch.compile(self.wrapped) if cfg.compile else self.wrapped

        n = task.batches_per_epoch()
        self.steps_per_epoch = max(1, n // (cfg.grad_accum * self.procs.world_size)) if n else None
        if cfg.max_steps is not None:
            self.max_steps = cfg.max_steps
        elif self.steps_per_epoch is None:
            raise ConfigError("this task has no epochs: set max_steps")
        else:
            self.max_steps = max(1, math.ceil(cfg.epochs * self.steps_per_epoch))

    # ---- one step -----------------------------------------------------------------------------
    def progress(self) -> float:
        """How far the run is, 0 -> 1: steps, or the time budget if that runs out first."""
        p = self.step / self.max_steps
        if self.cfg.max_minutes:
            p = max(p, self.elapsed / (60 * self.cfg.max_minutes))
        return p

    def train_step(self, window: Window) -> None:
        """One optimizer step over grad_accum micro-batches; its loss goes to ``window``."""
        cfg, A, W, rank = self.cfg, self.cfg.grad_accum, self.procs.world_size, self.procs.rank
        progress = decay_progress(self.step, cfg.warmup_steps, self.max_steps)
        if cfg.max_minutes:  # time-budgeted: decay by steps or by time, whichever is further
            progress = max(progress, self.elapsed / (60 * cfg.max_minutes))
        lr = lr_at(self.step, cfg, progress)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total, sums, tokens = None, {}, 0
        for micro in range(A):
            batch = to_device(self.task.micro_batch(self.step, micro, rank, W, self.raw_model), self.device)
            with gradient_sync(self.wrapped, self.procs, self.sharded, last=micro == A - 1):
                with autocast(self.device, self.autocast_dtype):
                    loss, metrics, n = self.task.loss(self.model, batch)
                    if self.has_experts:  # + the routers' load-balancing loss, and their metrics
                        loss, routing = add_balancing_loss(self.raw_model, loss)
                        metrics = {**metrics, **routing}
                (loss / A).backward()
            total = loss.detach().float() if total is None else total + loss.detach().float()
            for name, value in metrics.items():
                value = torch.as_tensor(value, device=self.device).detach().float()
                sums[name] = sums[name] + value if name in sums else value
            tokens = tokens + n
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.trainable, cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.lr = lr
        window.add(total / A, {k: v / A for k, v in sums.items()}, tokens)

    def check_finite(self, window: Window) -> dict:
        """Sync the window; stop with one line if a loss in it is not finite."""
        values = window.read(self.procs, self.device)
        self.tokens = window.tokens_before + values["tokens"]
        bad = [i for i, v in enumerate(values["losses"]) if not math.isfinite(v)]
        if bad:
            step = self.step - len(values["losses"]) + bad[0] + 1
            kept = (f"{self.latest} keeps step {self.saved_step}, the last checkpoint with a finite loss"
                    if self.saved_step is not None else "no checkpoint was written")
            raise TrainingDiverged(f"step {step}: the training loss is {values['losses'][bad[0]]} (not finite); "
                                   f"stopped without saving it: {kept}. Try a lower --lr or --precision fp32")
        return values

    # ---- evaluation ----------------------------------------------------------------------------
    def evaluate(self) -> tuple[dict, str | list[str] | None]:
        """(metrics, sample) of the current model; every RNG is as it was afterwards."""
        saved = rng_state(self.device)  # evaluation must not move training's random numbers
        try:
            with eval_mode(self.raw_model), autocast(self.device, self.autocast_dtype):
                metrics = self.task.evaluate(self.raw_model)
                # Samples from rank 0's whole model; a sharded model has no whole copy to sample from.
                sample = self.task.sample(self.raw_model) if self.procs.is_main and not self.sharded else None
        finally:
            set_rng_state(saved, self.device)
        return metrics, sample

    def run_eval_hook(self, final: bool) -> dict:
        """The eval hook's scores for the current model ({} when none is due): on the main
        process (the others wait at their next collective), with every RNG as it was
        afterwards. (Under FSDP no process has the whole model: refused in __init__.)"""
        every = self.cfg.eval_tasks_every
        due = final or (every is not None and self.step % every == 0)
        if self.eval_hook is None or not due or not self.procs.is_main or self.sharded:
            return {}
        if self.task.tokenizer is None:
            raise ConfigError("eval_tasks: this task's model has no tokenizer to score text with")
        saved = rng_state(self.device)
        try:
            with eval_mode(self.raw_model), autocast(self.device, self.autocast_dtype):
                return dict(self.eval_hook(self.raw_model, self.task.tokenizer, self.step, final))
        finally:
            set_rng_state(saved, self.device)

    # ---- checkpoints ---------------------------------------------------------------------------
    def save(self, directory: Path, with_state: bool = True) -> None:
        # Under FSDP a collective: every rank gathers, rank 0 writes.
        weights, optimizer_state = full_state(self.wrapped, self.optimizer, self.sharded, with_state)
        if not self.procs.is_main:
            return
        state = {"step": self.step, "tokens": self.tokens, "elapsed": self.elapsed, "best": self.best,
                 "optimizer": optimizer_state, "rng": rng_state(self.device), "task": self.task.state_dict()}

        def extra(tmp: Path):
            (tmp / "train_config.json").write_text(json.dumps(self.cfg.to_dict(), indent=2) + "\n")
            if with_state:
                save_train_state(tmp, state)
            else:  # best/: which step it is, and by what
                (tmp / "best.json").write_text(json.dumps(
                    {"step": self.step, self.task.best_metric: self.best, "mode": self.task.best_mode}) + "\n")

        try:
            self.task.save(directory, weights, extra)
        except OSError as e:  # a full disk, a quota, a folder made read-only: the old copy stays
            raise CheckpointError(f"cannot save {directory} ({e.strerror or e}); {self.kept()}") from None
        if with_state:
            self.saved_step = self.step

    def kept(self) -> str:
        """What is safe on disk now: the last checkpoint written (a failed save leaves it whole)."""
        if self.saved_step is None:
            return "no checkpoint of this run was written"
        return f"{self.latest} keeps step {self.saved_step}"

    # ---- the loop ------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        from tqdm.auto import tqdm

        cfg, main = self.cfg, self.procs.is_main
        metrics_path = self.run_dir / "metrics.jsonl"
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
            # A fresh run starts a fresh log; a resumed one keeps what came before its checkpoint.
            rows = [r for r in read_metrics(metrics_path) if r["step"] <= self.step] if (
                cfg.resume and metrics_path.exists()) else []
            tmp = metrics_path.with_name(metrics_path.name + ".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
            os.replace(tmp, metrics_path)
        log = open(metrics_path, "a") if main else None
        # The bar counts steps, or seconds of the time budget when there is one.
        timed = cfg.max_minutes is not None
        bar = tqdm(total=round(60 * cfg.max_minutes) if timed else self.max_steps,
                   initial=int(self.elapsed) if timed else self.step, unit="s" if timed else "step",
                   disable=not (main and cfg.progress and not self.quiet), desc=self.task.title, dynamic_ncols=True)
        result = TrainResult(self.step, self.tokens, self.run_dir)
        start = time.perf_counter() - self.elapsed
        window, last_eval = Window(self.tokens), -1

        def write(record: dict):
            if log is not None:
                try:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                except OSError as e:  # --resume skips the torn last line this may leave
                    raise ScratchLMError(f"cannot append to {metrics_path} ({e.strerror or e}); "
                                         f"{self.kept()}") from None

        def log_window():
            nonlocal window
            values = self.check_finite(window)
            result.losses.extend(values["losses"])
            now = time.perf_counter()
            tps = values["tokens"] / max(1e-9, now - window.start)
            record = {"kind": "train", "step": self.step, "tokens": self.tokens, "lr": self.lr,
                      "train_loss": sum(values["losses"]) / len(values["losses"]), **values["metrics"],
                      "tokens_per_s": tps, "elapsed_s": round(now - start, 2)}
            if self.steps_per_epoch:
                record["epoch"] = round(self.step / self.steps_per_epoch, 3)
            write(record)
            bar.set_postfix(loss=f"{values['losses'][-1]:.3f}", tok_s=f"{tps:,.0f}")
            window = Window(self.tokens)

        def evaluate_and_log(final: bool = False):
            self.check_finite(window)
            metrics, sample = self.evaluate()
            scores = self.run_eval_hook(final)
            record = {"kind": "eval", "step": self.step, "tokens": self.tokens, **metrics,
                      "elapsed_s": round(self.elapsed, 2)}
            if sample:
                record["sample" if isinstance(sample, str) else "samples"] = sample
            if metrics or sample:  # a task without evaluation logs no empty rows
                write(record)
            result.val = metrics
            if main and not self.quiet and (metrics or sample):
                bar.write(self.task.describe(self.step, metrics, sample))
            log_scores(scores)
            value = metrics.get(self.task.best_metric)
            if value is not None and (value < self.best if self.task.best_mode == "min" else value > self.best):
                self.best = value
                self.save(self.best_dir, with_state=False)

        def log_scores(scores: dict):
            """The eval hook's scores, e.g. {"python-docs-val/bits_per_byte": 2.31}: a row of their own."""
            if scores:
                result.eval_scores = scores
                write({"kind": "eval_tasks", "step": self.step, "tokens": self.tokens, **scores,
                       "elapsed_s": round(self.elapsed, 2)})
                if main and not self.quiet:
                    bar.write("  eval tasks: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))

        def save_latest():
            self.check_finite(window)
            self.save(self.latest)

        try:
            with StopFlag() as stop:
                while True:
                    self.elapsed = time.perf_counter() - start
                    stop_now = stop.raised
                    if self.procs.distributed:  # every rank must agree on the time and on stopping
                        self.elapsed, flag = all_reduce_values([self.elapsed, float(stop_now)], self.device,
                                                               self.procs, "max")
                        stop_now = flag > 0
                    if stop_now:
                        result.interrupted = True
                        break
                    if self.step >= self.max_steps or self.progress() >= 1.0:
                        break
                    if cfg.stop_at_step is not None and self.step >= cfg.stop_at_step:
                        break
                    self.train_step(window)
                    bar.update(min(bar.total, int(time.perf_counter() - start)) - bar.n if timed else 1)
                    if self.step % cfg.log_every == 0:
                        log_window()
                    every = cfg.eval_tasks_every
                    if self.step % cfg.eval_every == 0 or (every and self.step % every == 0):
                        evaluate_and_log()
                        last_eval = self.step
                    if self.step % cfg.save_every == 0:
                        save_latest()
            if window.losses:
                log_window()
            if not result.interrupted and last_eval != self.step:
                evaluate_and_log(final=True)
            elif not result.interrupted:  # evaluated at this very step: only the final eval hook is left
                log_scores(self.run_eval_hook(final=True))
            self.elapsed = time.perf_counter() - start
            save_latest()  # also on Ctrl-C: no work is lost
        finally:
            bar.close()
            if log is not None:
                with contextlib.suppress(OSError):  # every line was flushed when written; a full disk
                    log.close()  # fails the close again, and must not hide why the run stopped
        if main and cfg.plot and metrics_path.exists():
            from ..plots import plot_loss

            plot_loss(metrics_path, self.run_dir / "loss.png", title=self.task.title)
        result.step, result.tokens = self.step, self.tokens
        return result


__all__ = ["Task", "Run", "Trainer", "TrainResult", "TrainingDiverged", "StopFlag", "Window", "eval_mode",
           "rng_state", "set_rng_state", "seed_everything", "to_device"]
