"""`scratchlm finetune instruct|classify`, `scratchlm classify` and `scratchlm merge-lora`.

The options of the two fine-tuning commands come from their config classes
(finetune/config.py: InstructConfig, ClassifyConfig), like `scratchlm train`'s.
"""

from __future__ import annotations

import sys

from .options import add_config_file_option, add_config_options, config_from_args


def add_commands(subparsers) -> None:
    from ..finetune.config import ClassifyConfig, InstructConfig

    ft = subparsers.add_parser("finetune", help="instruction or classification fine-tuning (full or LoRA)",
                               description="Fine-tune a model directory on instructions or on labelled texts.")
    sub = ft.add_subparsers(dest="task", metavar="TASK", required=True)

    p = sub.add_parser("instruct", help="instruction tuning: answers only in the loss (alpaca / chat data)",
                       description="Alpaca JSON/JSONL (instruction, input, output) or chat JSONL (messages). "
                                   "The result records its prompt format in prompt_format.json.")
    add_config_file_option(p)
    add_config_options(p, InstructConfig)
    p.set_defaults(func=_instruct_command)

    c = sub.add_parser("classify", help="a new head for N classes on the last token (CSV: text,label)",
                       description="Classification fine-tuning: accuracy on train/val/test and a confusion "
                                   "matrix at the end (OUT/classification.json, OUT/confusion_matrix.txt).")
    add_config_file_option(c)
    add_config_options(c, ClassifyConfig)
    c.set_defaults(func=_classify_command)

    k = subparsers.add_parser("classify", help="label texts with a classifier from `finetune classify`")
    k.add_argument("classifier", help="classifier directory (e.g. runs/classify/latest)")
    k.add_argument("texts", nargs="+", help="texts to label ('-' reads one text per line from stdin)")
    k.add_argument("--base", default=None, help="base model of a LoRA classifier (default: the one it records)")
    k.set_defaults(func=_predict_command)

    m = subparsers.add_parser("merge-lora", help="fold a LoRA adapter into its base model (a plain model dir)")
    m.add_argument("base", help="base model directory")
    m.add_argument("adapter", help="adapter directory (adapter_config.json + adapter.safetensors)")
    m.add_argument("out", help="output model directory")
    m.set_defaults(func=_merge_command)


def _instruct_command(args) -> int:
    from ..finetune.config import InstructConfig
    from ..finetune.instruct import instruct
    from ..train.distributed import is_main_process

    cfg = config_from_args(InstructConfig, args)
    result = instruct(cfg)
    out = cfg.out_dir
    where = f"{out}/latest" + (f" (merged: {out}/merged)" if cfg.merge and cfg.lora else "")
    if is_main_process():
        print(f"{'interrupted' if result.interrupted else 'done'} at step {result.step}: {where}")
    return 130 if result.interrupted else 0


def _classify_command(args) -> int:
    from ..finetune.classify import classify_finetune
    from ..finetune.config import ClassifyConfig

    report = classify_finetune(config_from_args(ClassifyConfig, args))
    return 130 if report["interrupted"] else 0


def _predict_command(args) -> int:
    from ..finetune.classify import classify, load_classifier

    texts = [line.rstrip("\n") for line in sys.stdin if line.strip()] if args.texts == ["-"] else args.texts
    clf, tokenizer, labels = load_classifier(args.classifier, base_model=args.base)
    for text, label in zip(texts, classify(clf, tokenizer, labels, texts)):
        print(f"{label}\t{text}")
    return 0


def _merge_command(args) -> int:
    from pathlib import Path

    from ..chat import PROMPT_FORMAT_FILE
    from ..checkpoint import load_model, save_model
    from ..lora import load_adapter, merge_lora

    model, tokenizer = load_model(args.base)
    load_adapter(model, args.adapter)
    merge_lora(model)
    fmt = Path(args.adapter) / PROMPT_FORMAT_FILE

    def extra(tmp: Path):
        if fmt.is_file():
            (tmp / PROMPT_FORMAT_FILE).write_text(fmt.read_text())

    save_model(args.out, model, tokenizer, extra=extra, inputs=[args.base, args.adapter])
    print(f"merged {args.adapter} into {args.base}: {args.out}")
    return 0
