"""Classification fine-tuning: a pretrained model + a new head that picks one of N labels.

    text -> ids (B, T) -> backbone(ids, return_hidden=True) -> hidden (B, T, d_model)
         -> hidden at each row's last real token (B, d_model) -> head -> logits (B, N)

Why the last token: attention is causal, so the last token is the only one that has seen
the whole text. Rows are right-padded, so the padding comes after it and never reaches it.

What trains (``train``): "head" (the backbone is a fixed feature extractor: fastest),
an integer N (the head, the last N blocks and the final norm), "all", or LoRA adapters on
the backbone plus the head.

A classifier directory is a model directory (or, with LoRA, an adapter directory) plus
``classifier.json`` (the labels) and ``classifier.safetensors`` (the head).

>>> import torch
>>> from scratchlm import ModelConfig, Transformer
>>> clf = Classifier(Transformer(ModelConfig.preset("gpt-tiny")), n_classes=3)
>>> ids = torch.tensor([[5, 6, 7], [8, 9, 0]])        # row 2 is 2 tokens + 1 padding
>>> clf(ids, lengths=torch.tensor([3, 2])).shape
torch.Size([2, 3])
"""

from __future__ import annotations

import csv
import json
import os
import random
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..checkpoint import load_model, load_train_state, save_model, save_train_state
from ..lora import LoRAConfig, apply_lora, count_parameters, is_adapter_dir, load_adapter, read_adapter_config, save_adapter
from .instruct import is_main_process, load_base
from .instruct_data import DataError
from .loop import Finetuner, LoopConfig

CLASSIFIER_CONFIG = "classifier.json"
CLASSIFIER_WEIGHTS = "classifier.safetensors"


class Classifier(nn.Module):
    """A Transformer backbone and a linear head on the hidden state of the last real token."""

    def __init__(self, backbone: nn.Module, n_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.d_model, n_classes)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """ids (B, T) right-padded, lengths (B,) real tokens per row -> logits (B, n_classes)."""
        hidden = self.backbone(ids, return_hidden=True)  # (B, T, d_model), after the final norm
        last = hidden[torch.arange(ids.shape[0], device=ids.device), lengths.to(ids.device) - 1]  # (B, d_model)
        return self.head(last)


def choose_trainable(clf: Classifier, train: Union[str, int], lora: Optional[LoRAConfig] = None) -> None:
    """Set requires_grad: the head always; then the last ``train`` blocks + final norm, or
    "all", or (with ``lora``) only adapters on the backbone."""
    backbone = clf.backbone
    if lora is not None:
        apply_lora(backbone, lora.rank, lora.alpha, lora.dropout, lora.targets)  # freezes the rest
    else:
        for p in backbone.parameters():
            p.requires_grad_(False)
        if train == "all":
            for p in backbone.parameters():
                p.requires_grad_(True)
        elif train != "head":
            n = int(train)
            if not 0 <= n <= len(backbone.blocks):
                raise ValueError(f"--train: the model has {len(backbone.blocks)} blocks, cannot train the last {n}")
            for module in [*backbone.blocks[len(backbone.blocks) - n:], backbone.final_norm]:
                for p in module.parameters():
                    p.requires_grad_(True)
        if not backbone.config.tie_embeddings:  # the LM head is not used: keep it out of the optimizer
            backbone.lm_head.weight.requires_grad_(False)
    for p in clf.head.parameters():
        p.requires_grad_(True)


# ----------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------
def load_labelled(path: Union[str, os.PathLike], text_column: str = "text",
                  label_column: str = "label") -> list[tuple[str, str, int]]:
    """Rows of a CSV file with a header as (text, label, line number)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames
        if not columns:
            raise DataError(f"{path} is empty: expected a header with the columns "
                            f"{text_column!r} and {label_column!r}, then one row per example")
        for name in (text_column, label_column):
            if name not in columns:
                raise DataError(f"{path}: no column {name!r} in the header (columns: {', '.join(columns)})")
        rows = []
        for number, row in enumerate(reader, start=1):
            for name in (text_column, label_column):
                if row.get(name) is None or not row[name].strip():
                    raise DataError(f"{path} row {number} (line {reader.line_num}): missing field {name!r}")
            rows.append((row[text_column], row[label_column].strip(), number))
    if not rows:
        raise DataError(f"{path} has a header but no rows: nothing to train on")
    return rows


def encode_rows(rows, labels: Sequence[str], tokenizer, max_tokens: int, path) -> list[tuple[list[int], int]]:
    """(ids, label index) per row; the text is cut to ``max_tokens`` (its beginning is kept)."""
    index = {label: i for i, label in enumerate(labels)}
    out = []
    for text, label, number in rows:
        if label not in index:
            raise DataError(f"{path} row {number}: label {label!r} is not in the label set "
                            f"({', '.join(labels)})")
        try:
            ids = list(tokenizer.encode(text, allowed_special="none"))
        except TypeError:
            ids = list(tokenizer.encode(text))
        except ValueError as e:
            raise DataError(f"{path} row {number}: {str(e).splitlines()[0]}") from None
        out.append((ids[:max_tokens] or [0], index[label]))
    return out


def collate_labelled(items, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad: ids (B, T), lengths (B,), labels (B,)."""
    T = max(len(ids) for ids, _ in items)
    ids = torch.full((len(items), T), pad_id, dtype=torch.long)
    for row, (x, _) in enumerate(items):
        ids[row, :len(x)] = torch.tensor(x, dtype=torch.long)
    lengths = torch.tensor([len(x) for x, _ in items], dtype=torch.long)
    return ids, lengths, torch.tensor([y for _, y in items], dtype=torch.long)


@torch.no_grad()
def predict_indices(clf: Classifier, items, pad_id: int, batch_size: int = 32) -> list[int]:
    clf.eval()
    device = clf.head.weight.device
    preds = []
    for start in range(0, len(items), batch_size):
        ids, lengths, _ = collate_labelled(items[start:start + batch_size], pad_id)
        preds.extend(clf(ids.to(device), lengths.to(device)).argmax(-1).tolist())
    return preds


def confusion_matrix(truth: Sequence[int], predicted: Sequence[int], n: int) -> list[list[int]]:
    """matrix[i][j] = how many examples of class i were predicted as class j."""
    matrix = [[0] * n for _ in range(n)]
    for t, p in zip(truth, predicted):
        matrix[t][p] += 1
    return matrix


def format_confusion(matrix: list[list[int]], labels: Sequence[str]) -> str:
    width = max(6, *(len(label) for label in labels), *(len(str(c)) for row in matrix for c in row)) + 1
    lines = ["true \\ predicted".ljust(width) + "".join(label.rjust(width) for label in labels)]
    for label, row in zip(labels, matrix):
        lines.append(label.ljust(width) + "".join(str(c).rjust(width) for c in row))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# Saving and loading a classifier
# ----------------------------------------------------------------------------------------
def _write_head(directory: Path, clf: Classifier, labels: Sequence[str], train: str) -> None:
    (directory / CLASSIFIER_CONFIG).write_text(json.dumps(
        {"labels": list(labels), "pooling": "last_token", "train": str(train)}, indent=2) + "\n")
    save_file({k: v.detach().contiguous() for k, v in clf.head.state_dict().items()},
              str(directory / CLASSIFIER_WEIGHTS))


def save_classifier(directory, clf: Classifier, tokenizer, labels, train="head", extra=None,
                    base_model: Optional[str] = None) -> Path:
    def write(tmp: Path):
        _write_head(tmp, clf, labels, train)
        if extra is not None:
            extra(tmp)

    if getattr(clf.backbone, "lora_config", None) is not None:
        return save_adapter(directory, clf.backbone, base_model=base_model, extra=write)
    return save_model(directory, clf.backbone, tokenizer, extra=write)


def load_classifier(directory, base_model: Optional[str] = None):
    """(Classifier, tokenizer, labels) from a classifier directory; an adapter directory is
    loaded on top of its base model (``base_model``, else the one it records)."""
    directory = Path(directory)
    config_file = directory / CLASSIFIER_CONFIG
    if not config_file.is_file():
        raise FileNotFoundError(f"{directory} is not a classifier directory (no {CLASSIFIER_CONFIG})")
    labels = json.loads(config_file.read_text())["labels"]
    if is_adapter_dir(directory):
        base = base_model or read_adapter_config(directory).base_model
        if not base:
            raise ValueError(f"{directory} is a LoRA adapter: give the base model it was trained on")
        backbone, tokenizer = load_base(base)
        load_adapter(backbone, directory)
    else:
        backbone, tokenizer = load_model(directory)
    clf = Classifier(backbone, len(labels))
    clf.head.load_state_dict(load_file(str(directory / CLASSIFIER_WEIGHTS)))
    return clf.eval(), tokenizer, labels


def classify(clf: Classifier, tokenizer, labels: Sequence[str], texts: Sequence[str]) -> list[str]:
    """The predicted label of each text."""
    items = [(list(tokenizer.encode(t))[:clf.backbone.config.context_length] or [0], 0) for t in texts]
    pad = tokenizer.eot_id if tokenizer.eot_id is not None else 0
    return [labels[i] for i in predict_indices(clf, items, pad)]


# ----------------------------------------------------------------------------------------
# Fine-tuning
# ----------------------------------------------------------------------------------------
def _split3(rows: list, val_fraction: float, test_fraction: float, seed: int):
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_val, n_test = round(len(rows) * val_fraction), round(len(rows) * test_fraction)
    pick = lambda idx: [rows[i] for i in idx]  # noqa: E731
    return (pick(order[n_val + n_test:]), pick(order[:n_val]), pick(order[n_val:n_val + n_test]))


def finetune_classify(model, data, out_dir: str = "runs/classify", train: Union[str, int] = "head",
                      labels: Optional[Sequence[str]] = None, text_column: str = "text", label_column: str = "label",
                      val_data: Optional[str] = None, test_data: Optional[str] = None, val_fraction: float = 0.1,
                      test_fraction: float = 0.1, lora: Optional[LoRAConfig] = None, quiet: bool = False,
                      **loop_options) -> dict:
    """Train a classifier; returns {"train_accuracy", "val_accuracy", "test_accuracy",
    "confusion_matrix", "labels", ...}, also written to OUT/classification.json."""
    cfg = LoopConfig(out_dir=str(out_dir), **loop_options)
    torch.manual_seed(cfg.seed)
    backbone, tokenizer = load_base(model)
    rows = load_labelled(data, text_column, label_column)
    splits = {"train": (rows, data)}
    if val_data or test_data:
        if val_data:
            splits["val"] = (load_labelled(val_data, text_column, label_column), val_data)
        if test_data:
            splits["test"] = (load_labelled(test_data, text_column, label_column), test_data)
    else:
        train_rows, val_rows, test_rows = _split3(rows, val_fraction, test_fraction, cfg.seed)
        splits = {"train": (train_rows, data), "val": (val_rows, data), "test": (test_rows, data)}
    labels = list(labels) if labels else sorted({label for _, label, _ in rows})
    if len(labels) < 2:
        raise DataError(f"{data}: only one label ({labels[0]!r}): classification needs at least two")
    T = backbone.config.context_length
    encoded = {name: encode_rows(r, labels, tokenizer, T, path) for name, (r, path) in splits.items()}
    pad_id = tokenizer.eot_id if tokenizer.eot_id is not None else 0

    clf = Classifier(backbone, len(labels))
    latest = Path(out_dir) / "latest"
    state = None
    if cfg.resume:
        clf, _, _ = load_classifier(latest, base_model=str(model))
        state = load_train_state(latest)
        if lora is not None:  # load_classifier already put the adapters on
            for p in clf.backbone.parameters():
                p.requires_grad_(False)
            for name, p in clf.backbone.named_parameters():
                p.requires_grad_("lora_" in name)
            for p in clf.head.parameters():
                p.requires_grad_(True)
        else:
            choose_trainable(clf, train)
    else:
        choose_trainable(clf, train, lora)
    clf.train()
    trainable, total = count_parameters(clf)
    quiet = quiet or not is_main_process()
    if not quiet:
        sizes = ", ".join(f"{len(v)} {k}" for k, v in encoded.items())
        print(f"{len(labels)} labels ({', '.join(labels)}); {sizes} rows; "
              f"training {trainable:,} of {total:,} parameters")

    train_items = encoded["train"]
    n_batches = (len(train_items) + cfg.batch_size - 1) // cfg.batch_size

    def batch(g: int):
        epoch, index = divmod(g, n_batches)
        order = list(range(len(train_items)))
        random.Random(cfg.seed * 1_000_003 + epoch).shuffle(order)
        chosen = order[index * cfg.batch_size:(index + 1) * cfg.batch_size]
        return collate_labelled([train_items[i] for i in chosen], pad_id)

    def loss(m, b):
        ids, lengths, y = b
        return F.cross_entropy(m(ids, lengths).float(), y), int(lengths.sum())

    def evaluate(m) -> dict:
        items = encoded.get("val") or []
        if not items:
            return {}
        device = m.head.weight.device
        total_loss, correct = 0.0, 0
        for start in range(0, len(items), cfg.batch_size):
            ids, lengths, y = collate_labelled(items[start:start + cfg.batch_size], pad_id)
            logits = m(ids.to(device), lengths.to(device)).float()
            total_loss += F.cross_entropy(logits, y.to(device), reduction="sum").item()
            correct += int((logits.argmax(-1).cpu() == y).sum())
        return {"val_loss": total_loss / len(items), "val_accuracy": correct / len(items)}

    def save(directory: Path, train_state: Optional[dict]):
        extra = (lambda tmp: save_train_state(tmp, train_state)) if train_state is not None else None
        save_classifier(directory, clf, tokenizer, labels, train, extra=extra, base_model=str(model))

    result = Finetuner(cfg, clf, n_batches, batch, loss, evaluate, save, None, state, quiet).run()

    # ---- the report: accuracy on every split, confusion matrix on the test split ---------------
    report = {"labels": labels, "steps": result.step, "interrupted": result.interrupted}
    for name, items in encoded.items():
        if items:
            preds = predict_indices(clf, items, pad_id, cfg.batch_size)
            truth = [y for _, y in items]
            report[f"{name}_accuracy"] = sum(p == t for p, t in zip(preds, truth)) / len(items)
            report[f"{name}_confusion_matrix"] = confusion_matrix(truth, preds, len(labels))
    shown = "test" if encoded.get("test") else ("val" if encoded.get("val") else "train")
    report["confusion_matrix"] = report[f"{shown}_confusion_matrix"]
    report["confusion_matrix_split"] = shown
    out = Path(out_dir)
    if not is_main_process():
        return report
    (out / "classification.json").write_text(json.dumps(report, indent=2) + "\n")
    table = format_confusion(report["confusion_matrix"], labels)
    (out / "confusion_matrix.txt").write_text(f"{shown} split\n{table}\n")
    if not quiet:
        print(", ".join(f"{k.split('_')[0]} accuracy {report[k]:.1%}" for k in report if k.endswith("_accuracy")))
        print(f"confusion matrix ({shown} split):\n{table}")
    return report
