"""The report card: report.md (a table per task), report.json (every number) and a bar chart.

For each task the table gives its main score, the score a random guesser gets (the
baseline: 1/4 on four choices) and the *centered* score, (score - baseline) / (1 -
baseline), which puts every task on one scale: 0 is chance, 1 is perfect, below 0 is
worse than guessing (nanochat's CORE is the mean centered score). Bits per byte has no
baseline: lower is better, and it is comparable between models with different tokenizers.

>>> import tempfile
>>> from scratchlm.eval.multiple_choice import TaskResult
>>> results = [TaskResult("toy", "multiple_choice", {"acc": 0.75, "acc_norm": 0.5, "items": 4}, 0.25)]
>>> out = write_report(results, tempfile.mkdtemp(), model="demo")
>>> sorted(p.name for p in out.iterdir())
['report.json', 'report.md', 'scores.png']
>>> print(render_markdown(results, "demo").splitlines()[4])
| toy | multiple_choice | acc | 0.7500 | 0.2500 | 0.6667 | 4 |
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .multiple_choice import TaskResult


def summary(results: list[TaskResult]) -> dict:
    """The mean centered score over the tasks that have one (CORE-style)."""
    centered = [r.centered for r in results if r.centered is not None]
    return {"centered_mean": sum(centered) / len(centered) if centered else None, "tasks": len(results)}


def as_json(results: list[TaskResult], model: str = "", config: dict | None = None,
            details: bool = False) -> dict:
    out = {"model": model,
           "results": {r.name: dict(r.metrics, kind=r.kind, baseline=r.baseline, centered=r.centered)
                       for r in results},
           "summary": summary(results), "config": config or {}}
    if details:
        out["details"] = {r.name: r.details for r in results}
    return out


def render_markdown(results: list[TaskResult], model: str = "") -> str:
    lines = [f"# Evaluation of {model}" if model else "# Evaluation", "",
             "| task | kind | metric | score | random baseline | centered | items |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in results:
        metric = r.main_metric
        centered = "" if r.centered is None else f"{r.centered:.4f}"
        baseline = "" if metric == "bits_per_byte" else f"{r.baseline:.4f}"
        lines.append(f"| {r.name} | {r.kind} | {metric} | {r.metrics[metric]:.4f} | {baseline} | {centered} "
                     f"| {r.metrics['items']} |")
    s = summary(results)
    if s["centered_mean"] is not None:
        lines += ["", f"Mean centered score (CORE-style): **{s['centered_mean']:.4f}**"]
    for r in results:  # every other number of each task
        extra = {k: v for k, v in r.metrics.items() if k not in (r.main_metric, "items")}
        if extra:
            lines += ["", f"## {r.name}", ""] + [f"- {k}: {_fmt(v)}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def plot_scores(results: list[TaskResult], out: str | os.PathLike, title: str = "") -> Path:
    """Bars of the centered scores (bits per byte on its own axis), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [r for r in results if r.centered is not None]
    bpb = [r for r in results if r.main_metric == "bits_per_byte"]
    panels = [p for p in (scored, bpb) if p] or [[]]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 + 1.2 * len(results), 3.5), squeeze=False)
    for ax, group in zip(axes[0], panels):
        if group is bpb and bpb:
            ax.bar([r.name for r in group], [r.metrics["bits_per_byte"] for r in group], color="tab:orange")
            ax.set_ylabel("bits per byte (lower is better)")
        else:
            ax.bar([r.name for r in group], [r.centered for r in group], color="tab:blue")
            ax.axhline(0, color="gray", linewidth=0.8)
            ax.set_ylabel("centered score (0 = chance, 1 = perfect)")
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(title or "evaluation")
    fig.tight_layout()
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out)
    return out


def write_report(results: list[TaskResult], out_dir: str | os.PathLike, model: str = "",
                 config: dict | None = None) -> Path:
    """Write report.md, report.json (with per-item details) and scores.png into ``out_dir``;
    each file appears whole or not at all."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_text(out / "report.json", json.dumps(as_json(results, model, config, details=True), indent=2) + "\n")
    _atomic_text(out / "report.md", render_markdown(results, model))
    plot_scores(results, out / "scores.png", title=model)
    return out


def _atomic_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
