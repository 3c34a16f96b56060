"""Plots that explain a run: loss curves (and, from other parts, KV-cache timing, attention maps).

matplotlib with the Agg backend: files only, no window, works on a server.

>>> import tempfile, json, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> rows = [{"kind": "train", "tokens": 1000 * i, "train_loss": 5.0 / i} for i in range(1, 5)]
>>> rows.append({"kind": "eval", "tokens": 4000, "train_loss": 1.3, "val_loss": 1.5})
>>> _ = (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\\n" for r in rows))
>>> plot_loss(d / "metrics.jsonl", d / "loss.png").exists()
True
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl file (one JSON object per line)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            rows.append(json.loads(line))
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
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
