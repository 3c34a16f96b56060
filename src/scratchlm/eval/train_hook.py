"""Scoring a model while it trains: the eval hook that ``--eval-tasks`` asks for.

The training core (train/core.py) knows nothing of evaluation: eval sits above train in
the layers, so train may not import it. The core takes a *hook* instead, a function
``(model, tokenizer, step, final) -> scores``, and calls it at the end of training and
every ``eval_tasks_every`` steps. ``training_eval_hook`` builds the one that runs
``scratchlm eval``'s tasks: the task files are read once, up front (a bad task name fails
before the first training step), and each call

- scores the model on every task (runner.py), with the model as it is at that step;
- writes the report card (report.md, report.json, scores.png) to ``RUN_DIR/eval`` at the
  end, ``RUN_DIR/eval/step-N`` before it;
- returns each task's main score, ``{"TASK/METRIC": value}``, which the core writes to
  ``metrics.jsonl`` as an ``eval_tasks`` row.

>>> import json, tempfile
>>> from pathlib import Path
>>> from scratchlm.eval import load_model
>>> run = Path(tempfile.mkdtemp())
>>> _ = (run / "yesno.jsonl").write_text(json.dumps({"context": "Is it?", "choices": [" yes", " no"], "label": 0}))
>>> hook = training_eval_hook([str(run / "yesno.jsonl")], run)
>>> model, tokenizer = load_model("gpt-tiny")
>>> scores = hook(model, tokenizer, 10, True)
>>> list(scores), sorted(p.name for p in (run / "eval").iterdir())
(['yesno/acc'], ['report.json', 'report.md', 'scores.png'])
"""

from __future__ import annotations

import os
from pathlib import Path

from .report import write_report
from .runner import EvalOptions, plan_tasks, run_tasks


def training_eval_hook(specs: list[str], run_dir: str | os.PathLike, options: EvalOptions | None = None,
                       model_name: str = ""):
    """The hook for ``Trainer(..., eval_hook=...)``: scores ``specs`` and writes the report."""
    planned = plan_tasks(list(specs))  # read and checked now, before training starts
    options = options or EvalOptions(batch_size=8)
    run_dir = Path(run_dir)

    def hook(model, tokenizer, step: int, final: bool) -> dict:
        results = run_tasks(model, tokenizer, planned, options)
        out = run_dir / "eval" if final else run_dir / "eval" / f"step-{step}"
        write_report(results, out, model=f"{model_name or run_dir.name} at step {step}",
                     config={"tasks": list(specs), "step": step})
        return {f"{r.name}/{r.main_metric}": r.metrics[r.main_metric] for r in results}

    return hook


__all__ = ["training_eval_hook"]
