"""The training core is task-agnostic: a toy regression task (not one of scratchlm's) trains,
logs its own metric, keeps best/ by its own key, saves and resumes exactly (every RNG and
the task's own state), and a loss that stops being finite stops the run without saving it."""

import json
import random

import numpy as np
import pytest
import torch

from scratchlm.checkpoint import atomic_directory, load_train_state
from scratchlm.plots import read_metrics
from scratchlm.train import LoopConfig, Task, Trainer, TrainingDiverged


class Toy(Task):
    """y = 2 * (x1 + x2): a small MLP with dropout; batches drawn from python's `random` and
    numpy's global RNG (so exact resume needs both), a count of batches made as task state."""

    best_metric, best_mode = "val_score", "max"

    def __init__(self, nan_from_step=None):
        self.made, self.nan_from_step = 0, nan_from_step

    def model(self, resume_from):
        self.net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Dropout(0.2), torch.nn.Linear(16, 1))
        if resume_from is not None:
            self.net.load_state_dict(torch.load(resume_from / "toy.pt", weights_only=True))
        return self.net

    def micro_batch(self, step, micro, rank, world, model):
        self.made += 1
        x = torch.tensor(np.random.randn(8, 2), dtype=torch.float32) + random.random()
        if self.nan_from_step is not None and step + 1 >= self.nan_from_step:
            x = x * float("nan")
        return x, 2 * x.sum(1, keepdim=True)

    def loss(self, model, batch):
        x, y = batch
        pred = model(x)
        return torch.nn.functional.mse_loss(pred, y), {"abs_err": (pred - y).abs().mean()}, len(x)

    def evaluate(self, model):
        x = torch.linspace(-1, 1, 20).reshape(10, 2)
        mse = torch.nn.functional.mse_loss(model(x), 2 * x.sum(1, keepdim=True)).item()
        return {"val_mse": mse, "val_score": -mse}

    def save(self, directory, weights, extra):
        with atomic_directory(directory, marker=("toy.pt",)) as tmp:  # a folder with toy.pt is ours to replace
            torch.save(weights or self.net.state_dict(), tmp / "toy.pt")
            extra(tmp)

    def state_dict(self):
        return {"made": self.made}

    def load_state_dict(self, state):
        self.made = state["made"]


def config(out, **changes):
    base = dict(out_dir=str(out), max_steps=12, lr=1e-2, min_lr=1e-3, warmup_steps=2, weight_decay=0.0,
                grad_accum=2, eval_every=4, log_every=1, save_every=100, progress=False, plot=False,
                device="cpu", precision="fp32", seed=3)
    return LoopConfig(**{**base, **changes})


def test_toy_task_trains_logs_its_metric_and_keeps_best_by_its_key(tmp_path):
    result = Trainer(config(tmp_path, max_steps=60, log_every=5, eval_every=10), Toy(), quiet=True).run()
    assert result.step == 60 and len(result.losses) == 60
    assert sum(result.losses[-5:]) < sum(result.losses[:5]) / 5
    rows = read_metrics(tmp_path / "metrics.jsonl")
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == list(range(5, 61, 5))
    assert all("abs_err" in r and r["tokens"] == r["step"] * 16 for r in train_rows)
    # The window's train_loss is the mean of the per-step losses the result holds.
    assert train_rows[0]["train_loss"] == pytest.approx(sum(result.losses[:5]) / 5)
    evals = [r for r in rows if r["kind"] == "eval"]
    best = max(evals, key=lambda r: r["val_score"])
    recorded = json.loads((tmp_path / "best" / "best.json").read_text())
    assert recorded["step"] == best["step"] and recorded["val_score"] == best["val_score"]
    assert (tmp_path / "latest" / "toy.pt").exists() and not (tmp_path / "best" / "train_state.pt").exists()


def test_toy_task_resumes_exactly(tmp_path):
    """12 steps straight == 6 steps, stop, resume for 6: the same loss at every step, the same
    weights, the same task state. Dropout (torch), python random and numpy all draw."""
    straight_task = Toy()
    straight = Trainer(config(tmp_path / "a"), straight_task, quiet=True).run()
    first = Trainer(config(tmp_path / "b", stop_at_step=6), Toy(), quiet=True).run()
    resumed_task = Toy()
    second = Trainer(config(tmp_path / "b", resume=True), resumed_task, quiet=True).run()
    assert first.losses + second.losses == straight.losses  # bit for bit
    assert resumed_task.made == straight_task.made == 24
    assert load_train_state(tmp_path / "b" / "latest")["task"] == {"made": 24}
    a = torch.load(tmp_path / "a" / "latest" / "toy.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "latest" / "toy.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["step"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == list(range(1, 13))


def test_non_finite_loss_stops_and_keeps_the_last_finite_checkpoint(tmp_path):
    cfg = config(tmp_path, max_steps=20, save_every=2, log_every=3, eval_every=100)
    with pytest.raises(TrainingDiverged) as caught:
        Trainer(cfg, Toy(nan_from_step=5), quiet=True).run()
    message = str(caught.value)
    assert "\n" not in message and "step 5" in message and "nan" in message and "keeps step 4" in message
    assert load_train_state(tmp_path / "latest")["step"] == 4
    weights = torch.load(tmp_path / "latest" / "toy.pt", weights_only=True)
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_a_step_does_not_sync_with_the_host(tmp_path, monkeypatch):
    """The loss stays on the device: reading values from tensors (item, tolist, float, bool)
    happens at log time, so 4 and 16 steps with log_every = max_steps read the same number."""
    counts = {"n": 0}
    for name in ("item", "tolist", "__float__", "__bool__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            counts["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)

    def reads(steps):
        counts["n"] = 0
        Trainer(config(tmp_path / str(steps), max_steps=steps, log_every=steps, eval_every=1000), Toy(),
                quiet=True).run()
        return counts["n"]

    assert reads(4) == reads(16)


@pytest.mark.parametrize("name", ["train.config", "train.core", "train.distributed", "train.metrics", "train.optim",
                                  "train.precision", "train.pretrain", "train.rng", "finetune.config",
                                  "finetune.instruct", "finetune.classify", "cli.options"])
def test_docstring_examples_run(name):
    import doctest
    import importlib

    module = importlib.import_module(f"scratchlm.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and (result.attempted > 0 or name == "train.task")
