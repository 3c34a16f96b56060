"""Post-training: reinforcement learning with verifiable rewards (grpo.py, rewards.py)."""
