"""Instruction tuning: teach a pretrained model to answer in a prompt format.

    base model dir + instruction file
      -> examples with loss masks (instruct_data.py), in a prompt format (../chat.py)
      -> InstructTask, a task of the training core (../train/core.py): masked
         cross-entropy on the answers
      -> OUT/latest, OUT/best: model dirs (or LoRA adapter dirs) with prompt_format.json

>>> import torch
>>> logits = torch.randn(1, 4, 10)
>>> targets = torch.tensor([[-100, -100, 3, 7]])   # two prompt positions, two answer tokens
>>> masked_loss(logits, targets) == torch.nn.functional.cross_entropy(logits[0, 2:], targets[0, 2:])
tensor(True)
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from ..chat import FORMATS, chat_stops, format_prompt, resolve_template, write_prompt_format
from ..checkpoint import load_model, save_model
from ..errors import ConfigError, ScratchLMError
from ..lora import LoRAConfig, apply_lora, count_parameters, load_adapter, merge_lora, save_adapter
from ..train.core import Task, Trainer, TrainResult
from ..train.distributed import is_main_process, process_group
from .config import InstructConfig
from .instruct_data import (
    IGNORE_INDEX,
    Example,
    batches,
    collate,
    count_target_tokens,
    load_records,
    make_examples,
    pack,
    split_records,
)


def masked_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the positions whose target is not -100.
    logits (B, T, V), targets (B, T). Computed in float32 (log-softmax over a big vocabulary)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


def load_base(model_ref: str | os.PathLike):
    """(model, tokenizer) in float32, ready to train, from a scratchlm model directory, a
    Hugging Face directory or hub id, or a preset name (random weights): see load.load_any."""
    try:
        from ..load import load_any
    except ImportError:  # the hf part is optional
        model, tokenizer = load_model(model_ref)
    else:
        model, tokenizer = load_any(str(model_ref))
    if tokenizer is None:
        raise ScratchLMError(f"{model_ref} has no tokenizer files: fine-tuning needs the model's tokenizer")
    return model.float().requires_grad_(True), tokenizer


def tuned_model(base: torch.nn.Module, lora: LoRAConfig | None, resume_from: Path | None) -> torch.nn.Module:
    """The model a tuning run trains, from ``base`` (load_base's): with ``lora`` the base with
    adapters (new, or a checkpoint's), else the base itself or the checkpoint's full weights."""
    if lora is not None:
        if resume_from is not None:
            load_adapter(base, resume_from)
        else:
            apply_lora(base, lora.rank, lora.alpha, lora.dropout, lora.targets)
        return base
    return load_model(resume_from, with_tokenizer=False)[0].float() if resume_from is not None else base


def save_tuned(directory, net: torch.nn.Module, tokenizer, template: str, lora: LoRAConfig | None, base_model: str,
               weights, extra) -> None:
    """A tuning run's checkpoint (Task.save): an adapter directory with ``lora`` (it names
    ``base_model``), else a model directory; with the prompt format it trained in
    (prompt_format.json; none for raw text), then the core's ``extra`` files."""
    def write(tmp: Path):
        if template in FORMATS:
            write_prompt_format(tmp, template)
        extra(tmp)

    if lora is not None:
        save_adapter(directory, net, base_model=base_model, extra=write)
    else:
        save_model(directory, net, tokenizer, extra=write, state=weights)


def stops_for(template: str, tokenizer) -> tuple[list[str], list[int]]:
    """(stop strings, stop ids) that end an answer in ``template``."""
    return chat_stops(template, tokenizer)


def answer(model, tokenizer, prompts, template: str, max_new_tokens: int = 64, **sampling) -> list[str]:
    """Answers to prompts, greedy by default. A prompt is an instruction (str), an alpaca
    record ({"instruction", "input"}) or a chat (list of messages); one prompt or a list."""
    from ..generate import generate

    one = isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], dict) and "role" in prompts[0])
    prompts = [prompts] if one else prompts
    texts = [format_prompt(template, p) for p in prompts]
    stop, stop_ids = stops_for(template, tokenizer)
    room = model.config.context_length - max(len(tokenizer.encode(t)) for t in texts)
    if room >= 1:  # answers are cut short rather than prompts
        max_new_tokens = min(max_new_tokens, room)
    return [c.text for c in generate(model, tokenizer, texts, max_new_tokens=max_new_tokens, stop=stop or None,
                                     stop_token_ids=stop_ids, overflow="truncate", **sampling)]


def prompt_of(record: dict):
    """(prompt, expected answer) of a record: the alpaca record without its output, or the
    chat up to its last assistant turn."""
    if "messages" not in record:
        return {"instruction": record["instruction"], "input": record.get("input", "")}, record["output"]
    messages = record["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]


def _describe(prompt) -> str:
    text = prompt["instruction"] if isinstance(prompt, dict) else prompt[-1]["content"]
    return repr(text[:60])


class InstructTask(Task):
    """Instruction tuning as a task of the training core: masked loss on the answers."""

    title = "fine-tuning"

    def __init__(self, cfg: InstructConfig, quiet: bool = False):
        self.cfg, self.quiet = cfg, quiet
        torch.manual_seed(cfg.seed)  # a preset name builds random weights
        self.base, self.tokenizer = load_base(cfg.model)
        records = load_records(cfg.data)
        model_dir = cfg.model if Path(cfg.model).is_dir() else None
        self.template = resolve_template(None if cfg.template == "auto" else cfg.template, self.tokenizer,
                                         model_dir, training=True, records=records)
        if cfg.val_data:
            train_records, val_records = records, load_records(cfg.val_data)
        else:
            train_records, val_records = split_records(records, cfg.val_fraction, cfg.seed)
        max_length = self.base.config.context_length + 1  # inputs and targets are one shorter
        self.train_examples, self.cut = make_examples(train_records, self.tokenizer, self.template, max_length,
                                                      cfg.train_on_prompt, str(cfg.data))
        self.val_examples, _ = make_examples(val_records, self.tokenizer, self.template, max_length,
                                             cfg.train_on_prompt, str(cfg.val_data or cfg.data))
        if cfg.packing:
            self.train_examples = pack(self.train_examples, max_length)
        self.pad_id = self.tokenizer.eot_id if self.tokenizer.eot_id is not None else 0
        self.n_batches = (len(self.train_examples) + cfg.batch_size - 1) // cfg.batch_size
        self.sample_records = (val_records or train_records)[:cfg.n_samples]
        self.lora = cfg.lora_config()
        self._epoch, self._batches = -1, []

    def setup(self, run) -> None:
        super().setup(run)
        if run.sharded and self.lora is not None:
            raise ConfigError("LoRA fine-tuning shards nothing worth sharding: use --distributed ddp")

    def model(self, resume_from: Path | None) -> torch.nn.Module:
        self.net = tuned_model(self.base, self.lora, resume_from)
        trainable, total = count_parameters(self.net)
        if not self.quiet and is_main_process():
            print(f"{len(self.train_examples)} training rows ({count_target_tokens(self.train_examples):,} answer "
                  f"tokens), {len(self.val_examples)} validation; template {self.template}; training "
                  f"{trainable:,} of {total:,} parameters" + (f"; {self.cut} examples cut to fit" if self.cut else ""))
        return self.net

    def batches_per_epoch(self) -> int:
        return self.n_batches

    def micro_batch(self, step, micro, rank, world, model):
        # The g-th micro-batch of the run: epochs of shuffled rows, each rank its own share.
        g = (step * self.cfg.grad_accum + micro) * world + rank
        epoch, index = divmod(g, self.n_batches)
        if epoch != self._epoch:
            self._epoch = epoch
            self._batches = list(batches(self.train_examples, self.cfg.batch_size, self.pad_id, seed=self.cfg.seed,
                                         epoch=epoch))
        return self._batches[index]

    def loss(self, model, batch):
        x, y = batch
        return masked_loss(model(x), y), {}, x.numel()

    def evaluate(self, model) -> dict[str, float]:
        if not self.val_examples:
            return {}
        device = self.run.device
        total, count = torch.zeros((), device=device, dtype=torch.float64), 0
        for x, y in batches(self.val_examples, self.cfg.batch_size, self.pad_id, shuffle=False):
            n = int((y != IGNORE_INDEX).sum())
            total += masked_loss(model(x.to(device)), y.to(device)).double() * n
            count += n
        return {"val_loss": total.item() / max(1, count)}

    def sample(self, model) -> list[str]:
        if not self.sample_records or self.cfg.sample_tokens <= 0:
            return []
        prompts = [prompt_of(r)[0] for r in self.sample_records]
        outs = answer(model, self.tokenizer, prompts, self.template, max_new_tokens=self.cfg.sample_tokens)
        return [f"{_describe(p)} -> {o!r}" for p, o in zip(prompts, outs)]

    def save(self, directory, weights, extra) -> None:
        save_tuned(directory, self.net, self.tokenizer, self.template, self.lora, str(self.cfg.model), weights, extra)


def instruct(cfg: InstructConfig, quiet: bool = False) -> TrainResult:
    """Run `scratchlm finetune instruct` as ``cfg`` says; OUT/merged too with lora + merge."""
    with process_group():
        task = InstructTask(cfg, quiet)
        result = Trainer(cfg, task, quiet=quiet).run()
    if cfg.merge and task.lora is not None and is_main_process():
        merged = merge_lora(task.net)
        save_model(Path(cfg.out_dir) / "merged", merged, task.tokenizer,
                   extra=lambda tmp: write_prompt_format(tmp, task.template))
    return result


def lora_options(lora: LoRAConfig | None) -> dict:
    """The config fields of a LoRAConfig."""
    if lora is None:
        return {}
    return {"lora": True, "lora_rank": lora.rank, "lora_alpha": float(lora.alpha), "lora_dropout": float(lora.dropout),
            "lora_targets": ",".join(lora.targets)}


def finetune_instruct(model: str | os.PathLike, data: str | os.PathLike, out_dir: str = "runs/instruct",
                      template: str | None = None, train_on_prompt: bool = False, packing: bool = False,
                      val_fraction: float = 0.1, val_data: str | None = None, lora: LoRAConfig | None = None,
                      merge: bool = False, n_samples: int = 2, sample_tokens: int = 64, quiet: bool = False,
                      **loop_options) -> TrainResult:
    """Fine-tune model directory ``model`` on the instruction file ``data``; see the module doc.

    loop_options: fields of InstructConfig / LoopConfig (epochs, max_steps, batch_size, lr, resume, ...).
    With ``lora`` only the adapters train and OUT/latest is an adapter directory;
    ``merge`` also writes OUT/merged, a plain model directory with the adapters folded in.
    """
    cfg = InstructConfig.from_dict(dict(
        model=str(model), data=str(data), out_dir=str(out_dir), template=template or "auto",
        train_on_prompt=train_on_prompt, packing=packing, val_fraction=float(val_fraction),
        val_data=str(val_data) if val_data else None, merge=merge, n_samples=n_samples, sample_tokens=sample_tokens,
        **lora_options(lora), **loop_options))
    return instruct(cfg, quiet=quiet)


__all__ = ["finetune_instruct", "instruct", "InstructTask", "InstructConfig", "masked_loss", "answer", "stops_for",
           "load_base", "tuned_model", "save_tuned", "collate", "Example", "is_main_process"]
