"""The training loop: next-token prediction on token shards, with checkpoints, exact
resume, and DDP / FSDP2 under torchrun.

One optimizer step, with gradient accumulation over ``grad_accum`` micro-batches:

    for micro in range(grad_accum):
        x, y = batch (B, T), (B, T)         y is x shifted left by one token
        logits = model(x)                    (B, T, vocab)    under bf16 autocast if enabled
        loss = cross_entropy(logits, y)      mean over B*T positions of -log p(y_t | x_<=t)
        (loss / grad_accum).backward()       gradients add up over micro-batches
    clip the gradient norm; AdamW step at the scheduled learning rate; zero the gradients

A run directory (``out_dir``) holds ``metrics.jsonl``, ``loss.png``, ``train_config.json``
and two model directories (checkpoint.py): ``latest/`` (with ``train_state.pt``, what
``--resume`` continues from) and ``best/`` (lowest validation loss so far).

>>> cfg = TrainConfig.from_dict({"batch_size": 8, "lr": 3e-4})
>>> cfg.batch_size, cfg.lr, cfg.grad_accum
(8, 0.0003, 1)
>>> [round(lr_at(s, TrainConfig(max_steps=100, warmup_steps=10, lr=1.0, min_lr=0.1)), 3) for s in (0, 9, 55, 100)]
[0.1, 1.0, 0.55, 0.1]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time
import tomllib
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

from .atomic import saved_dir
from .checkpoint import CheckpointError, load_config, load_model, load_train_state, save_model, save_train_state
from .config import ConfigError, ModelConfig
from .model import Transformer
from .plots import read_metrics


# ----------------------------------------------------------------------------------------
# Configuration: one dataclass; the YAML/TOML file and the command line fill its fields
# ----------------------------------------------------------------------------------------
def option(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # data and output
    data: str = option("data/prepared", "folder written by `scratchlm prepare` (shards, meta.json, tokenizer)")
    out_dir: str = option("runs/train", "run folder: metrics.jsonl, loss.png, latest/ and best/ checkpoints")
    # model
    model: str = option("gpt-small-cpu", "ModelConfig preset to start from (vocab_size comes from the data)")
    context_length: Optional[int] = option(None, "tokens per training window (default: the preset's)")
    d_model: Optional[int] = option(None, "width of the residual stream (default: the preset's)")
    n_layers: Optional[int] = option(None, "number of Transformer blocks (default: the preset's)")
    n_heads: Optional[int] = option(None, "attention heads (default: the preset's)")
    n_kv_heads: Optional[int] = option(None, "key/value heads, for grouped-query attention (default: the preset's)")
    d_ff: Optional[int] = option(None, "hidden width of the MLP (default: the preset's)")
    dropout: float = option(0.0, "dropout probability (0 for short runs on lots of data)")
    model_config: Optional[dict] = option(None, "any other ModelConfig fields, as a mapping (JSON on the command line)")
    # optimization
    batch_size: int = option(16, "windows per micro-batch, per process")
    grad_accum: int = option(1, "micro-batches per optimizer step (gradient accumulation)")
    max_steps: int = option(2000, "optimizer steps; the cosine schedule ends here")
    max_minutes: Optional[float] = option(None, "time budget: stop after this many minutes; the schedule "
                                          "then runs on elapsed time (whichever of steps/time ends first)")
    lr: float = option(1e-3, "peak learning rate, reached after warmup")
    min_lr: float = option(1e-4, "learning rate at the end of the cosine decay")
    warmup_steps: int = option(100, "steps of linear warmup from lr/warmup_steps to lr")
    weight_decay: float = option(0.1, "AdamW weight decay on matrices (never on biases, norms, embeddings)")
    beta1: float = option(0.9, "AdamW beta1 (momentum)")
    beta2: float = option(0.95, "AdamW beta2 (second-moment decay)")
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0: no clipping)")
    sampler: str = option("random", "'random' windows (large corpora) or 'sliding' windows shuffled per epoch")
    stride: Optional[int] = option(None, "step between sliding windows (default: context_length)")
    # precision and speed
    precision: str = option("auto", "'auto' (bf16 autocast where the hardware has fast bf16, else fp32), "
                            "'bf16' or 'fp32'")
    compile: bool = option(False, "torch.compile the model")
    device: str = option("auto", "'auto' (cuda if present, else cpu), 'cpu', 'cuda', 'cuda:1', 'mps'")
    threads: Optional[int] = option(None, "CPU threads for torch (default: torch's choice)")
    distributed: str = option("ddp", "under torchrun: 'ddp' (replicate the model) or 'fsdp' (shard it, FSDP2)")
    # evaluation, logging and checkpoints
    eval_every: int = option(100, "evaluate (val loss, perplexity, bits/byte, sample) every N steps")
    eval_batches: int = option(20, "validation batches per evaluation")
    log_every: int = option(10, "write the train loss and tokens/s every N steps")
    sample_prompt: str = option("", "prompt of the sample printed at each evaluation ('' = start of a document)")
    sample_tokens: int = option(64, "tokens to generate for each sample (0: no samples)")
    save_every: int = option(500, "write latest/ every N steps (and always at the end)")
    plot: bool = option(True, "write loss.png at the end")
    seed: int = option(1337, "seed of the initial weights, the batches and dropout")
    resume: bool = option(False, "continue out_dir/latest exactly: weights, optimizer, schedule, RNG, data")
    stop_at_step: Optional[int] = option(None, "stop (with a checkpoint) after this step, keeping the schedule "
                                         "of max_steps: a run in several pieces")
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        def need(ok, msg):
            if not ok:
                raise ConfigError(msg)

        for name in ("batch_size", "grad_accum", "max_steps", "eval_every", "eval_batches", "log_every", "save_every"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, f"{name} must be a positive integer, got {v!r}")
        need(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        need(self.lr > 0 and 0 <= self.min_lr <= self.lr, f"need 0 <= min_lr <= lr and lr > 0, got lr={self.lr}, min_lr={self.min_lr}")
        need(self.max_minutes is None or self.max_minutes > 0, f"max_minutes must be > 0, got {self.max_minutes}")
        need(self.precision in ("auto", "bf16", "fp32"), f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        need(self.sampler in ("random", "sliding"), f"sampler must be random or sliding, got {self.sampler!r}")
        need(self.distributed in ("ddp", "fsdp"), f"distributed must be ddp or fsdp, got {self.distributed!r}")
        need(self.grad_clip >= 0, f"grad_clip must be >= 0, got {self.grad_clip}")
        need(0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}")

    # ---- from files and dicts ------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "TrainConfig":
        """Build from a mapping; unknown keys and values of the wrong type are ConfigErrors."""
        data, known = dict(data), {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"{source}: unknown option(s): {', '.join(unknown)} (see `scratchlm train --help`)")
        for key, value in data.items():
            data[key] = _check_type(key, known[key].type, value, source)
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | os.PathLike, **overrides) -> "TrainConfig":
        return cls.from_dict({**read_config_file(path), **overrides}, source=str(path))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_type(key: str, annotation: str, value, source: str):
    base = annotation.replace("Optional[", "").rstrip("]")
    if value is None and annotation.startswith("Optional"):
        return None
    ok = {"int": isinstance(value, int) and not isinstance(value, bool),
          "float": isinstance(value, (int, float)) and not isinstance(value, bool),
          "str": isinstance(value, str), "bool": isinstance(value, bool),
          "dict": isinstance(value, dict)}[base]
    if not ok:
        raise ConfigError(f"{source}: {key} must be {base}, got {value!r}")
    return float(value) if base == "float" else value


def read_config_file(path: str | os.PathLike) -> dict:
    """A YAML (.yaml/.yml) or TOML (.toml) file as a dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"{path}: config files are .yaml, .yml or .toml")
    except (tomllib.TOMLDecodeError, ValueError) as e:
        raise ConfigError(f"{path}: {e}".splitlines()[0]) from None
    except Exception as e:  # yaml.YAMLError
        raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value")
    return data


# ----------------------------------------------------------------------------------------
# Schedule and optimizer
# ----------------------------------------------------------------------------------------
def lr_at(step: int, cfg: TrainConfig, progress: Optional[float] = None) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr``.

    ``progress`` in [0, 1] is how far the decay is; by default the fraction of the steps
    after warmup that are done. A time-budgeted run passes the larger of that and the
    fraction of the time budget spent.
    Warmup matters because Adam's second-moment estimates are poor in the first steps.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if progress is None:  # the fraction of the steps after warmup that are done
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, max(0.0, progress))
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: weight decay on the matrices of linear layers; none on biases,
    norm gains and embeddings (decaying them only pulls useful values towards 0).

    A tied output head is the token embedding itself, so it sits in the no-decay group.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # a shared (tied) tensor is listed once
        if not p.requires_grad:
            continue
        is_embedding = name.split(".")[-2] in ("tok_emb", "pos_emb") if "." in name else False
        (decay if p.ndim >= 2 and not is_embedding else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    # fused: one kernel for all parameters (supported on CPU and CUDA); not with DTensors (FSDP).
    fused = device.type in ("cpu", "cuda") and cfg.distributed != "fsdp"
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             eps=1e-8, fused=fused)


# ----------------------------------------------------------------------------------------
# Devices, precision, processes
# ----------------------------------------------------------------------------------------
def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available")
    return device


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with bf16 matrix instructions (AVX-512 BF16 or AMX): there bf16
    matmuls run several times faster than fp32. Elsewhere bf16 is emulated and slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for this precision setting on this device (None: plain fp32)."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_fast_bf16() else None
    return None


@dataclass
class Processes:
    """Where this process stands in a torchrun job (world_size 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_processes(device_name: str) -> tuple[Processes, torch.device]:
    """Join the process group when started by torchrun (WORLD_SIZE > 1): NCCL on GPUs,
    gloo on CPUs. Each GPU process uses the GPU of its local rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Processes(), pick_device(device_name)
    import torch.distributed as dist

    procs = Processes(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", procs.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return procs, device


def all_reduce_values(values: list[float], device, procs: Processes, op: str = "sum") -> list[float]:
    if not procs.distributed:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()


# ----------------------------------------------------------------------------------------
# Model building
# ----------------------------------------------------------------------------------------
MODEL_KEYS = ("context_length", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff")


def model_config_for(cfg: TrainConfig, vocab_size: int) -> ModelConfig:
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
    return ModelConfig.from_dict({**base, **changes, "vocab_size": vocab_size, "dropout": cfg.dropout,
                                  "dtype": "float32"})


def _describe_difference(saved: ModelConfig, wanted: ModelConfig) -> str:
    a, b = saved.to_dict(), wanted.to_dict()
    diffs = [f"{k}={a[k]!r} in the checkpoint, {b[k]!r} now" for k in a if a[k] != b[k]]
    return "; ".join(diffs[:3])


# ----------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    step: int
    tokens: int
    val_loss: Optional[float]
    val_bpb: Optional[float]
    out_dir: Path
    interrupted: bool = False
    losses: list = field(default_factory=list)  # train loss of every step of this run


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


class Trainer:
    """Holds what one run needs: model, optimizer, data, and the counters.

    Build it with a TrainConfig; ``run()`` trains and returns a TrainResult.
    """

    def __init__(self, cfg: TrainConfig, quiet: bool = False):
        from .batches import BatchSampler, eval_batches
        from .data import load_meta, load_split
        from .tokenizer import load_tokenizer

        self.cfg, self.quiet = cfg, quiet
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.procs, self.device = init_processes(cfg.device)
        self.autocast = autocast_dtype(cfg.precision, self.device)
        self.run_dir = Path(cfg.out_dir)
        self.latest, self.best = self.run_dir / "latest", self.run_dir / "best"

        # ---- data -------------------------------------------------------------------------
        self.meta = load_meta(cfg.data)
        self.tokenizer = load_tokenizer(cfg.data)
        model_config = model_config_for(cfg, self.meta["vocab_size"])
        T = model_config.context_length
        self.batches = BatchSampler(load_split(cfg.data, "train"), T, cfg.batch_size, cfg.grad_accum,
                                    self.procs.world_size, cfg.sampler, cfg.stride, cfg.seed)
        self.val = eval_batches(load_split(cfg.data, "val"), T, cfg.batch_size, cfg.eval_batches,
                                self.procs.rank, self.procs.world_size)
        val = self.meta["splits"]["val"]
        self.val_tokens_per_byte = val["tokens"] / max(1, val["bytes"])
        self.tokens_per_step = self.batches.global_batch_size * T

        # ---- model and training state ---------------------------------------------------------
        self.step, self.tokens, self.elapsed, self.best_val = 0, 0, 0.0, math.inf
        state = None
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        if cfg.resume:
            if saved_dir(self.latest, "config.json") is None:
                raise CheckpointError(f"--resume: no checkpoint in {self.latest}")
            saved = load_config(self.latest)
            if saved != model_config:
                raise ConfigError(f"--resume: the model config disagrees with {self.latest}: "
                                  f"{_describe_difference(saved, model_config)}")
            model, _ = load_model(self.latest, with_tokenizer=False)
            state = load_train_state(self.latest)
            self.step, self.tokens = int(state["step"]), int(state["tokens"])
            self.elapsed, self.best_val = float(state["elapsed"]), float(state["best_val"])
        else:
            model = Transformer(model_config)
        self.raw_model = model.to(self.device).train()
        self.model = self._wrap(self.raw_model)
        self.optimizer = make_optimizer(self.model, cfg, self.device)
        if state is not None:
            self._load_optimizer(state["optimizer"])
            torch.set_rng_state(state["rng_cpu"])  # dropout continues with the same random numbers
            if self.device.type == "cuda" and "rng_cuda" in state:
                torch.cuda.set_rng_state(state["rng_cuda"], self.device)
        if cfg.compile:
            self.model = torch.compile(self.model)

    # ---- distributed wrapping -------------------------------------------------------------
    def _wrap(self, model: Transformer) -> torch.nn.Module:
        if not self.procs.distributed:
            return model
        if self.cfg.distributed == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(self.device.type, (self.procs.world_size,))
            for block in model.blocks:  # each block's parameters are gathered just before its use
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)  # the rest: embeddings, final norm, head
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        # broadcast_buffers=False: the only buffers are position tables, equal on every rank.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # its successor flag does not exist yet
            return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)

    @property
    def fsdp(self) -> bool:
        return self.procs.distributed and self.cfg.distributed == "fsdp"

    def _full_state(self, with_optimizer: bool) -> tuple[Optional[dict], Optional[dict]]:
        """(model weights or None for "the model's own", optimizer state), whole, for saving.
        Under FSDP every rank must call this (it gathers the shards onto rank 0's CPU)."""
        if not self.fsdp:
            return None, self.optimizer.state_dict() if with_optimizer else None
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(self.model, options=opts)
        return weights, get_optimizer_state_dict(self.model, self.optimizer, options=opts) if with_optimizer else None

    def _load_optimizer(self, state: dict) -> None:
        if not self.fsdp:
            self.optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(self.model, self.optimizer, state, options=StateDictOptions(full_state_dict=True))

    # ---- one step -----------------------------------------------------------------------------
    def _autocast(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            logits = self.model(x.to(self.device))  # (B, T, vocab)
        # The loss in fp32 whatever the autocast: log-softmax over a large vocabulary needs it.
        return F.cross_entropy(logits.float().flatten(0, 1), y.to(self.device).flatten())

    def train_step(self) -> float:
        """One optimizer step; returns the mean loss over all micro-batches of all ranks."""
        cfg, A = self.cfg, self.cfg.grad_accum
        progress = None
        if cfg.max_minutes:  # time-budgeted: decay by steps or by time, whichever is further
            by_steps = (self.step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
            progress = max(by_steps, self.elapsed / (60 * cfg.max_minutes))
        lr = lr_at(self.step, cfg, progress)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=self.device)
        for micro in range(A):
            x, y = self.batches.micro_batch(self.step, micro, self.procs.rank)
            last = micro == A - 1
            # DDP/FSDP: synchronise gradients only once, after the last micro-batch.
            with self._no_sync(last):
                loss = self._loss(x, y)
                (loss / A).backward()
            total += loss.detach()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += self.tokens_per_step
        self.lr = lr
        [mean] = all_reduce_values([total.item() / A], self.device, self.procs)
        return mean / self.procs.world_size

    def _no_sync(self, last: bool):
        if not self.procs.distributed:
            return contextlib.nullcontext()
        if self.fsdp:
            self.model.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if last else self.model.no_sync()

    def progress(self) -> float:
        """How far the run is, 0 -> 1: steps, or the time budget if that runs out first."""
        p = self.step / self.cfg.max_steps
        if self.cfg.max_minutes:
            p = max(p, self.elapsed / (60 * self.cfg.max_minutes))
        return p

    # ---- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean loss over the fixed validation windows; perplexity exp(loss); bits per byte
        = loss / ln 2 * tokens per byte, comparable across tokenizers."""
        # DDP: the bare model, so that evaluation runs no collective. FSDP: the sharded model
        # (its forward gathers weights; every rank has the same number of batches).
        model = self.model if self.fsdp else self.raw_model
        model.eval()
        total, count = 0.0, 0
        for x, y in self.val:
            with self._autocast():
                logits = model(x.to(self.device))
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.to(self.device).flatten())
            total += loss.item() * x.shape[0]
            count += x.shape[0]
        model.train()
        total, count = all_reduce_values([total, count], self.device, self.procs)
        loss = total / max(1, count)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50)),
                "val_bpb": loss / math.log(2) * self.val_tokens_per_byte}

    def sample(self, max_new_tokens: Optional[int] = None, prompt: Optional[str] = None) -> Optional[str]:
        """Prompt + a sampled continuation (temperature 0.8, top-k 40, fixed seed) from the
        current model; None on ranks other than 0 and under FSDP (its weights are sharded)."""
        n = self.cfg.sample_tokens if max_new_tokens is None else max_new_tokens
        if n <= 0 or self.tokenizer is None or self.fsdp or not self.procs.is_main:
            return None
        from .generate import generate

        prompt = self.cfg.sample_prompt if prompt is None else prompt
        # As in training, a document starts after the end-of-text token.
        ids = [self.meta["eot_id"]] + (self.tokenizer.encode(prompt) if prompt else [])
        n = min(n, self.raw_model.config.context_length - len(ids))
        if n <= 0:
            return None
        rng = torch.get_rng_state()  # sampling must not move the training RNG (exact resume)
        self.raw_model.eval()
        try:
            with self._autocast():
                [c] = generate(self.raw_model, self.tokenizer, [ids], max_new_tokens=n,
                               temperature=0.8, top_k=40, seed=self.cfg.seed)
        finally:
            self.raw_model.train()
            torch.set_rng_state(rng)
        return prompt + c.text

    # ---- checkpoints ---------------------------------------------------------------------------
    def save(self, directory: Path, with_state: bool = True) -> None:
        weights, optim_state = self._full_state(with_state)  # under FSDP a collective: all ranks call it
        if not self.procs.is_main:
            return
        state = {
            "step": self.step, "tokens": self.tokens, "elapsed": self.elapsed, "best_val": self.best_val,
            "optimizer": optim_state, "rng_cpu": torch.get_rng_state(),
        }
        if self.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(self.device)

        def extra(tmp: Path):
            (tmp / "train_config.json").write_text(json.dumps(self.cfg.to_dict(), indent=2) + "\n")
            if with_state:
                save_train_state(tmp, state)

        save_model(directory, self.raw_model, self.tokenizer, extra=extra, state=weights)

    # ---- the loop --------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        from tqdm.auto import tqdm

        cfg, main = self.cfg, self.procs.is_main
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        metrics_path = self.run_dir / "metrics.jsonl"
        if main and metrics_path.exists():
            # A fresh run starts a fresh log; a resumed one drops what came after its checkpoint.
            rows = read_metrics(metrics_path) if cfg.resume else []
            metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= self.step))
        log = open(metrics_path, "a") if main else None
        # The bar counts steps, or seconds of the time budget when there is one.
        timed = cfg.max_minutes is not None
        bar = tqdm(total=round(60 * cfg.max_minutes) if timed else cfg.max_steps,
                   initial=int(self.elapsed) if timed else self.step, unit="s" if timed else "step",
                   disable=not (main and cfg.progress and not self.quiet), desc="training", dynamic_ncols=True)
        result = TrainResult(self.step, self.tokens, None, None, self.run_dir)
        window_losses, window_start, window_tokens = [], time.perf_counter(), 0
        last_eval_step = -1
        start = time.perf_counter() - self.elapsed

        def write(record: dict):
            if log is not None:
                log.write(json.dumps(record) + "\n")
                log.flush()

        try:
            with StopFlag() as stop:
                while True:
                    self.elapsed = time.perf_counter() - start
                    stop_now = stop.raised
                    if self.procs.distributed:  # every rank must agree on the time and on stopping
                        self.elapsed, flag = all_reduce_values([self.elapsed, float(stop_now)], self.device, self.procs, "max")
                        stop_now = flag > 0
                    if stop_now:
                        result.interrupted = True
                        break
                    if self.step >= cfg.max_steps or self.progress() >= 1.0:
                        break
                    if cfg.stop_at_step is not None and self.step >= cfg.stop_at_step:
                        break
                    loss = self.train_step()
                    result.losses.append(loss)
                    window_losses.append(loss)
                    window_tokens += self.tokens_per_step
                    bar.update(min(bar.total, int(time.perf_counter() - start)) - bar.n if timed else 1)
                    if self.step % cfg.log_every == 0:
                        now = time.perf_counter()
                        tps = window_tokens / max(1e-9, now - window_start)
                        write({"kind": "train", "step": self.step, "tokens": self.tokens, "lr": self.lr,
                               "train_loss": sum(window_losses) / len(window_losses), "tokens_per_s": tps,
                               "elapsed_s": round(now - start, 2)})
                        bar.set_postfix(step=self.step, loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}")
                        window_losses, window_start, window_tokens = [], now, 0
                    if self.step % cfg.eval_every == 0:
                        self._eval_and_log(write, result, bar)
                        last_eval_step = self.step
                    if self.step % cfg.save_every == 0:
                        self.save(self.latest)
            if last_eval_step != self.step:
                self._eval_and_log(write, result, bar)
            self.elapsed = time.perf_counter() - start
            self.save(self.latest)
        finally:
            bar.close()
            if log is not None:
                log.close()
        if main and cfg.plot and metrics_path.exists():
            from .plots import plot_loss

            n = self.raw_model.num_parameters() / 1e6
            plot_loss(metrics_path, self.run_dir / "loss.png", title=f"{n:.1f}M parameters on {Path(cfg.data).name}")
        result.step, result.tokens = self.step, self.tokens
        return result

    def _eval_and_log(self, write, result: TrainResult, bar) -> None:
        metrics = self.evaluate()
        sample = self.sample()
        record = {"kind": "eval", "step": self.step, "tokens": self.tokens, **metrics,
                  "elapsed_s": round(self.elapsed, 2)}
        if sample is not None:
            record["sample"] = sample
        write(record)
        result.val_loss, result.val_bpb = metrics["val_loss"], metrics["val_bpb"]
        bar.write(f"step {self.step}: val loss {metrics['val_loss']:.4f}, ppl {metrics['val_ppl']:.2f}, "
                  f"{metrics['val_bpb']:.3f} bits/byte") if not self.quiet and self.procs.is_main else None
        if metrics["val_loss"] < self.best_val:
            self.best_val = metrics["val_loss"]
            self.save(self.best, with_state=False)


def train(cfg: TrainConfig, quiet: bool = False) -> TrainResult:
    """Train as ``cfg`` says; under torchrun every process calls this."""
    import torch.distributed as dist

    owned = dist.is_available() and not dist.is_initialized()  # a group we start, we end
    try:
        return Trainer(cfg, quiet=quiet).run()
    finally:
        if owned and dist.is_available() and dist.is_initialized():
            # Wait for rank 0 to finish saving, then close the group: a process that exits
            # with a live gloo group can abort in its destructor and take torchrun down.
            try:
                dist.barrier()
            finally:
                dist.destroy_process_group()


# ----------------------------------------------------------------------------------------
# Command line: `scratchlm train` and `scratchlm demo`
# ----------------------------------------------------------------------------------------
def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parse_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _none_or(kind):
    def parse(text: str):
        return None if text.lower() == "none" else kind(text)
    parse.__name__ = kind.__name__
    return parse


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One --option per TrainConfig field, with its default and help line. Defaults stay
    out of the namespace (SUPPRESS) so that a config file's value is only overridden by an
    option that was actually given."""
    for f in fields(TrainConfig):
        annotation = str(f.type)
        base = annotation.replace("Optional[", "").rstrip("]")
        kind = {"int": int, "float": float, "str": str, "bool": _parse_bool, "dict": _parse_dict}[base]
        if annotation.startswith("Optional"):
            kind = _none_or(kind)
        flags = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        extra = {"nargs": "?", "const": True} if base == "bool" else {}
        parser.add_argument(*flags, dest=f.name, type=kind, default=argparse.SUPPRESS,
                            metavar=base.upper(), help=f"{f.metadata['help']} (default: {f.default!r})", **extra)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in names}
    if getattr(args, "config", None):
        return TrainConfig.from_file(args.config, **given)
    return TrainConfig.from_dict(given, source="command line")


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="pretrain a model on prepared token shards",
        description="Train a Transformer on shards written by `scratchlm prepare`. Options come from "
                    "their defaults, then --config FILE (YAML or TOML), then the command line. "
                    "Launch with `torchrun --nproc_per_node N -m scratchlm.cli train ...` for DDP/FSDP2.")
    p.add_argument("--config", default=None, help="YAML or TOML file of options (default: none)")
    add_config_arguments(p)
    p.set_defaults(func=_train_command)

    d = subparsers.add_parser(
        "demo", help="prepare the built-in corpus and train a small model for ~3 minutes",
        description="The main job: prepare Python's docstrings, train a small model for a fixed time "
                    "on the CPU, and print a sample before and after. Writes runs/demo/.")
    d.add_argument("--minutes", type=float, default=DEMO_MINUTES, help="training time budget (default: %(default)s)")
    d.add_argument("--out", default="runs/demo", help="run folder (default: %(default)s)")
    d.add_argument("--data", default="data/python-docs", help="prepared-data folder (default: %(default)s)")
    d.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: torch's default or 1, whichever is faster right now)")
    d.set_defaults(func=_demo_command)


def _train_command(args) -> int:
    cfg = config_from_args(args)
    result = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        where = Path(cfg.out_dir)
        if result.val_loss is not None:
            print(f"step {result.step}: val loss {result.val_loss:.4f} ({result.val_bpb:.3f} bits/byte); "
                  f"model in {where / 'latest'}, best in {where / 'best'}")
        if result.interrupted:
            print(f"interrupted: saved {where / 'latest'}; continue with --resume", file=sys.stderr)
            return 130
    return 0


# ----------------------------------------------------------------------------------------
# The demo; configs/demo.yaml holds the same settings. Chosen by measuring validation bits
# per byte at an equal compute budget (a quarter of the demo's, bf16, on a loaded 2-core
# AVX-512 BF16 CPU): BPE 2048 d_model 256 x 4 layers 2.28 < BPE d128 x 4 (batch 32) 2.29
# < BPE d192 x 4 2.40 << characters d192 x 4 (context 256) 3.86. BPE wins clearly: each
# token carries ~3.2 bytes, so the same compute sees 3x more text.
# ----------------------------------------------------------------------------------------
DEMO_MINUTES = 3.0
DEMO_TOKENIZER = {"tokenizer": "bpe", "vocab_size": 2048}
DEMO_CONFIG = dict(
    model="gpt-small-cpu", context_length=128, d_model=256, n_layers=4, n_heads=8,
    batch_size=16, grad_accum=1, max_steps=100_000, lr=2e-3, min_lr=2e-4, warmup_steps=50,
    weight_decay=0.1, eval_every=50, eval_batches=10, log_every=10, save_every=1000,
    sample_tokens=48, precision="auto", sampler="random",
)


def pick_threads(trainer: Trainer) -> int:
    """The faster of torch's default thread count and 1, timed on a forward + backward pass
    of a copy of the model (training state untouched). On an idle machine that is the
    default; on a busy one a single thread can be several times faster, because OpenMP
    threads wait at every barrier for a sibling the OS has descheduled."""
    import copy

    default = torch.get_num_threads()
    if default == 1 or trainer.device.type != "cpu":
        return default
    model = copy.deepcopy(trainer.raw_model)
    x, y = trainer.batches.micro_batch(0, 0)
    best: dict[int, float] = {}
    for threads in (default, 1, default, 1):
        torch.set_num_threads(threads)
        start = time.perf_counter()
        with trainer._autocast():
            logits = model(x)
        F.cross_entropy(logits.float().flatten(0, 1), y.flatten()).backward()
        best[threads] = min(best.get(threads, math.inf), time.perf_counter() - start)
    choice = min(best, key=best.get)
    torch.set_num_threads(choice)
    return choice


def demo(minutes: float = DEMO_MINUTES, out: str = "runs/demo", data: str = "data/python-docs",
         threads: Optional[int] = None, overrides: Optional[dict] = None) -> TrainResult:
    from .data import load_meta, prepare

    data_dir = Path(data)
    try:
        meta = load_meta(data_dir)
        ready = (meta.get("source"), meta.get("tokenizer"), meta.get("requested_vocab_size")) == (
            "python-docs", DEMO_TOKENIZER["tokenizer"], DEMO_TOKENIZER.get("vocab_size"))
    except (FileNotFoundError, ValueError):
        ready = False
    if not ready:
        print(f"preparing the built-in corpus (Python's docstrings) into {data_dir} ...")
        t0 = time.perf_counter()
        prepare(corpus="python-docs", out_dir=data_dir, **DEMO_TOKENIZER)
        print(f"  done in {time.perf_counter() - t0:.0f}s")
    meta = load_meta(data_dir)
    print(f"corpus: {meta['splits']['train']['tokens']:,} train tokens, {meta['splits']['val']['tokens']:,} "
          f"val tokens, vocabulary {meta['vocab_size']:,}")
    cfg = TrainConfig.from_dict({**DEMO_CONFIG, "data": str(data_dir), "out_dir": out, "max_minutes": minutes,
                                 "threads": threads, **(overrides or {})})
    trainer = Trainer(cfg)
    if threads is None:
        pick_threads(trainer)
    n = trainer.raw_model.num_parameters()
    print(f"model: {n / 1e6:.2f}M parameters, {cfg.n_layers} layers, d_model {cfg.d_model}, context "
          f"{cfg.context_length}; precision: {'bf16 autocast' if trainer.autocast else 'fp32'}; "
          f"{torch.get_num_threads()} threads; {minutes:g} minutes")
    prompts = ("", "Return the")  # a new docstring from scratch, and one with a start
    for prompt in prompts[:1]:
        print(f"\n--- sample before training ---\n{trainer.sample(120, prompt)}\n")
    result = trainer.run()
    print(f"\n--- samples after training ({result.step} steps, {result.tokens:,} tokens) ---")
    for prompt in prompts:
        print(f"{trainer.sample(120, prompt)}\n")
    print(f"final validation loss: {result.val_loss:.4f} nats/token = {result.val_bpb:.3f} bits/byte "
          f"(perplexity {math.exp(result.val_loss):.1f})")
    print(f"wrote {Path(out)}/: latest/ (checkpoint), best/, metrics.jsonl, loss.png")
    return result


def _demo_command(args) -> int:
    result = demo(args.minutes, args.out, args.data, args.threads)
    return 130 if result.interrupted else 0
