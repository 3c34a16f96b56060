"""Fine-tuning: loss masks, templates, packing, a tiny model that learns instructions by heart,
classification to >= 95%, LoRA variants, exact resume, and clear errors for bad data."""

import csv
import json
import random
import subprocess
import sys

import pytest
import torch

from scratchlm import ModelConfig, Transformer
from scratchlm.chat import alpaca_prompt, format_prompt
from scratchlm.checkpoint import load_model, load_train_state, save_model
from scratchlm.cli import main
from scratchlm.finetune import (
    IGNORE_INDEX,
    DataError,
    Example,
    answer,
    classify,
    collate,
    finetune_classify,
    finetune_instruct,
    load_classifier,
    load_records,
    pack,
    read_prompt_format,
    render_example,
    tokenize_example,
)
from scratchlm.tokenizer import CharTokenizer

CHAT_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA_SPECIALS = ["<|endoftext|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:;!?#+=-'\n()"

FACTS = [("What colour is the sky?", "The sky is blue."),
         ("Name a fruit.", "An apple."),
         ("What is 2 + 3?", "2 + 3 = 5."),
         ("Say hello.", "Hello there!"),
         ("What do cats say?", "Cats say meow.")]


def char_tokenizer(specials=CHAT_SPECIALS):
    return CharTokenizer.train(LETTERS, special_tokens=specials)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def model_dir(path, tokenizer, preset="gpt-tiny", seed=0, **changes):
    torch.manual_seed(seed)
    config = ModelConfig.preset(preset, vocab_size=tokenizer.vocab_size, **changes)
    save_model(path, Transformer(config), tokenizer)
    return path


# ----------------------------------------------------------------------------------------
# Masking
# ----------------------------------------------------------------------------------------
def test_alpaca_labels_are_ignored_exactly_on_prompt_and_padding():
    tok = char_tokenizer()
    short = {"instruction": "Add.", "input": "2 and 3", "output": "5."}
    long = {"instruction": "Name a fruit.", "input": "", "output": "An apple, or a pear."}
    examples = [tokenize_example(render_example(r, "alpaca"), tok) for r in (short, long)]
    x, y = collate(examples, pad_id=tok.eot_id)
    for row, record in enumerate((short, long)):
        prompt = tok.encode(alpaca_prompt(record["instruction"], record["input"]))  # computed independently
        full = prompt + tok.encode(record["output"]) + [tok.eot_id]
        n = len(full) - 1  # real (input, target) positions of this row
        for t in range(y.shape[1]):
            # target t is token t + 1: ignored iff it belongs to the prompt or t is padding
            should_ignore = t + 1 < len(prompt) or t >= n
            assert (y[row, t].item() == IGNORE_INDEX) == should_ignore, (row, t)
            if not should_ignore:
                assert y[row, t].item() == full[t + 1]
        assert x[row, :n].tolist() == full[:-1]
        assert (x[row, n:] == tok.eot_id).all()
    # The last target of each real row is the end-of-text token: the model learns to stop.
    assert tok.eot_id in y[0].tolist() and tok.eot_id in y[1].tolist()


def test_train_on_prompt_ignores_only_padding():
    tok = char_tokenizer()
    records = [{"instruction": "Hi.", "output": "Hello."}, {"instruction": "Name a fruit.", "output": "Pear."}]
    examples = [tokenize_example(render_example(r, "alpaca"), tok, train_on_prompt=True) for r in records]
    x, y = collate(examples, pad_id=0)
    for row, e in enumerate(examples):
        n = len(e) - 1
        assert y[row, :n].tolist() == e.ids[1:]  # every real target is kept
        assert (y[row, n:] == IGNORE_INDEX).all()  # padding only
    assert (y == IGNORE_INDEX).sum() == y.shape[1] * 2 - sum(len(e) - 1 for e in examples)


@pytest.mark.parametrize("template,specials", [("chatml", CHAT_SPECIALS), ("llama3", LLAMA_SPECIALS)])
def test_chat_masks_cover_every_assistant_turn_and_nothing_else(template, specials):
    from scratchlm.chat import render_chat

    tok = char_tokenizer(specials)
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi."},
                         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye."},
                         {"role": "assistant", "content": "See you."}]}
    segments = render_example(chat, template)
    text = "".join(s.text for s in segments)
    assert text == render_chat(chat["messages"], template, tok, add_generation_prompt=False)  # same layout as chat.py
    assert format_prompt(template, chat["messages"][:4]) == render_chat(chat["messages"][:4], template, tok)
    example = tokenize_example(segments, tok)
    assert example.ids == tok.encode(text)  # segment-wise encoding == encoding the whole text
    end = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}[template]
    learned = tok.decode([i for i, keep in zip(example.ids, example.trainable) if keep])
    assert learned == f"Hello.{end}See you.{end}"


def test_packing_keeps_tokens_masks_and_order():
    examples = [Example(list(range(k, k + n)), [i % 2 == 0 for i in range(n)]) for k, n in
                [(0, 5), (10, 7), (20, 3), (30, 9), (40, 2)]]
    rows = pack(examples, max_length=12)
    assert all(len(r) <= 12 for r in rows)
    assert [i for r in rows for i in r.ids] == [i for e in examples for i in e.ids]
    assert [m for r in rows for m in r.trainable] == [m for e in examples for m in e.trainable]
    assert len(rows) < len(examples)


# ----------------------------------------------------------------------------------------
# Learning
# ----------------------------------------------------------------------------------------
def test_tiny_model_learns_instructions_by_heart_and_answers_greedily(tmp_path):
    tok = char_tokenizer()
    base = model_dir(tmp_path / "base", tok, context_length=96)
    data = write_jsonl(tmp_path / "facts.jsonl", [{"messages": [{"role": "user", "content": q},
                                                                {"role": "assistant", "content": a}]}
                                                   for q, a in FACTS])
    result = finetune_instruct(base, data, tmp_path / "run", val_fraction=0.0, max_steps=90, batch_size=5,
                               lr=3e-3, warmup_steps=5, eval_every=1000, progress=False, quiet=True)
    assert result.losses[-1] < 0.05 < result.losses[0]
    out = tmp_path / "run" / "latest"
    assert read_prompt_format(out) == "chatml"  # the tokenizer has <|im_start|>: its chat format
    assert (tmp_path / "run" / "loss.png").exists() and (tmp_path / "run" / "metrics.jsonl").exists()
    model, tokenizer = load_model(out)
    answers = answer(model, tokenizer, [q for q, _ in FACTS], "chatml", max_new_tokens=30)
    assert answers == [a for _, a in FACTS]
    # `scratchlm generate` and `chat` read the recorded format: the bare question gets the answer.
    question, expected = FACTS[0]
    done = subprocess.run([sys.executable, "-m", "scratchlm.cli", "generate", str(out), question,
                           "--max-new-tokens", "30"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == expected
    chat = subprocess.run([sys.executable, "-m", "scratchlm.cli", "chat", str(out), "--max-new-tokens", "30"],
                          input=question + "\n", capture_output=True, text=True, timeout=120)
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.strip() == expected


@pytest.mark.parametrize("lora", [False, True])
def test_resume_continues_exactly(tmp_path, lora):
    """6 steps straight == 3 steps, then --resume to 6, with dropout on (in the model, and in
    the adapters with LoRA): the same loss at every step and the same weights, bit for bit,
    because every RNG is saved and restored."""
    from scratchlm.lora import LoRAConfig, load_adapter

    tok = char_tokenizer()
    base = model_dir(tmp_path / "base", tok, context_length=64, dropout=0.2)
    rows = [{"instruction": q, "output": a} for q, a in FACTS]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    common = dict(template="chatml", val_fraction=0.0, batch_size=2, lr=1e-3, min_lr=1e-3, warmup_steps=0,
                  progress=False, quiet=True, plot=False, n_samples=0,
                  lora=LoRAConfig(rank=2, dropout=0.3) if lora else None)
    once = finetune_instruct(base, data, tmp_path / "once", max_steps=6, **common)
    first = finetune_instruct(base, data, tmp_path / "twice", max_steps=6, stop_at_step=3, **common)
    second = finetune_instruct(base, data, tmp_path / "twice", max_steps=6, resume=True, **common)
    assert first.losses + second.losses == once.losses
    if lora:
        a, _ = load_model(base)
        load_adapter(a, tmp_path / "once" / "latest")
        b, _ = load_model(base)
        load_adapter(b, tmp_path / "twice" / "latest")
    else:
        a, _ = load_model(tmp_path / "once" / "latest")
        b, _ = load_model(tmp_path / "twice" / "latest")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    steps = [json.loads(line)["step"] for line in (tmp_path / "twice" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == list(range(1, 7))


def test_lora_instruction_tuning_saves_an_adapter_and_merges(tmp_path):
    from scratchlm.lora import LoRAConfig, is_adapter_dir, load_adapter

    tok = char_tokenizer()
    base = model_dir(tmp_path / "base", tok, preset="llama-tiny", context_length=64)
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": q, "output": a} for q, a in FACTS])
    result = finetune_instruct(base, data, tmp_path / "run", template="chatml", val_fraction=0.2, max_steps=20,
                               batch_size=4, lr=1e-2, eval_every=10, lora=LoRAConfig(rank=4, targets=["qkv_proj", "down_proj"]),
                               merge=True, progress=False, quiet=True, n_samples=1, sample_tokens=8)
    assert result.losses[-1] < result.losses[0]
    adapter = tmp_path / "run" / "latest"
    assert is_adapter_dir(adapter) and not (adapter / "model.safetensors").exists()
    assert read_prompt_format(adapter) == "chatml"
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in r and r.get("samples") for r in evals if r["kind"] == "eval")
    # the merged directory equals base + adapter
    model, _ = load_model(base)
    load_adapter(model, adapter)
    merged, _ = load_model(tmp_path / "run" / "merged")
    ids = torch.tensor([tok.encode("What is 2 + 3?")])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), model(ids), atol=2e-5, rtol=1e-4)
    assert read_prompt_format(tmp_path / "run" / "merged") == "chatml"


def separable_csv(path, n=240, seed=0, labels=("pos", "neg", "mid")):
    words = {"pos": ["good", "great", "nice"], "neg": ["bad", "awful", "sad"], "mid": ["okay", "fine", "so so"]}
    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for _ in range(n):
            label = rng.choice(labels)
            w.writerow([" ".join(rng.choice(words[label]) for _ in range(3)), label])
    return path


@pytest.mark.parametrize("train,lora", [("all", None), ("head", "lora")])
def test_classification_reaches_95_percent(tmp_path, train, lora, capsys):
    from scratchlm.lora import LoRAConfig

    tok = char_tokenizer()
    base = model_dir(tmp_path / "base", tok, context_length=32)
    data = separable_csv(tmp_path / "data.csv")
    report = finetune_classify(base, data, tmp_path / "run", train=train, epochs=4, batch_size=16, lr=3e-3,
                               warmup_steps=2, eval_every=1000, progress=False, quiet=True,
                               lora=LoRAConfig(rank=4, targets=["qkv_proj", "up_proj"]) if lora else None)
    assert report["test_accuracy"] >= 0.95 and report["val_accuracy"] >= 0.95, report
    matrix = report["confusion_matrix"]
    assert sum(map(sum, matrix)) == 24 and sum(matrix[i][i] for i in range(3)) >= 0.95 * 24
    saved = json.loads((tmp_path / "run" / "classification.json").read_text())
    assert saved["labels"] == ["mid", "neg", "pos"] and saved["confusion_matrix"] == matrix
    assert "true \\ predicted" in (tmp_path / "run" / "confusion_matrix.txt").read_text()
    clf, tokenizer, labels = load_classifier(tmp_path / "run" / "latest", base_model=str(base))
    assert classify(clf, tokenizer, labels, ["good great nice", "awful sad bad", "okay fine okay"]) == ["pos", "neg", "mid"]
    assert main(["classify", str(tmp_path / "run" / "latest"), "nice good", "sad sad"]) == 0
    assert capsys.readouterr().out.splitlines() == ["pos\tnice good", "neg\tsad sad"]


def test_training_only_the_head_leaves_the_backbone_untouched(tmp_path):
    tok = char_tokenizer()
    base = model_dir(tmp_path / "base", tok, context_length=32)
    data = separable_csv(tmp_path / "data.csv", n=40)
    finetune_classify(base, data, tmp_path / "run", train="head", max_steps=3, batch_size=8, progress=False,
                      quiet=True, plot=False)
    before, _ = load_model(base)
    after, _ = load_model(tmp_path / "run" / "latest")
    assert all(torch.equal(p, q) for p, q in zip(before.state_dict().values(), after.state_dict().values()))


# ----------------------------------------------------------------------------------------
# Bad input: one clear line naming the file and the row; exit code 2 from the CLI
# ----------------------------------------------------------------------------------------
def run_cli(args, capsys):
    code = main(args)
    return code, capsys.readouterr().err


@pytest.fixture
def tiny_dir(tmp_path):
    return model_dir(tmp_path / "base", char_tokenizer(), context_length=32)


def test_row_missing_a_field(tmp_path, tiny_dir, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c"}])
    with pytest.raises(DataError, match=r"bad\.jsonl row 2: missing field 'output'"):
        load_records(bad)
    code, err = run_cli(["finetune", "instruct", str(tiny_dir), "--data", str(bad), "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and err.startswith("scratchlm: error:") and "bad.jsonl row 2" in err and "output" in err
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("text,label\ngood,pos\nbad\n")
    code, err = run_cli(["finetune", "classify", str(tiny_dir), "--data", str(bad_csv)], capsys)
    assert code == 2 and "bad.csv row 2" in err and "label" in err


def test_label_not_in_the_label_set(tmp_path, tiny_dir, capsys):
    data = tmp_path / "train.csv"
    data.write_text("text,label\ngood,pos\nbad,neg\nfine,neutral\n")
    code, err = run_cli(["finetune", "classify", str(tiny_dir), "--data", str(data), "--labels", "pos,neg"], capsys)
    assert code == 2 and "train.csv row 3" in err and "'neutral'" in err
    test = tmp_path / "test.csv"
    test.write_text("text,label\ngood,pos\nso so,meh\n")
    code, err = run_cli(["finetune", "classify", str(tiny_dir), "--data", str(data), "--test-data", str(test),
                         "--val-data", str(data)], capsys)
    assert code == 2 and "test.csv row 2" in err and "'meh'" in err


def test_empty_files(tmp_path, tiny_dir, capsys):
    for name in ("empty.jsonl", "empty.json"):
        (tmp_path / name).write_text("" if name.endswith("l") else "[]")
        code, err = run_cli(["finetune", "instruct", str(tiny_dir), "--data", str(tmp_path / name)], capsys)
        assert code == 2 and name in err and "empty" in err
    (tmp_path / "empty.csv").write_text("")
    code, err = run_cli(["finetune", "classify", str(tiny_dir), "--data", str(tmp_path / "empty.csv")], capsys)
    assert code == 2 and "empty.csv" in err and "empty" in err


def test_chat_with_no_assistant_turn(tmp_path, tiny_dir, capsys):
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
            {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]}]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    code, err = run_cli(["finetune", "instruct", str(tiny_dir), "--data", str(data)], capsys)
    assert code == 2 and "chat.jsonl row 2" in err and "no assistant turn" in err


def test_other_bad_input(tmp_path, tiny_dir, capsys):
    (tmp_path / "broken.jsonl").write_text('{"instruction": "a", "output": "b"}\n{not json\n')
    code, err = run_cli(["finetune", "instruct", str(tiny_dir), "--data", str(tmp_path / "broken.jsonl")], capsys)
    assert code == 2 and "broken.jsonl row 2" in err
    code, err = run_cli(["finetune", "instruct", str(tiny_dir), "--data", str(tmp_path / "missing.jsonl")], capsys)
    assert code == 2 and "missing.jsonl" in err
    (tmp_path / "role.jsonl").write_text(json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    code, err = run_cli(["finetune", "instruct", str(tiny_dir), "--data", str(tmp_path / "role.jsonl")], capsys)
    assert code == 2 and "role.jsonl row 1" in err and "robot" in err
    (tmp_path / "cols.csv").write_text("sentence,label\nhi,a\n")
    code, err = run_cli(["finetune", "classify", str(tiny_dir), "--data", str(tmp_path / "cols.csv")], capsys)
    assert code == 2 and "cols.csv" in err and "'text'" in err
    good = write_jsonl(tmp_path / "ok.jsonl", [{"instruction": "a", "output": "b"}])
    code, err = run_cli(["finetune", "instruct", str(tiny_dir), "--data", str(good), "--lora", "--lora-targets", "q_proj"], capsys)
    assert code == 2 and "q_proj" in err


def test_cli_instruct_end_to_end(tmp_path, capsys):
    base = model_dir(tmp_path / "base", char_tokenizer(), context_length=256)
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": q, "output": a} for q, a in FACTS])
    code = main(["finetune", "instruct", str(base), "--data", str(data), "--out", str(tmp_path / "run"),
                 "--max-steps", "2", "--batch-size", "2", "--template", "alpaca", "--packing", "--no-progress",
                 "--samples", "0"])
    assert code == 0 and read_prompt_format(tmp_path / "run" / "latest") == "alpaca"
    assert "done at step 2" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------
# Pieces: what trains, template choice, Ctrl-C
# ----------------------------------------------------------------------------------------
def test_train_last_n_blocks_unfreezes_exactly_those():
    from scratchlm.finetune.classify import Classifier, choose_trainable

    clf = Classifier(Transformer(ModelConfig.preset("llama-tiny", n_layers=3)), n_classes=2)
    choose_trainable(clf, 1)
    trainable = {n for n, p in clf.named_parameters() if p.requires_grad}
    expected = {n for n, _ in clf.named_parameters() if n.startswith(("backbone.blocks.2.", "backbone.final_norm", "head."))}
    assert trainable == expected
    choose_trainable(clf, "head")
    assert {n for n, p in clf.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}
    with pytest.raises(ValueError, match="3 blocks"):
        choose_trainable(clf, 5)


def test_template_detection_and_recorded_format(tmp_path):
    from scratchlm.chat import PromptFormatError, resolve_template, write_prompt_format

    def detect_template(tokenizer, model_dir=None, records=None):  # the choice when fine-tuning
        return resolve_template(None, tokenizer, model_dir, training=True, records=records)

    chat_data = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                               {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}]
    assert detect_template(char_tokenizer(LLAMA_SPECIALS)) == "llama3"
    assert detect_template(char_tokenizer(CHAT_SPECIALS)) == "chatml"
    assert detect_template(char_tokenizer(["<|endoftext|>"])) == "alpaca"
    assert detect_template(char_tokenizer(["<|endoftext|>"]), records=chat_data) == "chatml"  # multi-turn
    write_prompt_format(tmp_path, "alpaca")
    assert detect_template(char_tokenizer(CHAT_SPECIALS), tmp_path) == "alpaca"  # what the model was tuned on
    with pytest.raises(PromptFormatError, match="alpaca template"):
        render_example(chat_data[0], "alpaca")


def test_ctrl_c_stops_after_the_step_and_saves(tmp_path):
    import os
    import signal

    from scratchlm.train import LoopConfig, Task, Trainer

    saved = []

    class Interrupted(Task):
        def model(self, resume_from):
            return torch.nn.Linear(3, 1)

        def micro_batch(self, step, micro, rank, world, model):
            if step == 2:
                os.kill(os.getpid(), signal.SIGINT)  # as if the user pressed Ctrl-C during step 3
            return torch.randn(4, 3), torch.randn(4, 1)

        def loss(self, model, batch):
            return torch.nn.functional.mse_loss(model(batch[0]), batch[1]), {}, 4

        def save(self, directory, weights, extra):
            directory.mkdir(parents=True, exist_ok=True)
            extra(directory)
            saved.append(directory.name)

    cfg = LoopConfig(out_dir=str(tmp_path), max_steps=100, batch_size=4, progress=False, plot=False, device="cpu")
    result = Trainer(cfg, Interrupted(), quiet=True).run()
    assert result.interrupted and result.step == 3
    state = load_train_state(tmp_path / "latest")
    assert saved[-1] == "latest" and state["step"] == 3 and "optimizer" in state


def test_examples_whose_prompt_fills_the_context_are_left_out():
    from scratchlm.finetune.instruct_data import make_examples

    tok = char_tokenizer()
    short, long = {"instruction": "Hi.", "output": "Hello."}, {"instruction": "Hi " * 40, "output": "Hello."}
    with pytest.warns(UserWarning, match="1 of 2 examples"):
        examples, cut = make_examples([short, long], tok, "chatml", max_length=40, source="d.jsonl")
    assert len(examples) == 1 and cut == 1
    with pytest.raises(DataError, match="d.jsonl: 1 of 1 examples"):
        make_examples([long], tok, "chatml", max_length=40, source="d.jsonl")
