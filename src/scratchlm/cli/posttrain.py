"""`scratchlm posttrain grpo`: post-training commands (their options come from the config classes)."""

from __future__ import annotations

from .posttrain_grpo import add_grpo


def add_commands(subparsers) -> None:
    pt = subparsers.add_parser("posttrain", help="post-training: reinforcement learning with verifiable rewards",
                               description="Post-train a model.")
    sub = pt.add_subparsers(dest="method", metavar="METHOD", required=True)
    add_grpo(sub)
