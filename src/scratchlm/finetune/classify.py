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
import io
import json
import os
import random
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..checkpoint import load_model, save_model
from ..corpus import decode_text, read_bytes
from ..errors import ConfigError, NotFound, ScratchLMError
from ..lora import (
    LoRAConfig,
    apply_lora,
    count_parameters,
    is_adapter_dir,
    load_adapter,
    read_adapter_config,
    save_adapter,
)
from ..train.core import Task, Trainer
from ..train.distributed import is_main_process, process_group
from .config import ClassifyConfig
from .instruct import load_base, lora_options
from .instruct_data import DataError

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


def choose_trainable(clf: Classifier, train: str | int, lora: LoRAConfig | None = None) -> None:
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
                raise ConfigError(f"--train: the model has {len(backbone.blocks)} blocks, cannot train the last {n}")
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
def load_labelled(path: str | os.PathLike, text_column: str = "text",
                  label_column: str = "label") -> list[tuple[str, str, int]]:
    """Rows of a CSV file with a header as (text, label, line number)."""
    path = Path(path)
    if not path.exists():
        raise NotFound(f"data file not found: {path}")
    text = decode_text(read_bytes(path), path)  # a FIFO, a folder or bytes that are not UTF-8: one line
    with io.StringIO(text, newline="") as f:
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
                    base_model: str | None = None) -> Path:
    def write(tmp: Path):
        _write_head(tmp, clf, labels, train)
        if extra is not None:
            extra(tmp)

    if getattr(clf.backbone, "lora_config", None) is not None:
        return save_adapter(directory, clf.backbone, base_model=base_model, extra=write)
    return save_model(directory, clf.backbone, tokenizer, extra=write)


def load_classifier(directory, base_model: str | None = None):
    """(Classifier, tokenizer, labels) from a classifier directory; an adapter directory is
    loaded on top of its base model (``base_model``, else the one it records)."""
    directory = Path(directory)
    config_file = directory / CLASSIFIER_CONFIG
    if not config_file.is_file():
        raise NotFound(f"{directory} is not a classifier directory (no {CLASSIFIER_CONFIG})")
    labels = json.loads(config_file.read_text())["labels"]
    if is_adapter_dir(directory):
        base = base_model or read_adapter_config(directory).base_model
        if not base:
            raise ScratchLMError(f"{directory} is a LoRA adapter: give the base model it was trained on")
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


class ClassifyTask(Task):
    """Classification as a task of the training core: cross-entropy over the labels."""

    title = "fine-tuning"

    def __init__(self, cfg: ClassifyConfig, quiet: bool = False):
        self.cfg, self.quiet = cfg, quiet
        torch.manual_seed(cfg.seed)  # a preset name builds random weights
        self.backbone, self.tokenizer = load_base(cfg.model)
        rows = load_labelled(cfg.data, cfg.text_column, cfg.label_column)
        splits = {"train": (rows, cfg.data)}
        if cfg.val_data or cfg.test_data:
            for name, path in (("val", cfg.val_data), ("test", cfg.test_data)):
                if path:
                    splits[name] = (load_labelled(path, cfg.text_column, cfg.label_column), path)
        else:
            train_rows, val_rows, test_rows = _split3(rows, cfg.val_fraction, cfg.test_fraction, cfg.seed)
            splits = {"train": (train_rows, cfg.data), "val": (val_rows, cfg.data), "test": (test_rows, cfg.data)}
        self.labels = cfg.label_set or sorted({label for _, label, _ in rows})
        if len(self.labels) < 2:
            raise DataError(f"{cfg.data}: only one label ({self.labels[0]!r}): classification needs at least two")
        T = self.backbone.config.context_length
        self.encoded = {name: encode_rows(r, self.labels, self.tokenizer, T, path) for name, (r, path) in splits.items()}
        self.pad_id = self.tokenizer.eot_id if self.tokenizer.eot_id is not None else 0
        self.n_batches = (len(self.encoded["train"]) + cfg.batch_size - 1) // cfg.batch_size
        self.lora = cfg.lora_config()

    def setup(self, run) -> None:
        super().setup(run)
        if run.sharded:
            raise ConfigError("classification fine-tuning runs with --distributed ddp (the head is saved from "
                              "the whole model)")

    def model(self, resume_from: Path | None) -> Classifier:
        cfg = self.cfg
        self.clf = Classifier(self.backbone, len(self.labels))
        if resume_from is not None:
            self.clf, _, _ = load_classifier(resume_from, base_model=cfg.model)
            if self.lora is not None:  # load_classifier already put the adapters on
                for name, p in self.clf.backbone.named_parameters():
                    p.requires_grad_("lora_" in name)
                for p in self.clf.head.parameters():
                    p.requires_grad_(True)
            else:
                choose_trainable(self.clf, cfg.trainable)
        else:
            choose_trainable(self.clf, cfg.trainable, self.lora)
        if not self.quiet and is_main_process():
            trainable, total = count_parameters(self.clf)
            sizes = ", ".join(f"{len(v)} {k}" for k, v in self.encoded.items())
            print(f"{len(self.labels)} labels ({', '.join(self.labels)}); {sizes} rows; "
                  f"training {trainable:,} of {total:,} parameters")
        return self.clf

    def batches_per_epoch(self) -> int:
        return self.n_batches

    def micro_batch(self, step, micro, rank, world, model):
        g = (step * self.cfg.grad_accum + micro) * world + rank
        epoch, index = divmod(g, self.n_batches)
        items, size = self.encoded["train"], self.cfg.batch_size
        order = list(range(len(items)))
        random.Random(self.cfg.seed * 1_000_003 + epoch).shuffle(order)
        return collate_labelled([items[i] for i in order[index * size:(index + 1) * size]], self.pad_id)

    def loss(self, model, batch):
        ids, lengths, y = batch
        logits = model(ids, lengths).float()  # (B, n_classes)
        accuracy = (logits.detach().argmax(-1) == y).float().mean()
        return F.cross_entropy(logits, y), {"train_accuracy": accuracy}, int(lengths.sum())

    def evaluate(self, model) -> dict[str, float]:
        items = self.encoded.get("val") or []
        if not items:
            return {}
        device = self.run.device
        total_loss = torch.zeros((), device=device, dtype=torch.float64)
        correct = torch.zeros((), device=device, dtype=torch.long)
        for start in range(0, len(items), self.cfg.batch_size):
            ids, lengths, y = collate_labelled(items[start:start + self.cfg.batch_size], self.pad_id)
            logits = model(ids.to(device), lengths.to(device)).float()
            total_loss += F.cross_entropy(logits, y.to(device), reduction="sum").double()
            correct += (logits.argmax(-1) == y.to(device)).sum()
        return {"val_loss": total_loss.item() / len(items), "val_accuracy": correct.item() / len(items)}

    def save(self, directory, weights, extra) -> None:
        save_classifier(directory, self.clf, self.tokenizer, self.labels, self.cfg.train, extra=extra,
                        base_model=str(self.cfg.model))

    def report(self, steps: int, interrupted: bool) -> dict:
        """Accuracy on every split; the confusion matrix of the test split (else val, else train)."""
        labels, clf = self.labels, self.clf
        report = {"labels": labels, "steps": steps, "interrupted": interrupted}
        for name, items in self.encoded.items():
            if items:
                preds = predict_indices(clf, items, self.pad_id, self.cfg.batch_size)
                truth = [y for _, y in items]
                report[f"{name}_accuracy"] = sum(p == t for p, t in zip(preds, truth)) / len(items)
                report[f"{name}_confusion_matrix"] = confusion_matrix(truth, preds, len(labels))
        shown = "test" if self.encoded.get("test") else ("val" if self.encoded.get("val") else "train")
        report["confusion_matrix"] = report[f"{shown}_confusion_matrix"]
        report["confusion_matrix_split"] = shown
        return report


def classify_finetune(cfg: ClassifyConfig, quiet: bool = False) -> dict:
    """Run `scratchlm finetune classify` as ``cfg`` says; the report (see finetune_classify)."""
    with process_group():
        task = ClassifyTask(cfg, quiet)
        result = Trainer(cfg, task, quiet=quiet).run()
    report = task.report(result.step, result.interrupted)
    if not is_main_process():
        return report
    out, shown = Path(cfg.out_dir), report["confusion_matrix_split"]
    (out / "classification.json").write_text(json.dumps(report, indent=2) + "\n")
    table = format_confusion(report["confusion_matrix"], task.labels)
    (out / "confusion_matrix.txt").write_text(f"{shown} split\n{table}\n")
    if not quiet:
        print(", ".join(f"{k.split('_')[0]} accuracy {report[k]:.1%}" for k in report if k.endswith("_accuracy")))
        print(f"confusion matrix ({shown} split):\n{table}")
    return report


def finetune_classify(model, data, out_dir: str = "runs/classify", train: str | int = "head",
                      labels: Sequence[str] | None = None, text_column: str = "text", label_column: str = "label",
                      val_data: str | None = None, test_data: str | None = None, val_fraction: float = 0.1,
                      test_fraction: float = 0.1, lora: LoRAConfig | None = None, quiet: bool = False,
                      **loop_options) -> dict:
    """Train a classifier; returns {"train_accuracy", "val_accuracy", "test_accuracy",
    "confusion_matrix", "labels", ...}, also written to OUT/classification.json.

    loop_options: fields of ClassifyConfig / LoopConfig (epochs, max_steps, batch_size, lr, resume, ...)."""
    cfg = ClassifyConfig.from_dict(dict(
        model=str(model), data=str(data), out_dir=str(out_dir), train=str(train),
        labels=",".join(labels) if labels else None, text_column=text_column, label_column=label_column,
        val_data=str(val_data) if val_data else None, test_data=str(test_data) if test_data else None,
        val_fraction=float(val_fraction), test_fraction=float(test_fraction), **lora_options(lora), **loop_options))
    return classify_finetune(cfg, quiet=quiet)
