"""Post-training: preference tuning (DPO and its relatives) and, beside it, reinforcement
learning with verifiable rewards (GRPO).

    config.py           DPOConfig: fine-tuning's options + the objective (loss, beta, ...)
    preference_data.py  pairs (prompt, chosen, rejected) -> masked rows -> batches of 2B rows
    dpo.py              the objectives (DPO, robust DPO, hinge, IPO, SimPO) and DPOTask
    ../shared_prompt.py rows that share a prompt (a pair, a group) run it through the model once
    ../train/core.py    the loop they plug into (schedule, optimizer, DDP, checkpoints, resume)
    grpo_config.py      GRPOConfig: the loop's options + sampling, clipping, KL, loss type
    rewards.py          verifiable tasks (arithmetic, GSM8K files, a user function) and rewards
    grpo.py             group-relative advantages, the clipped objective and GRPOTask
    ../cli/posttrain.py the `scratchlm posttrain` commands
    ../lora.py          the adapters; adapters_disabled(model) is DPO's reference with --lora

Guides: docs/preference-tuning.md, docs/reinforcement-learning.md.
"""

from .config import DPOConfig
from .dpo import DPOTask, dpo, dpo_loss, pair_metrics, preference_loss, sequence_logps, train_dpo
from .preference_data import DataError, Pair, collate_pairs, load_pairs, make_pairs, tokenize_pair

__all__ = ["DPOConfig", "DPOTask", "dpo", "dpo_loss", "train_dpo", "preference_loss", "pair_metrics", "sequence_logps",
           "DataError", "Pair", "collate_pairs", "load_pairs", "make_pairs", "tokenize_pair"]
