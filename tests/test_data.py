"""Data: shards on disk, document separators, windows and batches, `scratchlm prepare`."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from scratchlm.batches import BatchSampler, SlidingWindows, eval_batches
from scratchlm.cli import main
from scratchlm.corpus import find_text_files, load_corpus, python_docs, python_reference
from scratchlm.data import HEADER, DataError, load_meta, load_split, prepare, read_shard, token_dtype, write_shard
from scratchlm.tokenizer import load_tokenizer


# ---- shards --------------------------------------------------------------------------------
def test_shard_round_trip_uint16(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 50257, size=10_000)
    write_shard(tmp_path / "s.bin", tokens, vocab_size=50257)
    back = read_shard(tmp_path / "s.bin")
    assert back.dtype == np.uint16
    np.testing.assert_array_equal(back, tokens)
    # The header records 2 bytes per token; the file is header + 2 bytes per token.
    _, version, itemsize, n = HEADER.unpack((tmp_path / "s.bin").read_bytes()[:HEADER.size])
    assert (version, itemsize, n) == (1, 2, 10_000)
    assert (tmp_path / "s.bin").stat().st_size == HEADER.size + 2 * 10_000


def test_vocab_over_65535_uses_uint32(tmp_path):
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    tokens = np.array([0, 65535, 65536, 128255, 7])  # ids that do not fit in 16 bits survive
    write_shard(tmp_path / "s.bin", tokens, vocab_size=128256)
    back = read_shard(tmp_path / "s.bin")
    assert back.dtype == np.uint32
    assert back.tolist() == tokens.tolist()
    assert HEADER.unpack((tmp_path / "s.bin").read_bytes()[:HEADER.size])[2] == 4


def test_shard_rejects_ids_outside_vocab_and_bad_files(tmp_path):
    with pytest.raises(DataError, match=r"s\.bin: token id 300 is outside the vocabulary \(ids 0\.\.255\)"):
        write_shard(tmp_path / "s.bin", np.array([1, 300]), vocab_size=256)
    with pytest.raises(DataError, match="token id -1"):
        write_shard(tmp_path / "s.bin", np.array([-1, 3]), vocab_size=256)
    with pytest.raises(DataError, match="must be integers"):
        write_shard(tmp_path / "s.bin", np.array([1.5]), vocab_size=256)
    with pytest.raises(DataError, match="does not fit a shard"):
        write_shard(tmp_path / "s.bin", np.array([1]), vocab_size=2**32 + 1)
    assert not (tmp_path / "s.bin").exists()  # nothing written for a refused shard
    write_shard(tmp_path / "s.bin", np.arange(100), vocab_size=256)
    data = (tmp_path / "s.bin").read_bytes()
    (tmp_path / "short.bin").write_bytes(data[:-10])
    with pytest.raises(DataError, match="truncated"):
        read_shard(tmp_path / "short.bin")
    (tmp_path / "junk.bin").write_bytes(b"not a shard at all, just bytes....")
    with pytest.raises(DataError, match="not a scratchlm token shard"):
        read_shard(tmp_path / "junk.bin")


# ---- windows and batches ---------------------------------------------------------------------
def test_sliding_window_inputs_and_targets():
    tokens = np.arange(100, 120)  # 20 tokens
    ds = SlidingWindows([tokens], context_length=4, stride=3)
    assert len(ds) == (20 - 4 - 1) // 3 + 1 == 6
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.tolist() == list(range(100 + 3 * i, 104 + 3 * i))
        assert y.tolist() == list(range(101 + 3 * i, 105 + 3 * i))  # x shifted by one
    with pytest.raises(IndexError):
        ds[len(ds)]
    # Works with a DataLoader, as any map-style dataset.
    x, y = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert x.shape == y.shape == (2, 4)


def test_windows_never_cross_shards():
    a, b = np.arange(0, 10), np.arange(1000, 1010)
    ds = SlidingWindows([a, b], context_length=4, stride=1)
    assert len(ds) == 2 * 6
    for i in range(len(ds)):
        x, y = ds[i]
        row = x.tolist() + y.tolist()[-1:]
        assert all(t < 10 for t in row) or all(t >= 1000 for t in row)


def test_batches_are_a_function_of_step_and_split_by_rank():
    tokens = [np.arange(5000) % 997]
    one = BatchSampler(tokens, context_length=16, batch_size=4, grad_accum=2, world_size=1, seed=3)
    two = BatchSampler(tokens, context_length=16, batch_size=4, grad_accum=1, world_size=2, seed=3)
    for step in (0, 5, 17):
        x0, y0 = one.micro_batch(step, micro=0)
        x1, _ = one.micro_batch(step, micro=1)
        # Same step again (e.g. after a resume): same data.
        assert torch.equal(one.micro_batch(step, micro=0)[0], x0)
        # Two ranks with one micro-step read what one process with two micro-steps reads.
        assert torch.equal(two.micro_batch(step, 0, rank=0)[0], x0)
        assert torch.equal(two.micro_batch(step, 0, rank=1)[0], x1)
        assert torch.equal(y0[:, :-1], x0[:, 1:])
    assert not torch.equal(one.micro_batch(0, 0)[0], one.micro_batch(1, 0)[0])


def test_sliding_sampler_visits_every_window_once_per_epoch():
    tokens = [np.arange(1000)]
    sampler = BatchSampler(tokens, context_length=10, batch_size=3, sampler="sliding", stride=10, seed=0)
    n = len(sampler.windows)  # (1000 - 11) // 10 + 1 = 99 windows
    assert n == 99
    starts = [int(x[0]) for step in range(n // 3) for x in sampler.micro_batch(step, 0)[0]]
    assert sorted(starts) == list(range(0, 990, 10))


def test_eval_batches_are_fixed_and_split_evenly():
    tokens = [np.arange(3000)]
    whole = eval_batches(tokens, 8, batch_size=4, max_batches=5)
    assert sum(len(x) for x, _ in whole) == 20
    parts = [eval_batches(tokens, 8, 4, 5, rank=r, world_size=2) for r in range(2)]
    starts = sorted(int(x[0]) for part in parts for xb, _ in part for x in xb)
    assert starts == sorted(int(x[0]) for xb, _ in whole for x in xb)


# ---- prepare -------------------------------------------------------------------------------
def _docs(tmp_path):
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("The first document.\nIt has two lines.")
    (folder / "sub" / "b.md").write_text("# Second\nA markdown file.")
    (folder / "c.jsonl").write_text(json.dumps({"text": "Third, from JSON lines."}) + "\n\n"
                                    + json.dumps({"text": "Fourth one."}) + "\n")
    (folder / "ignored.bin").write_bytes(b"\x00\x01")
    return folder


def test_prepare_writes_documents_separated_by_eot(tmp_path):
    folder = _docs(tmp_path)
    result = prepare([str(folder)], out_dir=tmp_path / "out", tokenizer="char", val_fraction=0.3,
                     seed=1, progress=False)
    tok = load_tokenizer(tmp_path / "out")  # the tokenizer was saved next to the shards
    assert tok is not None and tok.vocab_size == result.meta["vocab_size"]
    eot = result.meta["eot_id"]
    texts = set()
    for split in ("train", "val"):
        ids = np.concatenate([np.asarray(s) for s in load_split(tmp_path / "out", split)]).tolist()
        assert ids[0] == eot  # every document starts with the separator
        bounds = [i for i, t in enumerate(ids) if t == eot] + [len(ids)]
        texts |= {tok.decode(ids[a + 1:b]) for a, b in zip(bounds, bounds[1:])}
    assert texts == {"The first document.\nIt has two lines.", "# Second\nA markdown file.",
                     "Third, from JSON lines.", "Fourth one."}
    meta = load_meta(tmp_path / "out")
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 4
    assert meta["dtype"] == "uint16"


def test_prepare_single_document_splits_its_tail(tmp_path):
    (tmp_path / "book.txt").write_text("abcdefghij" * 100)
    result = prepare([str(tmp_path / "book.txt")], out_dir=tmp_path / "out", tokenizer="char", progress=False)
    s = result.meta["splits"]
    assert s["val"]["tokens"] > 0 and s["train"]["tokens"] > 10 * s["val"]["tokens"]


def test_globs_and_bpe_tokenizer(tmp_path):
    folder = _docs(tmp_path)
    assert [p.name for p in find_text_files([str(folder / "**" / "*.md")])] == ["b.md"]
    text = " ".join(load_corpus("python-reference")[:5])
    (tmp_path / "ref.txt").write_text(text)
    result = prepare([str(tmp_path / "*.txt")], out_dir=tmp_path / "out", tokenizer="bpe", vocab_size=300,
                     progress=False)
    assert result.meta["vocab_size"] == 300
    ids = np.concatenate([np.asarray(s) for s in load_split(tmp_path / "out", "train")] +
                         [np.asarray(s) for s in load_split(tmp_path / "out", "val")])
    assert len(ids) < len(text.encode()) * 0.8  # merges made tokens longer than a byte


def test_builtin_corpora():
    ref = python_reference()
    assert len(ref) > 50 and sum(map(len, ref)) > 300_000
    docs = python_docs()
    assert len(docs) > 5000 and sum(map(len, docs)) > 1_000_000
    assert any("Return" in d for d in docs[:200])  # English prose about code
    with pytest.raises(ValueError, match="unknown corpus"):
        load_corpus("nope")


# ---- bad input: one line, exit code 2 ----------------------------------------------------------
def _cli_error(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("scratchlm: error: ")
    return err[0]


def test_prepare_bad_input(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert "no such file or folder" in _cli_error(capsys, ["prepare", str(tmp_path / "missing.txt"), "--out", out])
    assert "no file matches" in _cli_error(capsys, ["prepare", str(tmp_path / "*.nothing"), "--out", out])
    (tmp_path / "empty.txt").write_text("")
    assert "no text" in _cli_error(capsys, ["prepare", str(tmp_path / "empty.txt"), "--out", out,
                                            "--tokenizer", "char"])
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "x.py").write_text("print()")
    assert "has no text files" in _cli_error(capsys, ["prepare", str(tmp_path / "folder"), "--out", out])
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    assert "bad.jsonl:2" in _cli_error(capsys, ["prepare", str(tmp_path / "bad.jsonl"), "--out", out])


def test_undecodable_bytes(tmp_path, capsys):
    """Bytes that are not UTF-8 stop `prepare` with the file and offset, unless the user
    chooses --encoding-errors replace (U+FFFD in their place) or ignore (dropped)."""
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait, ".encode("latin-1") * 20)
    msg = _cli_error(capsys, ["prepare", str(tmp_path / "latin1.txt"), "--out", str(tmp_path / "out"),
                              "--tokenizer", "char"])
    assert "latin1.txt is not valid UTF-8" in msg and "offset 3" in msg
    assert main(["prepare", str(tmp_path / "latin1.txt"), "--out", str(tmp_path / "out"), "--tokenizer", "char",
                 "--encoding-errors", "replace"]) == 0
    tok = load_tokenizer(tmp_path / "out")
    ids = np.concatenate([np.asarray(s) for s in load_split(tmp_path / "out", "train")]).tolist()
    assert "caf\ufffd au lait" in tok.decode([i for i in ids if i != tok.eot_id])


# ---- prepare never loses the dataset that was there ------------------------------------------
def _shards(folder):
    return sorted(p.name for p in folder.glob("*.bin"))


def test_failed_prepare_leaves_the_old_dataset_intact(tmp_path, capsys):
    """A prepare into an existing dataset that fails on a bad input file (after the
    tokenizer is ready, where the old code had already deleted the shards) leaves the
    old shards, meta.json and tokenizer as they were, and no temporary folder."""
    (tmp_path / "good.jsonl").write_text("".join(json.dumps({"text": f"hello world {i}, " * 10}) + "\n"
                                                 for i in range(40)))
    out = tmp_path / "out"
    assert main(["prepare", str(tmp_path / "good.jsonl"), "--out", str(out), "--tokenizer", "char",
                 "--shard-tokens", "1000", "--val-fraction", "0.3"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert len(_shards(out)) >= 3
    (tmp_path / "bad.jsonl").write_text('{"text": "hello"}\n{"text": "hel')
    capsys.readouterr()
    assert main(["prepare", str(tmp_path / "bad.jsonl"), "--out", str(out),
                 "--tokenizer", str(out)]) == 2  # a saved tokenizer: nothing is read before the shards
    err = capsys.readouterr().err.strip().splitlines()  # the progress bar, then the error
    assert err[-1].startswith("scratchlm: error: ") and "bad.jsonl:2: not valid JSON" in err[-1]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "good.jsonl", "out"]
    assert load_meta(out)["splits"]["train"]["tokens"] > 0 and load_split(out, "train")


def test_second_prepare_replaces_the_first_whole(tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": f"abc {i} " * 20}) + "\n" for i in range(40)))
    first = prepare([str(tmp_path / "a.jsonl")], out_dir=tmp_path / "out", tokenizer="char", shard_tokens=1000,
                    val_fraction=0.3, progress=False)
    assert first.meta["splits"]["train"]["shards"] > 1
    second = prepare([str(tmp_path / "a.jsonl")], out_dir=tmp_path / "out", tokenizer="char", val_fraction=0.3,
                     progress=False)
    assert second.meta["splits"]["train"]["shards"] == 1
    assert _shards(tmp_path / "out") == ["train_000000.bin", "val_000000.bin"]  # no stale shard left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "out"]


def test_prepare_refuses_a_folder_that_is_not_a_dataset(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("abc " * 200)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "diary.md").write_text("mine")
    msg = _cli_error(capsys, ["prepare", str(tmp_path / "a.txt"), "--out", str(notes), "--tokenizer", "char"])
    assert "holds files that are not a prepared dataset's (diary.md)" in msg
    assert [p.name for p in notes.iterdir()] == ["diary.md"]
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty folder made beforehand is fine
    assert main(["prepare", str(tmp_path / "a.txt"), "--out", str(empty), "--tokenizer", "char"]) == 0
    assert load_meta(empty)["vocab_size"] > 0


def test_prepare_through_a_symlink_keeps_the_link(tmp_path):
    (tmp_path / "a.txt").write_text("abc " * 200)
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    for _ in range(2):  # the second run swaps a dataset in behind the link
        prepare([str(tmp_path / "a.txt")], out_dir=tmp_path / "link", tokenizer="char", progress=False)
    assert (tmp_path / "link").is_symlink() and load_meta(tmp_path / "link") == load_meta(tmp_path / "real")


def test_shard_writer_checks_every_id_and_names_the_file(tmp_path):
    from scratchlm.data import write_token_shards

    class Liar:  # a tokenizer whose ids reach beyond the vocabulary it declares
        eot_id, vocab_size = 0, 10

        def encode(self, text, allowed_special="none"):
            return [1, 2, 12]

    with pytest.raises(DataError, match=r"train_000000\.bin: token id 12 is outside the vocabulary \(ids 0\.\.9\)"):
        write_token_shards(["some text"], Liar(), tmp_path, val_fraction=0.01, progress=False)


# ---- prepare's options and inputs, the hostile way -----------------------------------------------
@pytest.mark.parametrize("option, value, message", [
    ("--vocab-size", "0", "vocab_size must be a whole number between 257"),
    ("--vocab-size", "-5", "vocab_size must be"),
    ("--vocab-size", "256", "vocab_size must be"),
    ("--vocab-size", str(2**40), "vocab_size must be"),
    ("--vocab-size", "nan", "invalid int value"),
    ("--vocab-size", "1e30", "invalid int value"),
    ("--tokenizer-sample-mb", "0", "tokenizer_sample_mb must be more than 0"),
    ("--tokenizer-sample-mb", "-1", "tokenizer_sample_mb must be more than 0"),
    ("--tokenizer-sample-mb", "nan", "tokenizer_sample_mb must be a finite number"),
    ("--tokenizer-sample-mb", "inf", "tokenizer_sample_mb must be a finite number"),
    ("--val-fraction", "0", "val_fraction must be between 0 and 1"),
    ("--val-fraction", "1", "val_fraction must be between 0 and 1"),
    ("--val-fraction", "-0.5", "val_fraction must be between 0 and 1"),
    ("--val-fraction", "nan", "val_fraction must be a finite number"),
    ("--val-fraction", "inf", "val_fraction must be a finite number"),
    ("--val-fraction", "1e308", "val_fraction must be between 0 and 1"),
    ("--shard-tokens", "0", "shard_tokens must be a whole number at least 1"),  # used to loop forever
    ("--shard-tokens", "-3", "shard_tokens must be"),
    ("--shard-tokens", "1e12", "invalid int value"),
    ("--seed", "-1", "seed must be a whole number at least 0"),
    ("--text-field", "", "text_field must be a non-empty field name"),
])
def test_prepare_bad_numbers(tmp_path, capsys, option, value, message):
    (tmp_path / "a.txt").write_text("abc " * 200)
    out = tmp_path / "out"
    argv = ["prepare", str(tmp_path / "a.txt"), "--out", str(out), option, value]
    if "invalid int value" in message:  # refused by argparse: exit 2 with one line, too
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1 and message in err[0]
    else:
        assert message in _cli_error(capsys, argv)
    assert not out.exists()  # refused before any work


def test_prepare_huge_shard_size_is_one_shard(tmp_path):
    (tmp_path / "a.txt").write_text("abc " * 200)
    result = prepare([str(tmp_path / "a.txt")], out_dir=tmp_path / "out", tokenizer="char",
                     shard_tokens=10**15, seed=10**30, progress=False)  # nothing allocated up front
    assert result.meta["splits"]["train"]["shards"] == 1


def test_prepare_bad_paths(tmp_path, capsys):
    text = tmp_path / "a.txt"
    text.write_text("abc " * 200)
    out = str(tmp_path / "out")
    os.mkfifo(tmp_path / "pipe")
    assert "pipe is not a regular file or folder" in _cli_error(capsys, ["prepare", str(tmp_path / "pipe"),
                                                                         "--out", out])
    (tmp_path / "dangling.txt").symlink_to(tmp_path / "gone.txt")
    assert "no such file or folder" in _cli_error(capsys, ["prepare", str(tmp_path / "dangling.txt"), "--out", out])
    assert "is not a folder" in _cli_error(capsys, ["prepare", str(text), "--out", str(text)])
    assert "is not a folder" in _cli_error(capsys, ["prepare", str(text), "--out", str(tmp_path / "pipe")])
    (tmp_path / "nowhere").symlink_to(tmp_path / "missing-dir")
    assert "symlink to a missing path" in _cli_error(capsys, ["prepare", str(text), "--out",
                                                              str(tmp_path / "nowhere")])
    assert "does not exist" in _cli_error(capsys, ["prepare", str(text), "--out", out,
                                                   "--tokenizer", str(tmp_path / "no-tok")])
    assert "is not a folder" in _cli_error(capsys, ["prepare", str(text), "--out", out, "--tokenizer", str(text)])
    (tmp_path / "empty").mkdir()
    assert "holds no tokenizer files" in _cli_error(capsys, ["prepare", str(text), "--out", out,
                                                             "--tokenizer", str(tmp_path / "empty")])
    (tmp_path / "docs").mkdir()
    os.mkfifo(tmp_path / "docs" / "pipe.txt")  # a FIFO inside a folder is passed over, not read
    (tmp_path / "docs" / "b.txt").symlink_to(text)  # a symlink to a text file is read
    assert main(["prepare", str(tmp_path / "docs"), "--out", out, "--tokenizer", "char"]) == 0
    assert load_meta(out)["splits"]["train"]["documents"] + load_meta(out)["splits"]["val"]["documents"] == 1


def test_prepare_unreadable_file(tmp_path, capsys, monkeypatch):
    (tmp_path / "a.txt").write_text("abc " * 200)
    real = Path.read_bytes

    def denied(self):  # as root, chmod 000 does not stop a read: simulate it
        if self.name == "a.txt":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    msg = _cli_error(capsys, ["prepare", str(tmp_path / "a.txt"), "--out", str(tmp_path / "out"),
                              "--tokenizer", "char"])
    assert "a.txt: cannot read (Permission denied)" in msg


@pytest.mark.parametrize("name, content, message", [
    ("empty.jsonl", b"", "no text"),
    ("cut.jsonl", b'{"text": "one"}\n{"text": "tw', "cut.jsonl:2: not valid JSON"),
    ("list.jsonl", b'["not", "an", "object"]\n', "list.jsonl:1: no string field 'text'"),
    ("image.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "image.txt is not valid UTF-8"),
    ("utf16.txt", "some text".encode("utf-16"), "utf16.txt is not valid UTF-8"),
    ("blank.md", b"   \n\n  ", "no text"),
])
def test_prepare_bad_files(tmp_path, capsys, name, content, message):
    (tmp_path / name).write_bytes(content)
    assert message in _cli_error(capsys, ["prepare", str(tmp_path / name), "--out", str(tmp_path / "out"),
                                          "--tokenizer", "char"])


def test_prepare_corrupt_parquet(tmp_path, capsys):
    pytest.importorskip("pyarrow")
    (tmp_path / "t.parquet").write_bytes(b"PAR1 this is not really parquet PAR1")
    assert "t.parquet: cannot read as Parquet" in _cli_error(capsys, ["prepare", str(tmp_path / "t.parquet"),
                                                                      "--out", str(tmp_path / "o")])


@pytest.mark.parametrize("content, message", [
    ("[]", "not a prepared dataset's meta.json"),
    ("null", "not a prepared dataset's meta.json"),
    ('{"vocab_size": "12"}', "not a prepared dataset's meta.json"),
    ("{", "is not valid JSON"),
])
def test_bad_meta_json(tmp_path, content, message):
    (tmp_path / "meta.json").write_text(content)
    with pytest.raises(DataError, match=message):
        load_meta(tmp_path)


def test_windows_refuse_bad_sizes():
    tokens = [np.arange(100)]
    for kwargs in ({"stride": -4}, {"stride": 0}, {"context_length": 0}):
        with pytest.raises(DataError, match="must be a positive whole number"):
            SlidingWindows(tokens, **{"context_length": 8, **kwargs})
    with pytest.raises(DataError, match="batch_size must be a positive whole number"):
        BatchSampler(tokens, context_length=8, batch_size=0)
