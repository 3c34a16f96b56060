"""`scratchlm finetune instruct|classify`, `scratchlm classify` and `scratchlm merge-lora`."""

from __future__ import annotations

import argparse

from ..chat import TEMPLATES


def _loop_arguments(p: argparse.ArgumentParser, lr: float, epochs: float) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--out", default=None, help="run folder (metrics.jsonl, loss.png, latest/, best/)")
    g.add_argument("--epochs", type=float, default=epochs, help=f"passes over the training set (default {epochs})")
    g.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    g.add_argument("--batch-size", type=int, default=8, help="examples per micro-batch, per process")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default {lr}; 1e-3 with --lora)")
    g.add_argument("--min-lr", type=float, default=0.0, help="learning rate at the end of the cosine decay")
    g.add_argument("--warmup-steps", type=int, default=10)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--eval-every", type=int, default=50, help="validate (and print samples) every N steps")
    g.add_argument("--save-every", type=int, default=200, help="write latest/ every N steps (and at the end)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--resume", action="store_true", help="continue OUT/latest exactly (weights, optimizer, step)")
    g.add_argument("--precision", default="fp32", choices=["auto", "bf16", "fp32"])
    g.add_argument("--device", default="auto")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    lo = p.add_argument_group("LoRA")
    lo.add_argument("--lora", action="store_true", help="train LoRA adapters instead of the weights")
    lo.add_argument("--lora-rank", type=int, default=8)
    lo.add_argument("--lora-alpha", type=float, default=16.0)
    lo.add_argument("--lora-dropout", type=float, default=0.0)
    lo.add_argument("--lora-targets", default="qkv_proj,out_proj",
                    help="comma-separated layers: qkv_proj, out_proj, gate_proj, up_proj, down_proj, lm_head "
                         "(or full names / glob patterns like 'blocks.11.*')")


def _loop_options(args, default_lr: float) -> dict:
    lr = args.lr if args.lr is not None else (1e-3 if args.lora else default_lr)
    return dict(epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                lr=lr, min_lr=min(args.min_lr, lr), warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
                grad_clip=args.grad_clip, eval_every=args.eval_every, save_every=args.save_every, seed=args.seed,
                resume=args.resume, precision=args.precision, device=args.device, progress=not args.no_progress)


def _lora_config(args):
    if not args.lora:
        return None
    from ..lora import LoRAConfig

    return LoRAConfig(rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout, targets=args.lora_targets)


def add_commands(subparsers) -> None:
    ft = subparsers.add_parser("finetune", help="instruction or classification fine-tuning (full or LoRA)",
                               description="Fine-tune a model directory on instructions or on labelled texts.")
    sub = ft.add_subparsers(dest="task", metavar="TASK", required=True)

    p = sub.add_parser("instruct", help="instruction tuning: answers only in the loss (alpaca / chat data)",
                       description="Alpaca JSON/JSONL (instruction, input, output) or chat JSONL (messages). "
                                   "The result records its prompt format in prompt_format.json.")
    p.add_argument("model", help="model directory to start from")
    p.add_argument("--data", required=True, help="instruction file (.json array or .jsonl)")
    p.add_argument("--val-data", default=None, help="validation file (default: --val-fraction of --data)")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--template", default="auto", choices=["auto", *TEMPLATES],
                   help="prompt format (auto: the model's recorded or chat template, else alpaca)")
    p.add_argument("--train-on-prompt", action="store_true", help="also put the prompt tokens in the loss")
    p.add_argument("--packing", action="store_true", help="pack several examples per row (less padding)")
    p.add_argument("--samples", type=int, default=2, help="validation prompts answered at each evaluation")
    p.add_argument("--sample-tokens", type=int, default=64)
    p.add_argument("--merge", action="store_true", help="with --lora: also write OUT/merged, adapters folded in")
    _loop_arguments(p, lr=1e-4, epochs=3.0)
    p.set_defaults(func=_instruct_command)

    c = sub.add_parser("classify", help="a new head for N classes on the last token (CSV: text,label)",
                       description="Classification fine-tuning: accuracy on train/val/test and a confusion "
                                   "matrix at the end (OUT/classification.json, OUT/confusion_matrix.txt).")
    c.add_argument("model", help="model directory to start from")
    c.add_argument("--data", required=True, help="CSV file with a header (see --text-column, --label-column)")
    c.add_argument("--val-data", default=None)
    c.add_argument("--test-data", default=None)
    c.add_argument("--val-fraction", type=float, default=0.1, help="without --val-data/--test-data")
    c.add_argument("--test-fraction", type=float, default=0.1)
    c.add_argument("--text-column", default="text")
    c.add_argument("--label-column", default="label")
    c.add_argument("--labels", default=None, help="comma-separated label set (default: the labels of --data)")
    c.add_argument("--train", default="head",
                   help="what trains: 'head', N (head + last N blocks), 'all' (ignored with --lora)")
    _loop_arguments(c, lr=5e-4, epochs=3.0)
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
    from .instruct import finetune_instruct, is_main_process

    out = args.out or "runs/instruct"
    result = finetune_instruct(args.model, args.data, out, template=None if args.template == "auto" else args.template,
                               train_on_prompt=args.train_on_prompt, packing=args.packing,
                               val_fraction=args.val_fraction, val_data=args.val_data, lora=_lora_config(args),
                               merge=args.merge, n_samples=args.samples, sample_tokens=args.sample_tokens,
                               **_loop_options(args, 1e-4))
    where = f"{out}/latest" + (f" (merged: {out}/merged)" if args.merge and args.lora else "")
    if is_main_process():
        print(f"{'interrupted' if result.interrupted else 'done'} at step {result.step}: {where}")
    return 130 if result.interrupted else 0


def _classify_command(args) -> int:
    from .classify import finetune_classify

    train = args.train if args.train in ("head", "all") else _int(args.train, "--train")
    labels = [x.strip() for x in args.labels.split(",") if x.strip()] if args.labels else None
    report = finetune_classify(args.model, args.data, args.out or "runs/classify", train=train, labels=labels,
                               text_column=args.text_column, label_column=args.label_column,
                               val_data=args.val_data, test_data=args.test_data, val_fraction=args.val_fraction,
                               test_fraction=args.test_fraction, lora=_lora_config(args),
                               **_loop_options(args, 5e-4))
    return 130 if report["interrupted"] else 0


def _int(text: str, option: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{option} must be 'head', 'all' or a number of blocks, got {text!r}") from None


def _predict_command(args) -> int:
    import sys

    from .classify import classify, load_classifier

    texts = [line.rstrip("\n") for line in sys.stdin if line.strip()] if args.texts == ["-"] else args.texts
    clf, tokenizer, labels = load_classifier(args.classifier, base_model=args.base)
    for text, label in zip(texts, classify(clf, tokenizer, labels, texts)):
        print(f"{label}\t{text}")
    return 0


def _merge_command(args) -> int:
    from pathlib import Path

    from ..checkpoint import load_model, save_model
    from ..lora import load_adapter, merge_lora
    from ..chat import PROMPT_FORMAT_FILE

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
