"""Training: one core loop (core.py) that every task plugs into.

    config.py       the one config mechanism (typed dataclasses, YAML/TOML, overrides); LoopConfig
    precision.py    the device and the autocast dtype
    distributed.py  torchrun processes, DDP / FSDP2, the whole state for saving
    optim.py        AdamW parameter groups and the warmup + cosine schedule
    core.py         the loop: Task, Trainer, checkpoints with exact resume, metrics.jsonl
    pretrain.py     pretraining on token shards as a task: TrainConfig, train()
    demo.py         `scratchlm demo`

Fine-tuning (instruction tuning, classification) are tasks too: ../finetune/.
Guides: docs/training.md, docs/scaling.md.
"""

from .config import Config, LoopConfig, option, read_config_file
from .core import Run, StopFlag, Task, Trainer, TrainingDiverged, TrainResult, eval_mode
from .demo import DEMO_CONFIG, DEMO_MINUTES, DEMO_TOKENIZER, demo, pick_threads
from .distributed import Processes, all_reduce_values, init_processes, is_main_process
from .optim import lr_at, make_optimizer, param_groups
from .precision import autocast_dtype, cpu_has_fast_bf16, pick_device
from .pretrain import PretrainConfig, PretrainTask, TrainConfig, make_trainer, model_config_for, train

__all__ = ["Config", "LoopConfig", "option", "read_config_file", "Run", "StopFlag", "Task", "Trainer",
           "TrainingDiverged", "TrainResult", "eval_mode", "DEMO_CONFIG", "DEMO_MINUTES", "DEMO_TOKENIZER", "demo",
           "pick_threads", "Processes", "all_reduce_values", "init_processes", "is_main_process", "lr_at",
           "make_optimizer", "param_groups", "autocast_dtype", "cpu_has_fast_bf16", "pick_device",
           "PretrainConfig", "PretrainTask", "TrainConfig", "make_trainer", "model_config_for", "train"]
