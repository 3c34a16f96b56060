"""Fine-tuning: instruction tuning with a masked loss, classification, and LoRA.

    instruct_data.py  instruction files -> masked examples -> padded / packed batches
    instruct.py       `scratchlm finetune instruct`
    classify.py       `scratchlm finetune classify`
    loop.py           the loop both use (schedule, optimizer, checkpoints from train.py)
    cli.py            the commands, and `scratchlm merge-lora`
    ../lora.py        the adapters
    ../chat.py        the prompt formats (alpaca, llama3, chatml, ...) and prompt_format.json

Guides: docs/instruction-tuning.md, docs/classification.md, docs/lora.md.
"""

from .classify import Classifier, classify, finetune_classify, load_classifier
from .cli import add_commands
from .instruct import answer, finetune_instruct, masked_loss
from .instruct_data import IGNORE_INDEX, DataError, Example, collate, load_records, pack, tokenize_example
from ..chat import PROMPT_FORMAT_FILE, TEMPLATES, format_prompt, read_prompt_format, render_example

__all__ = ["finetune_instruct", "finetune_classify", "Classifier", "classify", "load_classifier", "answer",
           "masked_loss", "IGNORE_INDEX", "DataError", "Example", "collate", "load_records", "pack",
           "tokenize_example", "PROMPT_FORMAT_FILE", "TEMPLATES", "format_prompt", "read_prompt_format",
           "render_example", "add_commands"]
