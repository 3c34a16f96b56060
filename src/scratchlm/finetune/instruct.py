"""Instruction tuning: teach a pretrained model to answer in a prompt format.

    base model dir + instruction file
      -> examples with loss masks (instruct_data.py), in a prompt format (../chat.py)
      -> the fine-tuning loop (loop.py): masked cross-entropy on the answers
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
from typing import Optional, Union

import torch
import torch.nn.functional as F

from ..checkpoint import load_model, load_train_state, save_model, save_train_state
from ..lora import LoRAConfig, apply_lora, count_parameters, load_adapter, merge_lora, save_adapter
from .instruct_data import (IGNORE_INDEX, Example, batches, collate, count_target_tokens, load_records,
                            make_examples, pack, split_records)
from .loop import Finetuner, LoopConfig, LoopResult
from ..chat import chat_stops, format_prompt, resolve_template, write_prompt_format


def is_main_process() -> bool:
    """True except in the processes of rank > 0 of a torchrun job (they stay quiet)."""
    return int(os.environ.get("RANK", "0")) == 0


def masked_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the positions whose target is not -100.
    logits (B, T, V), targets (B, T). Computed in float32 (log-softmax over a big vocabulary)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


def load_base(model_ref: Union[str, os.PathLike]):
    """(model, tokenizer) in float32, ready to train, from a scratchlm model directory, a
    Hugging Face directory or hub id, or a preset name (random weights): see load.load_any."""
    try:
        from ..load import load_any
    except ImportError:  # the hf part is optional
        model, tokenizer = load_model(model_ref)
    else:
        model, tokenizer = load_any(str(model_ref))
    if tokenizer is None:
        raise ValueError(f"{model_ref} has no tokenizer files: fine-tuning needs the model's tokenizer")
    return model.float().requires_grad_(True), tokenizer


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


def finetune_instruct(model: Union[str, os.PathLike], data: Union[str, os.PathLike], out_dir: str = "runs/instruct",
                      template: Optional[str] = None, train_on_prompt: bool = False, packing: bool = False,
                      val_fraction: float = 0.1, val_data: Optional[str] = None, lora: Optional[LoRAConfig] = None,
                      merge: bool = False, n_samples: int = 2, sample_tokens: int = 64, quiet: bool = False,
                      **loop_options) -> LoopResult:
    """Fine-tune model directory ``model`` on the instruction file ``data``; see the module doc.

    loop_options: fields of LoopConfig (epochs, max_steps, batch_size, lr, resume, ...).
    With ``lora`` only the adapters train and OUT/latest is an adapter directory;
    ``merge`` also writes OUT/merged, a plain model directory with the adapters folded in.
    """
    cfg = LoopConfig(out_dir=str(out_dir), **loop_options)
    torch.manual_seed(cfg.seed)
    base, tokenizer = load_base(model)
    records = load_records(data)
    template = resolve_template(template, tokenizer, model if Path(model).is_dir() else None, training=True,
                                records=records)
    if val_data:
        train_records, val_records = records, load_records(val_data)
    else:
        train_records, val_records = split_records(records, val_fraction, cfg.seed)
    max_length = base.config.context_length + 1  # inputs and targets are one shorter
    train_examples, cut = make_examples(train_records, tokenizer, template, max_length, train_on_prompt, str(data))
    val_examples, _ = make_examples(val_records, tokenizer, template, max_length, train_on_prompt,
                                    str(val_data or data))
    if packing:
        train_examples = pack(train_examples, max_length)
    pad_id = tokenizer.eot_id if tokenizer.eot_id is not None else 0

    latest = Path(out_dir) / "latest"
    state = None
    if lora is not None:
        lora = LoRAConfig(**{**lora.__dict__, "base_model": str(model)})
        if cfg.resume:
            load_adapter(base, latest)
        else:
            apply_lora(base, lora.rank, lora.alpha, lora.dropout, lora.targets)
        net = base
    elif cfg.resume:
        net, _ = load_model(latest, with_tokenizer=False)
        net = net.float()
    else:
        net = base
    if cfg.resume:
        state = load_train_state(latest)
    trainable, total = count_parameters(net)
    if not quiet and is_main_process():
        print(f"{len(train_examples)} training rows ({count_target_tokens(train_examples):,} answer tokens), "
              f"{len(val_examples)} validation; template {template}; "
              f"training {trainable:,} of {total:,} parameters" + (f"; {cut} examples cut to fit" if cut else ""))

    n_batches = (len(train_examples) + cfg.batch_size - 1) // cfg.batch_size
    cache: dict[int, list] = {}

    def batch(g: int):
        epoch, index = divmod(g, n_batches)
        if epoch not in cache:
            cache.clear()
            cache[epoch] = list(batches(train_examples, cfg.batch_size, pad_id, seed=cfg.seed, epoch=epoch))
        return cache[epoch][index]

    def loss(m, b):
        x, y = b
        return masked_loss(m(x), y), x.numel()

    def evaluate(m) -> dict:
        if not val_examples:
            return {}
        total_loss, count = 0.0, 0
        for x, y in batches(val_examples, cfg.batch_size, pad_id, shuffle=False):
            n = int((y != IGNORE_INDEX).sum())
            total_loss += masked_loss(m(x.to(next(m.parameters()).device)), y.to(next(m.parameters()).device)).item() * n
            count += n
        return {"val_loss": total_loss / max(1, count)}

    sample_records = (val_records or train_records)[:n_samples]

    def samples(m) -> list[str]:
        if not sample_records or sample_tokens <= 0:
            return []
        prompts = [prompt_of(r)[0] for r in sample_records]
        outs = answer(m, tokenizer, prompts, template, max_new_tokens=sample_tokens)
        return [f"{_describe(p)} -> {o!r}" for p, o in zip(prompts, outs)]

    def save(directory: Path, train_state: Optional[dict]):
        def extra(tmp: Path):
            write_prompt_format(tmp, template)
            if train_state is not None:
                save_train_state(tmp, train_state)

        if lora is not None:
            save_adapter(directory, net, base_model=str(model), extra=extra)
        else:
            save_model(directory, net, tokenizer, extra=extra)

    result = Finetuner(cfg, net, n_batches, batch, loss, evaluate, save, samples, state, quiet).run()
    if merge and lora is not None and is_main_process():
        merged = merge_lora(net)
        save_model(Path(out_dir) / "merged", merged, tokenizer, extra=lambda tmp: write_prompt_format(tmp, template))
    return result


__all__ = ["finetune_instruct", "masked_loss", "answer", "stops_for", "load_base", "collate", "Example"]
