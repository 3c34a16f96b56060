"""Hugging Face directories in and out: load, convert, export, round trip, bad input, CLI."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from scratchlm.cli import main
from scratchlm.generate import generate

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

TEXT = ("The quick brown fox jumps over the lazy dog. " * 5 + "Hello world! Generation runs token by token, "
        "and a cache keeps the keys and values. Ünïcödé, naïve café: 😀 ok.\n") * 3


def hf_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT], trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                                bos_token="<|endoftext|>")


def make_hf(kind, vocab):
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=128, n_embd=32, n_layer=2, n_head=4)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                       tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # sharper logits: greedy choices are then not near-ties
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return model.eval()


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def hf_dir(request, tmp_path_factory):
    """(kind, directory, hf_model, hf_tokenizer): a tiny random model saved like a hub download."""
    tok = hf_tokenizer()
    model = make_hf(request.param, len(tok))
    d = tmp_path_factory.mktemp(f"hf-{request.param}")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return request.param, d, model, tok


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits if hasattr(model, "generation_config") else model(ids)


IDS = torch.tensor([[5, 17, 42, 8, 3, 99, 7]])


# ---- loading ---------------------------------------------------------------------------------
def test_load_hf_dir_gives_same_logits(hf_dir):
    from scratchlm.hf import load_hf

    _, d, hf, _ = hf_dir
    ours, _ = load_hf(d)
    assert torch.allclose(logits(ours, IDS), logits(hf, IDS), atol=1e-4)


def test_sharded_safetensors_and_pytorch_bin(hf_dir, tmp_path):
    from scratchlm.hf import load_hf

    kind, _, hf, _ = hf_dir
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="30KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    ours, _ = load_hf(tmp_path / "sharded")
    assert torch.allclose(logits(ours, IDS), logits(hf, IDS), atol=1e-4)

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy(tmp_path / "sharded" / "config.json", bin_dir)
    torch.save(hf.state_dict(), bin_dir / "pytorch_model.bin")
    ours, _ = load_hf(bin_dir)
    assert torch.allclose(logits(ours, IDS), logits(hf, IDS), atol=1e-4)


def test_bf16_checkpoint_stays_bf16_unless_asked(hf_dir, tmp_path):
    from scratchlm.hf import load_hf

    kind, _, hf, _ = hf_dir
    import copy

    copy.deepcopy(hf).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    ours, _ = load_hf(tmp_path / "bf16")
    assert ours.tok_emb.weight.dtype == torch.bfloat16 and ours.config.dtype == "bfloat16"
    ours32, _ = load_hf(tmp_path / "bf16", dtype=torch.float32)
    assert ours32.tok_emb.weight.dtype == torch.float32
    assert torch.allclose(logits(ours32, IDS), logits(hf, IDS), atol=0.5)  # bf16-rounded weights


# ---- round trip through the CLI ---------------------------------------------------------------
def test_convert_then_export_round_trip(hf_dir, tmp_path, capsys):
    kind, d, hf, hf_tok = hf_dir
    assert main(["convert", str(d), str(tmp_path / "ours")]) == 0
    assert (tmp_path / "ours" / "model.safetensors").exists()
    assert main(["export", str(tmp_path / "ours"), str(tmp_path / "back"), "--format", "hf"]) == 0
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert again.config.model_type == kind
    assert torch.equal(logits(again, IDS), logits(hf, IDS))  # same weights, same code: bit for bit
    # The tokenizer went along: transformers loads it and encodes as the original does.
    tok_again = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    assert tok_again("Hello world! café 😀")["input_ids"] == hf_tok("Hello world! café 😀")["input_ids"]
    # ... and scratchlm's copy of it encodes and decodes the same way.
    from scratchlm.load import load_any

    ours, tok = load_any(tmp_path / "ours")
    assert tok.encode("Hello world! café") == hf_tok("Hello world! café")["input_ids"]
    assert tok.decode(tok.encode(TEXT[:200])) == TEXT[:200]


def test_greedy_generation_of_converted_model_matches_hf(hf_dir, tmp_path):
    from scratchlm.hf import load_hf

    _, d, hf, hf_tok = hf_dir
    ours, tok = load_hf(d)
    prompt = "The quick brown"
    ids = hf_tok(prompt, return_tensors="pt")["input_ids"]
    expected = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                           eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:].tolist()
    [c] = generate(ours, tok, prompt, max_new_tokens=12, ignore_eos=True)
    assert c.token_ids == expected
    assert c.text == hf_tok.decode(expected)


def test_generate_cli_prints_the_continuation(hf_dir, tmp_path, capsys):
    from scratchlm.hf import load_hf

    _, d, _, _ = hf_dir
    ours, tok = load_hf(d)
    expected = generate(ours, tok, "Hello world", max_new_tokens=8, ignore_eos=True)[0].text
    tok_eot_hit = generate(ours, tok, "Hello world", max_new_tokens=8)[0].text
    assert main(["generate", str(d), "Hello world", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out == tok_eot_hit + "\n"
    assert main(["generate", str(d), "Hello world", "--max-new-tokens", "8", "--stream"]) == 0
    assert capsys.readouterr().out == tok_eot_hit + "\n"
    assert expected.startswith(tok_eot_hit)
    # Sampling options are honoured: a seed makes the output repeatable.
    args = ["generate", str(d), "Hello", "--temperature", "1.2", "--top-k", "50", "--top-p", "0.95",
            "--min-p", "0.01", "--repetition-penalty", "1.1", "--seed", "7", "--max-new-tokens", "10", "--no-cache"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first


def test_chat_cli_reads_stdin(hf_dir, tmp_path):
    import os

    from scratchlm.chat import chat_stops, render_chat
    from scratchlm.hf import load_hf

    _, d, _, _ = hf_dir
    run = subprocess.run([sys.executable, "-m", "scratchlm.cli", "chat", str(d), "--max-new-tokens", "6",
                          "--template", "chatml", "--system", "Be brief."],
                         input="Hello there\n/reset\nHow are you?\n/exit\nnot read\n", capture_output=True,
                         encoding="utf-8", timeout=120, env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert run.returncode == 0, run.stderr
    # Each user turn (the history reset in between) gets the reply generate() gives.
    model, tok = load_hf(d)
    strings, ids = chat_stops("chatml", tok)
    expected = ""
    for question in ("Hello there", "How are you?"):
        prompt = render_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": question}],
                             "chatml", tok)
        reply = generate(model, tok, prompt, max_new_tokens=6, stop=strings, stop_token_ids=ids)[0].text
        expected += reply.lstrip() + "\n"
    assert run.stdout == expected


# ---- bad input ---------------------------------------------------------------------------------
def cli_error(args, capsys):
    capsys.readouterr()  # drop what came before (e.g. transformers' progress bars)
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("scratchlm: error: ") and len(err.strip().splitlines()) == 1
    return err


def test_missing_directory(tmp_path, capsys):
    err = cli_error(["convert", str(tmp_path / "nope"), str(tmp_path / "out")], capsys)
    assert "nope" in err
    cli_error(["generate", str(tmp_path / "nope"), "hi"], capsys)
    cli_error(["export", str(tmp_path / "nope"), str(tmp_path / "out")], capsys)


def test_partial_directories(hf_dir, tmp_path, capsys):
    _, d, hf, _ = hf_dir
    only_config = tmp_path / "only-config"
    only_config.mkdir()
    shutil.copy(d / "config.json", only_config)
    assert "no weights" in cli_error(["convert", str(only_config), str(tmp_path / "o")], capsys)

    no_config = tmp_path / "no-config"
    no_config.mkdir()
    shutil.copy(d / "model.safetensors", no_config)
    assert "config.json" in cli_error(["convert", str(no_config), str(tmp_path / "o")], capsys)

    hf.save_pretrained(tmp_path / "shards", max_shard_size="30KB")
    shard = sorted((tmp_path / "shards").glob("model-*.safetensors"))[-1]
    shard.unlink()
    assert shard.name in cli_error(["convert", str(tmp_path / "shards"), str(tmp_path / "o")], capsys)

    truncated = tmp_path / "truncated"
    shutil.copytree(d, truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert "model.safetensors" in cli_error(["convert", str(truncated), str(tmp_path / "o")], capsys)
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_unknown_model_type(hf_dir, tmp_path, capsys):
    _, d, _, _ = hf_dir
    bad = tmp_path / "bert"
    shutil.copytree(d, bad)
    config = json.loads((bad / "config.json").read_text())
    config["model_type"] = "bert"
    (bad / "config.json").write_text(json.dumps(config))
    assert "bert" in cli_error(["convert", str(bad), str(tmp_path / "o")], capsys)


def test_mismatched_shapes(hf_dir, tmp_path, capsys):
    kind, d, _, _ = hf_dir
    bad = tmp_path / "shapes"
    shutil.copytree(d, bad)
    config = json.loads((bad / "config.json").read_text())
    config["n_embd" if kind == "gpt2" else "intermediate_size"] = 48
    if kind == "llama":
        config.pop("head_dim", None)
    (bad / "config.json").write_text(json.dumps(config))
    assert "shape" in cli_error(["convert", str(bad), str(tmp_path / "o")], capsys)


def test_bad_sampling_options_on_the_cli(hf_dir, capsys):
    _, d, _, _ = hf_dir
    assert "temperature" in cli_error(["generate", str(d), "hi", "--temperature", "-1"], capsys)
    assert "top_p" in cli_error(["generate", str(d), "hi", "--top-p", "0"], capsys)
    assert "top_p" in cli_error(["generate", str(d), "hi", "--top-p", "1.5"], capsys)
    assert "empty" in cli_error(["generate", str(d), ""], capsys)
    assert "context" in cli_error(["generate", str(d), "hi " * 90, "--max-new-tokens", "60"], capsys)


def test_export_refuses_a_shape_hf_has_not(tmp_path, capsys):
    from scratchlm import ModelConfig, Transformer
    from scratchlm.checkpoint import save_model

    save_model(tmp_path / "sin", Transformer(ModelConfig.preset("gpt-tiny").replace(positions="sinusoidal")))
    assert "exported" in cli_error(["export", str(tmp_path / "sin"), str(tmp_path / "o")], capsys)


# ---- load_any -----------------------------------------------------------------------------------
def test_load_any_presets_and_errors(tmp_path):
    from scratchlm.load import load_any

    model, tok = load_any("llama-tiny")
    assert model.config.n_kv_heads == 2 and not model.training
    again, _ = load_any("llama-tiny")
    assert torch.equal(model.tok_emb.weight, again.tok_emb.weight)  # seeded: repeatable
    text = "héllo"
    assert tok.decode(tok.encode(text)) == text
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        load_any("no-such-preset")
    with pytest.raises(FileNotFoundError, match="owner/nothing-here"):
        load_any("owner/nothing-here")  # offline: not fetched, one clear line


def test_a_missing_local_path_is_not_sent_to_the_hub(tmp_path, monkeypatch):
    """`runs/nope` when ./runs exists is a missing directory, said at once (no network retries)."""
    import scratchlm.load as load

    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(load, "load_hf", lambda *a, **k: pytest.fail("asked the hub for a local path"))
    with pytest.raises(FileNotFoundError, match="model directory not found: runs/nope"):
        load.load_any("runs/nope")


# ---- outputs that must not be written over ------------------------------------------------------
def _tree(path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_export_and_convert_never_write_over_their_input_a_users_folder_or_a_file(hf_dir, tmp_path, capsys):
    _, d, _, _ = hf_dir
    assert main(["convert", str(d), str(tmp_path / "m")]) == 0
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("buy milk")
    file = tmp_path / "out.bin"
    file.write_bytes(b"precious")
    before = {p: _tree(p) for p in (tmp_path / "m", notes, d)}

    assert "input" in cli_error(["export", str(tmp_path / "m"), str(tmp_path / "m")], capsys)
    assert "input" in cli_error(["export", str(tmp_path / "m"), str(tmp_path / "." / "m" / "..")], capsys)
    assert "notes is a folder that holds no config.json" in cli_error(
        ["export", str(tmp_path / "m"), str(notes)], capsys)
    assert "is a file" in cli_error(["export", str(tmp_path / "m"), str(file)], capsys)
    assert "input" in cli_error(["convert", str(d), str(d)], capsys)
    assert "is a file" in cli_error(["convert", str(d), str(file)], capsys)

    assert {p: _tree(p) for p in (tmp_path / "m", notes, d)} == before
    assert file.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "notes", "out.bin"]  # no .old, no .tmp-*
    # A model folder of ours is still replaced (the round trip above writes "back" twice).
    assert main(["export", str(tmp_path / "m"), str(tmp_path / "back")]) == 0
    assert main(["export", str(tmp_path / "m"), str(tmp_path / "back")]) == 0


def test_a_name_that_can_be_a_local_path_never_goes_to_the_hub(tmp_path, monkeypatch):
    """A missing `run2/latest` (no `run2/` here either) is a missing directory, said at once:
    the name is never sent to the hub. Only `owner/name` that cannot be a path is a hub id."""
    import scratchlm.hub as hub
    import scratchlm.load as load
    from scratchlm.errors import NotFound

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hub, "download", lambda *a, **k: pytest.fail(f"asked the hub for {a}"))
    for ref in ("run2/latest", "run2/best", "runs/x/latest", "./owner/name", "owner/name/extra", "owner/",
                "/owner/name", "~/owner", "owner/model.safetensors", "owner/config.json", "-owner/name",
                "owner/na me", "own..er/name", "owner/name.", "owner\\name"):
        with pytest.raises(NotFound) as e:
            load.load_any(ref)
        assert ref in str(e.value) and "\n" not in str(e.value)
        assert not hub.is_hub_id(ref), ref
    with pytest.raises(NotFound, match="model directory not found: run2/latest"):
        load.load_any("run2/latest")
    for ref in ("openai-community/gpt2", "meta-llama/Llama-3.2-1B", "HuggingFaceTB/SmolLM2-135M-Instruct", "a/b"):
        assert hub.is_hub_id(ref), ref
    (tmp_path / "meta-llama").mkdir()  # a folder of that name here: then it is a (missing) local path
    assert not hub.is_hub_id("meta-llama/Llama-3.2-1B")


def test_offline_the_hub_is_never_asked(tmp_path, monkeypatch, capsys):
    """HF_HUB_OFFLINE=1 (or `serve --offline`): a hub id is looked up in the local cache only,
    and a miss is one line that says it is offline."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    from scratchlm.cli import main
    from scratchlm.errors import NotFound
    from scratchlm.hub import download

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-cache"))  # an empty cache
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda *a, **k: pytest.fail("asked the hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(NotFound, match="offline"):
        download("owner/some-model")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert main(["serve", "owner/some-model", "--offline", "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "owner/some-model" in err and "offline" in err and "\n" not in err, err
