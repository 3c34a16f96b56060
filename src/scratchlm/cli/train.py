"""`scratchlm train` (pretraining on prepared shards) and `scratchlm demo`."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .options import add_config_file_option, add_config_options, config_from_args


def add_commands(subparsers) -> None:
    from ..train.demo import DEMO_MINUTES
    from ..train.pretrain import TrainConfig

    p = subparsers.add_parser(
        "train", help="pretrain a model on prepared token shards",
        description="Train a Transformer on shards written by `scratchlm prepare`. Options come from "
                    "their defaults, then --config FILE (YAML or TOML), then the command line. "
                    "Launch with `torchrun --nproc_per_node N -m scratchlm.cli train ...` for DDP/FSDP2.")
    add_config_file_option(p)
    add_config_options(p, TrainConfig)
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
    d.add_argument("--config", default=None, metavar="FILE",
                   help="YAML or TOML file of `scratchlm train` options that change the demo's (default: none)")
    d.set_defaults(func=_demo_command)


def _train_command(args) -> int:
    from ..train.config import task_list
    from ..train.pretrain import TrainConfig, train

    cfg = config_from_args(TrainConfig, args)
    eval_hook = None
    if cfg.eval_tasks:  # eval sits above train: the hook is built here and handed down
        from ..eval.train_hook import training_eval_hook

        eval_hook = training_eval_hook(task_list(cfg.eval_tasks), cfg.out_dir)
    result = train(cfg, eval_hook=eval_hook)
    if int(os.environ.get("RANK", "0")) == 0:
        where = Path(cfg.out_dir)
        if result.val_loss is not None:
            print(f"step {result.step}: val loss {result.val_loss:.4f} ({result.val_bpb:.3f} bits/byte); "
                  f"model in {where / 'latest'}, best in {where / 'best'}")
        if result.interrupted:
            print(f"interrupted: saved {where / 'latest'}; continue with --resume", file=sys.stderr)
            return 130
    return 0


def _demo_command(args) -> int:
    from ..eval.train_hook import training_eval_hook
    from ..train.config import read_config_file, task_list
    from ..train.demo import DEMO_EVAL_TASKS, demo

    overrides = read_config_file(args.config) if args.config else None
    tasks = task_list((overrides or {}).get("eval_tasks") or DEMO_EVAL_TASKS)
    result = demo(args.minutes, args.out, args.data, args.threads, overrides=overrides,
                  eval_hook=training_eval_hook(tasks, args.out, model_name="the demo model"))
    return 130 if result.interrupted else 0
