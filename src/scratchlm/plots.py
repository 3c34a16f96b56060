"""Plots that explain a run: loss curves, a GRPO run's accuracy (and, from other parts,
KV-cache timing, attention maps).

matplotlib with the Agg backend: files only, no window, works on a server.

>>> import tempfile, json, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> rows = [{"kind": "train", "tokens": 1000 * i, "train_loss": 5.0 / i} for i in range(1, 5)]
>>> rows.append({"kind": "eval", "tokens": 4000, "train_loss": 1.3, "val_loss": 1.5})
>>> _ = (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\\n" for r in rows))
>>> plot_loss(d / "metrics.jsonl", d / "loss.png").exists()
True
>>> grpo_rows = [{"kind": "train", "step": i, "accuracy": i / 10} for i in range(1, 5)]
>>> plot_rewards(grpo_rows + [{"kind": "eval", "step": 4, "val_accuracy": 0.5}], d / "grpo.png", baseline=0.1).exists()
True
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl file (one JSON object per line).

    A last line that does not parse is a record torn by a crash in the middle of its write:
    it is left out. A bad line anywhere else means the file was damaged: a ScratchLMError
    naming the file and the line.
    """
    from .errors import ScratchLMError

    lines = Path(path).read_text().splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):  # torn
                break
            raise ScratchLMError(f"{path} line {number} is not valid JSON ({e.msg}): the file is damaged") from None
        if not isinstance(row, dict):
            raise ScratchLMError(f"{path} line {number} is not a JSON object: the file is damaged")
        rows.append(row)
    return rows


def plot_loss(metrics: str | os.PathLike | list[dict], out: str | os.PathLike, title: str = "") -> Path:
    """Train and validation loss against tokens seen, written as a PNG to ``out``.

    The train curve is noisy (one point per logged batch); the validation points are few
    but measured on the same held-out text each time, so they are the ones to compare.
    A validation curve that turns up while the train curve keeps falling is overfitting.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics) if not isinstance(metrics, list) else metrics
    train = [(r["tokens"], r["train_loss"]) for r in rows if r.get("kind") == "train"]
    val = [(r["tokens"], r["val_loss"]) for r in rows if r.get("kind") == "eval" and "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), color="tab:blue", alpha=0.6, lw=1, label="train (batch)")
    if val:
        ax.plot(*zip(*val), color="tab:orange", marker="o", ms=3, lw=1.5, label="validation")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("cross-entropy loss (nats / token)")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _save(fig, out)


def plot_rewards(metrics: str | os.PathLike | list[dict], out: str | os.PathLike, baseline: float | None = None,
                 title: str = "") -> Path:
    """A GRPO run (posttrain/grpo.py) against optimizer steps: the share of right answers
    among the step's samples (noisy: a few prompts, sampled at temperature), its running
    mean over 10 steps, and the held-out accuracy (greedy, the same problems every time),
    with ``baseline`` (e.g. always giving the commonest answer) as a dashed line.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics) if not isinstance(metrics, list) else metrics
    train = [(r["step"], r["accuracy"]) for r in rows if r.get("kind") == "train" and "accuracy" in r]
    val = [(r["step"], r["val_accuracy"]) for r in rows if r.get("kind") == "eval" and "val_accuracy" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        steps, acc = zip(*train)
        ax.plot(steps, acc, color="tab:blue", alpha=0.3, lw=1, label="samples right (per step)")
        smooth = [sum(acc[max(0, i - 9):i + 1]) / len(acc[max(0, i - 9):i + 1]) for i in range(len(acc))]
        ax.plot(steps, smooth, color="tab:blue", lw=1.5, label="samples right (mean of 10 steps)")
    if val:
        ax.plot(*zip(*val), color="tab:orange", marker="o", ms=4, lw=1.5, label="held-out accuracy (greedy)")
    if baseline is not None:
        ax.axhline(baseline, color="grey", ls="--", lw=1, label="always the commonest answer")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("share of right answers")
    ax.set_ylim(0, 1)
    ax.set_title(title or "GRPO")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return _save(fig, out)


def plot_kv_cache(lengths: list[int], with_cache: dict[str, list[float]], without_cache: dict[str, list[float]],
                  out: str | os.PathLike, title: str = "") -> Path:
    """Two panels against sequence length: the time of one decode step, and the total time
    to generate the whole sequence, each with and without the KV cache.

    ``with_cache`` / ``without_cache`` map "step" and "total" to seconds, one per length.
    Without a cache each step re-reads the whole sequence, so a step grows with the length
    and the total grows with its square; with the cache a step is nearly flat.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    for ax, key, label in ((axes[0], "step", "time of one step (ms)"), (axes[1], "total", "total time (s)")):
        scale = 1000.0 if key == "step" else 1.0
        ax.plot(lengths, [t * scale for t in without_cache[key]], "o-", color="tab:red", label="no cache")
        ax.plot(lengths, [t * scale for t in with_cache[key]], "o-", color="tab:green", label="KV cache")
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_title("one new token")
    axes[1].set_title("the whole sequence")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, out)


def plot_sampling(logits, out: str | os.PathLike, show: int = 12) -> Path:
    """How temperature, top-k, top-p and min-p reshape one next-token distribution.

    ``logits`` is a 1-D tensor; for the ``show`` most likely tokens, a grey bar is the
    probability before and a blue bar after (no blue bar: the filter dropped the token).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from .sampling import min_p_filter, top_k_filter, top_p_filter

    logits = torch.as_tensor(logits, dtype=torch.float32)
    order = logits.argsort(descending=True)[:show]
    base = logits.softmax(-1)
    panels = [("temperature 1 (the model)", logits), ("temperature 0.5", logits / 0.5),
              ("temperature 2", logits / 2.0), ("top-k = 4", top_k_filter(logits, 4)),
              ("top-p = 0.8", top_p_filter(logits, 0.8)), ("min-p = 0.2", min_p_filter(logits, 0.2))]
    fig, axes = plt.subplots(2, 3, figsize=(11, 5.5), dpi=110, sharey=True)
    x = range(len(order))
    for ax, (name, shaped) in zip(axes.flat, panels):
        probs = shaped.softmax(-1)[order]
        kept = torch.isfinite(shaped[order])
        ax.bar([i - 0.2 for i in x], base[order], width=0.4, color="lightgrey", label="before")
        ax.bar([i + 0.2 for i in x], torch.where(kept, probs, torch.zeros_like(probs)), width=0.4,
               color="tab:blue", label="after")
        ax.set_title(name)
        ax.set_xticks(list(x))
        ax.set_xticklabels([str(i + 1) for i in x], fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    axes[0, 0].legend()
    for ax in axes[:, 0]:
        ax.set_ylabel("probability")
    for ax in axes[1]:
        ax.set_xlabel("token, by rank")
    fig.tight_layout()
    return _save(fig, out)


def _save(fig, out: str | os.PathLike) -> Path:
    """Write ``fig`` to ``out`` (making its folder) and free it."""
    import matplotlib.pyplot as plt

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
