"""`scratchlm posttrain dpo | grpo`: the post-training commands.

Both have one shape (``add_trainer``, ``_command``): the options come from the trainer's
config class (posttrain/config.py: DPOConfig; posttrain/grpo_config.py: GRPOConfig), like
`scratchlm train`'s and `finetune`'s; the command runs it and prints where the run ended
with its held-out score.
"""

from __future__ import annotations

from .options import add_config_file_option, add_config_options, config_from_args


def _config(name: str):
    """The trainer's config class (its module is light: building the parser imports it)."""
    if name == "dpo":
        from ..posttrain.config import DPOConfig

        return DPOConfig
    from ..posttrain.grpo_config import GRPOConfig

    return GRPOConfig


def _run(name: str):
    """The trainer's run function, imported only when the command runs."""
    if name == "dpo":
        from ..posttrain.dpo import dpo

        return dpo
    from ..posttrain.grpo import grpo

    return grpo


# name -> (the held-out metric and its label in the last line, help, description)
TRAINERS = {
    "dpo": ("val_reward_accuracy", "val_reward_accuracy",
            "preference tuning on pairs (prompt, chosen, rejected): DPO, IPO, SimPO",
            "Direct preference optimisation on a JSONL file of {prompt, chosen, rejected} (text, or chat "
            "messages). The reference model is a frozen copy of MODEL, or with --lora MODEL itself with its "
            "adapters off. Writes OUT/metrics.jsonl (val_reward_accuracy, ...) and OUT/latest, OUT/best."),
    "grpo": ("val_accuracy", "held-out accuracy",
             "GRPO: sample groups of answers, reward the right ones (arithmetic, GSM8K, your reward)",
             "Group Relative Policy Optimization on a verifiable task. Writes OUT/metrics.jsonl (reward, "
             "accuracy, KL, clip fraction, sampling / update time), OUT/samples.jsonl and OUT/latest, "
             "OUT/best (by held-out accuracy)."),
}


def add_commands(subparsers) -> None:
    pt = subparsers.add_parser("posttrain", help="post-training: preference tuning (DPO, IPO, SimPO) and RL with verifiable rewards (GRPO)",
                               description="Post-train a model: on preference pairs (dpo), or by reinforcement learning on a task whose answers a verifier checks (grpo).")
    sub = pt.add_subparsers(dest="trainer", metavar="TRAINER", required=True)
    for name in TRAINERS:
        add_trainer(sub, name)


def add_trainer(sub, name: str) -> None:
    _, _, help_text, description = TRAINERS[name]
    p = sub.add_parser(name, help=help_text, description=description)
    add_config_file_option(p)
    add_config_options(p, _config(name))
    p.set_defaults(func=_command)


def _command(args) -> int:
    from ..train.distributed import is_main_process

    metric, label = TRAINERS[args.trainer][:2]
    cfg = config_from_args(_config(args.trainer), args)
    result = _run(args.trainer)(cfg)
    if is_main_process():
        score = result.val.get(metric)
        shown = f", {label} {score:.3f}" if score is not None else ""
        print(f"{'interrupted' if result.interrupted else 'done'} at step {result.step}{shown}: {cfg.out_dir}/latest")
    return 130 if result.interrupted else 0
