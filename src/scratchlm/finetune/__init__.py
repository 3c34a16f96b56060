"""Fine-tuning: instruction tuning with a masked loss, classification, and LoRA.

    config.py         InstructConfig, ClassifyConfig: the training core's LoopConfig + the data, LoRA
    instruct_data.py  instruction files -> masked examples -> padded / packed batches
    instruct.py       InstructTask: `scratchlm finetune instruct`
    classify.py       ClassifyTask: `scratchlm finetune classify`
    ../train/core.py  the loop both plug into (schedule, optimizer, DDP/FSDP2, checkpoints, resume)
    ../cli/finetune.py  the commands, and `scratchlm merge-lora`
    ../lora.py        the adapters
    ../chat.py        the prompt formats (alpaca, llama3, chatml, ...) and prompt_format.json

Guides: docs/instruction-tuning.md, docs/classification.md, docs/lora.md.
"""

from ..chat import PROMPT_FORMAT_FILE, TEMPLATES, format_prompt, read_prompt_format, render_example
from .classify import Classifier, ClassifyTask, classify, classify_finetune, finetune_classify, load_classifier
from .config import ClassifyConfig, FinetuneConfig, InstructConfig
from .instruct import InstructTask, answer, finetune_instruct, instruct, masked_loss
from .instruct_data import IGNORE_INDEX, DataError, Example, collate, load_records, pack, tokenize_example

__all__ = ["finetune_instruct", "instruct", "InstructTask", "InstructConfig", "finetune_classify",
           "classify_finetune", "ClassifyTask", "ClassifyConfig", "FinetuneConfig", "Classifier", "classify",
           "load_classifier", "answer", "masked_loss", "IGNORE_INDEX", "DataError", "Example", "collate",
           "load_records", "pack", "tokenize_example", "PROMPT_FORMAT_FILE", "TEMPLATES", "format_prompt",
           "read_prompt_format", "render_example"]
