"""`scratchlm posttrain dpo | grpo`: the post-training commands.

Each subcommand is one ``add_*`` function: its options come from its config class
(posttrain/config.py: DPOConfig; posttrain/grpo_config.py: GRPOConfig), like `scratchlm train`'s and `finetune`'s.
"""

from __future__ import annotations

from .options import add_config_file_option, add_config_options, config_from_args
from .posttrain_grpo import add_grpo


def add_commands(subparsers) -> None:
    pt = subparsers.add_parser("posttrain", help="post-training: preference tuning (DPO, IPO, SimPO) and RL with verifiable rewards (GRPO)",
                               description="Post-train a model: on preference pairs (dpo), or by reinforcement learning on a task whose answers a verifier checks (grpo).")
    sub = pt.add_subparsers(dest="trainer", metavar="TRAINER", required=True)
    add_dpo(sub)
    add_grpo(sub)


def add_dpo(sub) -> None:
    from ..posttrain.config import DPOConfig

    p = sub.add_parser("dpo", help="preference tuning on pairs (prompt, chosen, rejected): DPO, IPO, SimPO",
                       description="Direct preference optimisation on a JSONL file of {prompt, chosen, rejected} "
                                   "(text, or chat messages). The reference model is a frozen copy of MODEL, or "
                                   "with --lora MODEL itself with its adapters off. Writes OUT/metrics.jsonl "
                                   "(val_reward_accuracy, ...) and OUT/latest, OUT/best.")
    add_config_file_option(p)
    add_config_options(p, DPOConfig)
    p.set_defaults(func=_dpo_command)


def _dpo_command(args) -> int:
    from ..posttrain.config import DPOConfig
    from ..posttrain.dpo import dpo
    from ..train.distributed import is_main_process

    cfg = config_from_args(DPOConfig, args)
    result = dpo(cfg)
    if is_main_process():
        accuracy = result.val.get("val_reward_accuracy")
        shown = f", val_reward_accuracy {accuracy:.3f}" if accuracy is not None else ""
        print(f"{'interrupted' if result.interrupted else 'done'} at step {result.step}{shown}: {cfg.out_dir}/latest")
    return 130 if result.interrupted else 0
