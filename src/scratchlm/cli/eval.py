"""`scratchlm eval MODEL --tasks ...`: the report card of a model (library: scratchlm.eval)."""

from __future__ import annotations

import json
import math
import sys

from . import UsageError


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="score a model on tasks: bits per byte, multiple choice, GSM8K, HumanEval",
        description="Evaluate MODEL on each task and print a table (or --json). A task is a local .jsonl "
                    "file (multiple choice in our layout or HellaSwag / ARC / PIQA / MMLU / LAMBADA / GSM8K "
                    "/ HumanEval layouts), 'humaneval', text to measure in bits per byte (a file, a folder, "
                    "a prepared data folder, python-docs[:val|:train], python-reference), or a hub task "
                    "name loaded through `datasets` when online (hellaswag, arc_easy, mmlu, gsm8k, ...).")
    p.add_argument("model", help="model directory, Hugging Face directory or id, or a preset")
    p.add_argument("--tasks", action="append", required=True, metavar="TASK[,TASK...]",
                   help="tasks, comma-separated or repeated")
    p.add_argument("--num-fewshot", type=int, default=0, help="solved examples before each question (default 0)")
    p.add_argument("--seed", type=int, default=1234, help="seed that picks the few-shot examples (default 1234)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N items of each task")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per forward pass (default 32)")
    p.add_argument("--chat", action="store_true",
                   help="chat model: multiple choice by answer letter and generation through the chat template")
    p.add_argument("--template", default=None, help="chat template (llama3, chatml, plain; default: the model's)")
    p.add_argument("--stride", type=int, default=None,
                   help="bits per byte: tokens predicted per window (default: the whole context)")
    p.add_argument("--samples", type=int, default=1, help="HumanEval: completions per problem (default 1)")
    p.add_argument("--temperature", type=float, default=0.0, help="HumanEval: sampling temperature (0: greedy)")
    p.add_argument("--k", default="1", help="HumanEval: pass@k values, comma-separated (default 1)")
    p.add_argument("--max-new-tokens", type=int, default=384, help="generative tasks: longest answer")
    p.add_argument("--timeout", type=float, default=5.0, help="HumanEval: seconds per program (default 5)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="run in this dtype (default: the checkpoint's)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of the table")
    p.add_argument("--out", default=None, metavar="DIR", help="write report.md, report.json and scores.png here")
    p.set_defaults(func=_eval_command)


def _eval_command(args) -> int:
    import torch

    from ..eval import load_model
    from ..eval.report import as_json, render_markdown, write_report
    from ..eval.runner import EvalOptions, run_tasks

    specs = [s.strip() for group in args.tasks for s in group.split(",") if s.strip()]
    if not specs:
        raise UsageError("--tasks names no task")
    for name, value in (("--num-fewshot", args.num_fewshot), ("--samples", args.samples - 1),
                        ("--batch-size", args.batch_size - 1), ("--max-new-tokens", args.max_new_tokens - 1),
                        ("--limit", 0 if args.limit is None else args.limit - 1)):  # --limit 0 is not "all"
        if value < 0:
            raise UsageError(f"{name} must be {'>= 0' if name == '--num-fewshot' else '>= 1'}")
    try:
        ks = tuple(int(k) for k in args.k.split(","))
    except ValueError:
        raise UsageError(f"--k takes integers, comma-separated: got {args.k!r}") from None
    if any(k < 1 or k > args.samples for k in ks):
        raise UsageError(f"every pass@k needs 1 <= k <= --samples ({args.samples}): got {args.k}")
    if not args.timeout > 0:  # nan included
        raise UsageError("--timeout must be > 0")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UsageError(f"--temperature must be a finite number >= 0 (0: greedy), got {args.temperature}")
    options = EvalOptions(num_fewshot=args.num_fewshot, seed=args.seed, limit=args.limit,
                          batch_size=args.batch_size, chat=args.chat, template=args.template,
                          stride=args.stride, samples=args.samples, temperature=args.temperature, k=ks,
                          max_new_tokens=args.max_new_tokens, timeout=args.timeout,
                          progress=sys.stderr.isatty())
    model, tokenizer = load_model(args.model, dtype=getattr(torch, args.dtype) if args.dtype else None)
    results = run_tasks(model, tokenizer, specs, options)
    config = {"tasks": specs, "num_fewshot": args.num_fewshot, "seed": args.seed, "limit": args.limit,
              "chat": args.chat, "stride": args.stride, "samples": args.samples, "temperature": args.temperature}
    if args.out:
        write_report(results, args.out, model=str(args.model), config=config)
    if args.json:
        print(json.dumps(as_json(results, str(args.model), config)))
    else:
        sys.stdout.write(render_markdown(results, str(args.model)))
        if args.out:
            print(f"\nreport written to {args.out}/report.md")
    return 0
