"""Hostile but honest input to the command line (issue 11): every cause found is one line on
stderr and exit code 2 (or, where the input makes sense, a working command), never a
traceback, a hang, an unbounded allocation or a silent wrong answer.

Each test runs ``scratchlm.cli.main`` in-process, the way the command line does."""

import errno
import json
import os
import shutil

import numpy as np
import pytest
import torch

from scratchlm.checkpoint import load_model, save_model
from scratchlm.cli import main as cli_main
from scratchlm.config import ModelConfig
from scratchlm.data import DataError, load_split, prepare
from scratchlm.model import Transformer
from scratchlm.tokenizer import CharTokenizer

TEXT = "\n\n".join([f"def f{i}(x):\n    return x * {i} + {i * i}  # the number {i}" for i in range(200)]
                   + ["".join(map(chr, range(32, 127))) + "\t"])  # every printable character once
TRAIN = ["--model", "gpt-tiny", "--context_length", "64", "--max_steps", "2", "--warmup_steps", "1",
         "--eval_batches", "1", "--eval_every", "2", "--sample_tokens", "0", "--batch_size", "2", "--no-progress",
         "--no-plot", "--device", "cpu", "--precision", "fp32", "--threads", "1"]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A corpus, a prepared (character) dataset and a model trained for two steps on it."""
    root = tmp_path_factory.mktemp("hostile")
    (root / "corpus.txt").write_text(TEXT)
    prepare([str(root / "corpus.txt")], out_dir=root / "data", tokenizer="char", progress=False)
    torch.set_num_threads(1)
    assert main(["train", "--data", str(root / "data"), "--out_dir", str(root / "run"), *TRAIN]) == 0
    return root


def main(argv: list[str]) -> int:
    """The exit code of the command line (argparse's own errors leave by SystemExit)."""
    try:
        return cli_main(argv)
    except SystemExit as e:
        return e.code


def one_line_error(capsys, *words: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith("scratchlm") and "error: " in err and err.count("\n") == 1, err
    for word in words:
        assert word in err, err
    return err


# ---- options that made no sense, or allocated without bound -------------------------------------
@pytest.mark.parametrize("option, value, message", [
    ("--batch_size", "1000000000", "needs at least"),  # refused before it allocates, not after
    ("--grad_accum", "1000000000", "grad_accum must be at most"),  # one step that never ends
    ("--grad_accum", "99999999999999999999", "grad_accum must be at most"),  # was an overflow traceback
    ("--d_model", "4000000", "needs at least"),
    ("--d_model", "1000000000", "needs at least"),  # was an overflow traceback while building
    ("--n_layers", "1000000000", "n_layers must be at most"),  # was a hang: a billion blocks built one by one
    ("--threads", "1000000000", "threads must be at most"),  # was libgomp asking for 216 GB
    ("--seed", "99999999999999999999", "seed must be between"),  # was an overflow traceback
    ("--context_length", "1000000000000", "context_length must be at most"),
    ("--device", "bogus", "unknown device"),
    ("--device", "meta", "trains on cpu, cuda or mps"),
    ("--threads", "-3", "threads must be a positive integer"),
    ("--stop_at_step", "-1", "stop_at_step must be >= 0"),
    ("--stride", "-4", "stride must be a positive integer"),  # was "not enough tokens for one window"
    ("--model_config", '{"tie_embeddings": "false"}', "tie_embeddings must be true or false"),
    ("--model_config", '{"bias": 1}', "bias must be true or false"),
    ("--model_config", '{"rope_theta": "1e4"}', "rope_theta must be a number"),
    ("--model_config", '{"n_layers": 2.0}', "n_layers must be an integer"),
])
def test_train_refuses_impossible_options_up_front(root, tmp_path, capsys, option, value, message):
    code = main(["train", "--data", str(root / "data"), "--out_dir", str(tmp_path / "run"), *TRAIN, option, value])
    assert code == 2
    one_line_error(capsys, message)
    assert not (tmp_path / "run" / "latest").exists()


@pytest.mark.parametrize("value", ["-1", "nan", "0", "inf"])
def test_prepare_refuses_a_tokenizer_sample_of_no_text(root, tmp_path, capsys, value):
    assert main(["prepare", str(root / "corpus.txt"), "--out", str(tmp_path / "d"), "--tokenizer-sample-mb",
                 value]) == 2
    one_line_error(capsys, "tokenizer_sample_mb")


@pytest.mark.parametrize("value, message", [("0", "shard_tokens"), ("-1", "shard_tokens"),
                                            ("1e12", "invalid int value")])
def test_prepare_refuses_bad_shard_sizes(root, tmp_path, capsys, value, message):
    assert main(["prepare", str(root / "corpus.txt"), "--tokenizer", "char", "--out", str(tmp_path / "d"),
                 "--shard-tokens", value]) == 2
    one_line_error(capsys, message)


def test_tokenizer_train_refuses_an_empty_special_token_and_a_vocabulary_past_32_bits(root, tmp_path, capsys):
    # An empty special token once made `tokenizer encode` spin forever inside tiktoken.
    assert main(["tokenizer", "train", str(root / "corpus.txt"), "--special", "", "--out", str(tmp_path / "a")]) == 2
    one_line_error(capsys, "special")
    assert main(["tokenizer", "train", str(root / "corpus.txt"), "--vocab-size", str(2**40),
                 "--out", str(tmp_path / "b")]) == 2
    one_line_error(capsys, "vocab")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_tokenizer_train_says_when_the_vocabulary_is_not_reached(root, tmp_path, capsys):
    assert main(["tokenizer", "train", str(root / "corpus.txt"), "--vocab-size", "100000",
                 "--out", str(tmp_path / "t")]) == 0
    err = capsys.readouterr().err
    assert "not the 100,000 asked for" in err


@pytest.mark.parametrize("kind", ["file", "fifo"])
def test_output_paths_that_are_files_are_refused(root, tmp_path, capsys, kind):
    target = tmp_path / "out"
    if kind == "file":
        target.write_text("mine")
    else:
        os.mkfifo(target)
    for argv in (["tokenizer", "train", str(root / "corpus.txt"), "--out", str(target)],
                 ["prepare", str(root / "corpus.txt"), "--tokenizer", "char", "--out", str(target)],
                 ["train", "--data", str(root / "data"), *TRAIN, "--out_dir", str(target)]):
        assert main(argv) == 2, argv
        one_line_error(capsys)
    assert kind == "fifo" or target.read_text() == "mine"


# ---- files that are not what they claim -----------------------------------------------------------
def _model_copy(root, tmp_path, edit):
    model = tmp_path / "model"
    shutil.copytree(root / "run" / "latest", model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(edit(config)))
    return model


@pytest.mark.parametrize("edit, message", [
    (lambda c: None, "config"),
    (lambda c: [], "config"),
    (lambda c: {**c, "context_length": 10**12}, "context_length must be at most"),
    (lambda c: {**c, "tie_embeddings": "false"}, "tie_embeddings must be true or false"),
    (lambda c: {**c, "norm_eps": "1e-5"}, "norm_eps must be a number"),
])
def test_a_model_folder_with_a_bad_config_is_one_line(root, tmp_path, capsys, edit, message):
    model = _model_copy(root, tmp_path, edit)
    assert main(["generate", str(model), "def", "--max-new-tokens", "2"]) == 2
    one_line_error(capsys, message)


@pytest.mark.parametrize("meta, message", [
    ([], "not a prepared dataset's meta.json"),
    ({"vocab_size": 50}, "eot_id"),
    ({"vocab_size": 50, "eot_id": 0, "splits": {"train": {"tokens": 10}}}, "splits.train"),
])
def test_a_bad_meta_json_is_one_line(root, tmp_path, capsys, meta, message):
    data = tmp_path / "data"
    shutil.copytree(root / "data", data)
    (data / "meta.json").write_text(json.dumps(meta))
    assert main(["train", "--data", str(data), "--out_dir", str(tmp_path / "run"), *TRAIN]) == 2
    one_line_error(capsys, message)


def test_a_dataset_whose_tokenizer_disagrees_with_its_vocabulary_is_refused(root, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(root / "data", data)
    for name in os.listdir(data):  # another tokenizer, with fewer ids, in the same folder
        if not name.endswith(".bin") and name != "meta.json":
            (data / name).unlink()
    CharTokenizer.train(["abc"], special_tokens=["<|endoftext|>"]).save(data)
    assert main(["train", "--data", str(data), "--out_dir", str(tmp_path / "run"), *TRAIN]) == 2
    one_line_error(capsys, "vocab_size", "tokenizer")


def test_a_shard_truncated_while_training_runs_is_named_not_sigbus(root, tmp_path):
    from scratchlm.batches import BatchSampler

    data = tmp_path / "data"
    shutil.copytree(root / "data", data)
    sampler = BatchSampler(load_split(data, "train"), context_length=64, batch_size=4, seed=0)
    x, y = sampler.micro_batch(0, 0)  # reads fine while the file is whole
    shard = sorted(data.glob("train_*.bin"))[0]
    os.truncate(shard, 64)  # a page the memory map still points past: reading it is SIGBUS
    with pytest.raises(DataError, match=f"{shard.name} shrank"):
        for step in range(1, 50):
            sampler.micro_batch(step, 0)


# ---- a full disk ---------------------------------------------------------------------------------
def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_during_a_checkpoint_save_is_one_line_and_keeps_the_last_one(root, tmp_path, capsys,
                                                                                   monkeypatch):
    import scratchlm.checkpoint as checkpoint

    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    before = load_model(run / "latest")[0].state_dict()
    monkeypatch.setattr(checkpoint, "save_file", _no_space)
    assert main(["train", "--data", str(root / "data"), "--out_dir", str(run), *TRAIN, "--max_steps", "4",
                 "--resume"]) == 2
    one_line_error(capsys, "No space left on device", "keeps step 2")
    after = load_model(run / "latest")[0].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_a_full_disk_while_appending_metrics_is_one_line(root, tmp_path, capsys, monkeypatch):
    import builtins

    import scratchlm.train.core as core

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.f, name)

    def fake_open(path, mode="r", *args, **kwargs):
        f = builtins.open(path, mode, *args, **kwargs)
        return FullDisk(f) if str(path).endswith("metrics.jsonl") and "a" in mode else f

    monkeypatch.setattr(core, "open", fake_open, raising=False)
    assert main(["train", "--data", str(root / "data"), "--out_dir", str(tmp_path / "run"), *TRAIN,
                 "--log_every", "1"]) == 2
    one_line_error(capsys, "metrics.jsonl", "No space left on device")


# ---- generation ------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", ["1e-45", "1e-300"])
def test_a_tiny_temperature_is_greedy_not_a_traceback(root, capsys, temperature):
    model = str(root / "run" / "latest")
    assert main(["generate", model, "def f1", "--max-new-tokens", "6", "--temperature", temperature,
                 "--seed", "1"]) == 0
    sampled = capsys.readouterr().out
    assert main(["generate", model, "def f1", "--max-new-tokens", "6"]) == 0
    assert sampled == capsys.readouterr().out  # the limit of sampling as temperature -> 0


@pytest.mark.parametrize("option, value", [("--temperature", "inf"), ("--temperature", "nan"),
                                           ("--repetition-penalty", "inf")])
def test_non_finite_sampling_options_are_refused(root, capsys, option, value):
    assert main(["generate", str(root / "run" / "latest"), "def", option, value]) == 2
    one_line_error(capsys, option[2:].replace("-", "_"))


def test_a_model_with_more_ids_than_its_tokenizer_only_generates_decodable_ids(tmp_path):
    from scratchlm.generate import generate

    tok = CharTokenizer.train([TEXT], special_tokens=["<|endoftext|>"])
    config = ModelConfig.preset("gpt-tiny", vocab_size=tok.vocab_size + 40, context_length=64,
                                tie_embeddings=False)
    torch.manual_seed(0)
    model = Transformer(config).eval()
    with torch.no_grad():  # make the ids past the tokenizer the most likely ones at every position:
        u = torch.zeros(config.d_model)  # every final hidden state gets + u (the norm's bias),
        u[0] = 10.0
        model.final_norm.bias.copy_(u)
        model.lm_head.weight[tok.vocab_size:] = u  # and those rows read u: logits of about 100
    save_model(tmp_path / "m", model, tok)
    model, tok = load_model(tmp_path / "m")
    logits = model(torch.tensor([tok.encode("def f")]))[0, -1]
    assert logits.argmax() >= tok.vocab_size  # unrestricted greedy would pick an undecodable id
    for temperature in (0.0, 1.0):
        [out] = generate(model, tok, ["def f"], max_new_tokens=12, temperature=temperature, seed=0,
                         ignore_eos=True)
        assert len(out.token_ids) == 12 and max(out.token_ids) < tok.vocab_size
        assert out.text == tok.decode(out.token_ids)


# ---- LoRA ------------------------------------------------------------------------------------------
def test_merge_lora_refuses_a_base_other_than_the_adapters(root, tmp_path, capsys):
    rows = [{"instruction": f"add {i} and {i}", "input": "", "output": f"{2 * i}"} for i in range(20)]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = root / "run" / "latest"
    assert main(["finetune", "instruct", str(base), "--data", str(tmp_path / "sft.jsonl"),
                 "--out_dir", str(tmp_path / "ft"), "--lora", "--max_steps", "1", "--batch_size", "2", "--template", "plain",
                 "--no-progress", "--no-plot", "--n_samples", "0"]) == 0
    capsys.readouterr()
    other = tmp_path / "other"  # the same architecture and tokenizer, other weights
    torch.manual_seed(1)
    model, tok = load_model(base)
    save_model(other, Transformer(model.config), tok)
    assert main(["merge-lora", str(other), str(tmp_path / "ft" / "latest"), str(tmp_path / "merged")]) == 2
    one_line_error(capsys, "trained on another base model")
    assert not (tmp_path / "merged").exists()
    assert main(["merge-lora", str(base), str(tmp_path / "ft" / "latest"), str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "model.safetensors").exists()


def test_a_bf16_copy_of_the_base_still_takes_its_adapter(root, tmp_path):
    from scratchlm.lora import apply_lora, load_adapter, save_adapter

    model, _ = load_model(root / "run" / "latest")
    apply_lora(model, 4, 8.0, 0.0, ["qkv_proj"])
    save_adapter(tmp_path / "a", model, base_model="base")
    half, _ = load_model(root / "run" / "latest", dtype=torch.bfloat16)
    load_adapter(half, tmp_path / "a")  # the same weights, rounded: accepted
    assert np.isfinite(half.lm_head.weight.float().sum().item())


@pytest.mark.parametrize("argv, message", [
    (["generate", "{model}", "def", "--temperature", "0.8", "--seed", "99999999999999999999"], "--seed"),
    (["generate", "{model}", "def", "--temperature", "0.8", "--seed", "-1"], "--seed"),
    (["eval", "{model}", "--tasks", "{corpus}", "--limit", "0"], "--limit"),  # was: every item, silently
    (["eval", "{model}", "--tasks", "{corpus}", "--temperature", "nan"], "--temperature"),
    (["eval", "{model}", "--tasks", "{corpus}", "--temperature", "-1"], "--temperature"),
    (["eval", "{model}", "--tasks", "{corpus}", "--timeout", "nan"], "--timeout"),
    (["eval", "{model}", "--tasks", "{corpus}", "--max-new-tokens", "-1"], "--max-new-tokens"),
])
def test_generate_and_eval_refuse_numbers_out_of_range(root, capsys, argv, message):
    argv = [a.format(model=root / "run" / "latest", corpus=root / "corpus.txt") for a in argv]
    assert main(argv) == 2
    one_line_error(capsys, message)


def test_a_lora_rank_past_the_layers_is_refused(root, tmp_path, capsys):
    rows = [{"instruction": "a", "input": "", "output": "b"}] * 8
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["finetune", "instruct", str(root / "run" / "latest"), "--data", str(tmp_path / "sft.jsonl"),
                 "--out_dir", str(tmp_path / "ft"), "--template", "plain", "--lora", "--lora_rank", "99999999999999999999",
                 "--max_steps", "1", "--no-progress", "--no-plot"]) == 2  # was an overflow traceback
    one_line_error(capsys, "LoRA rank")


@pytest.mark.parametrize("name, content", [("c.yaml", "caf\xe9: 1\n".encode("latin-1")), ("c.toml", bytes(range(256))),
                                           ("c.bin", bytes(range(256)))])
def test_a_config_file_that_is_not_utf8_text_is_one_line(root, tmp_path, capsys, name, content):
    (tmp_path / name).write_bytes(content)  # was a UnicodeDecodeError traceback
    assert main(["train", "--data", str(root / "data"), "--out_dir", str(tmp_path / "run"), *TRAIN,
                 "--config", str(tmp_path / name)]) == 2
    one_line_error(capsys, name)


@pytest.mark.parametrize("task, name", [("instruct", "d.jsonl"), ("classify", "d.csv")])
@pytest.mark.parametrize("kind", ["fifo", "latin1"])
def test_finetune_data_that_is_a_fifo_or_not_utf8_is_one_line(root, tmp_path, capsys, task, name, kind):
    data = tmp_path / name
    if kind == "fifo":
        os.mkfifo(data)  # reading it would wait forever for a writer
    else:
        data.write_bytes("text,label\ncaf\xe9,a\n".encode("latin-1"))  # was a UnicodeDecodeError traceback
    assert main(["finetune", task, str(root / "run" / "latest"), "--data", str(data), "--out_dir",
                 str(tmp_path / "ft"), "--max_steps", "1", "--no-progress", "--no-plot"]) == 2
    one_line_error(capsys, name)
