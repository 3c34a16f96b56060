"""`scratchlm posttrain grpo MODEL --task TASK --out DIR`: its options are GRPOConfig's fields
(posttrain/grpo_config.py)."""

from __future__ import annotations

from .options import add_config_file_option, add_config_options, config_from_args


def add_grpo(subparsers) -> None:
    from ..posttrain.grpo_config import GRPOConfig

    p = subparsers.add_parser(
        "grpo", help="GRPO: sample groups of answers, reward the right ones (arithmetic, GSM8K, your reward)",
        description="Group Relative Policy Optimization on a verifiable task. Writes OUT/metrics.jsonl "
                    "(reward, accuracy, KL, clip fraction, sampling / update time), OUT/samples.jsonl and "
                    "OUT/latest, OUT/best (by held-out accuracy).")
    add_config_file_option(p)
    add_config_options(p, GRPOConfig)
    p.set_defaults(func=_grpo_command)


def _grpo_command(args) -> int:
    from ..posttrain.grpo import grpo
    from ..posttrain.grpo_config import GRPOConfig
    from ..train.distributed import is_main_process

    cfg = config_from_args(GRPOConfig, args)
    result = grpo(cfg)
    if is_main_process():
        accuracy = result.val.get("val_accuracy")
        shown = f", held-out accuracy {accuracy:.3f}" if accuracy is not None else ""
        print(f"{'interrupted' if result.interrupted else 'done'} at step {result.step}{shown}: {cfg.out_dir}/latest")
    return 130 if result.interrupted else 0
