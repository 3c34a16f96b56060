"""Data: shards on disk, document separators, windows and batches, `scratchlm prepare`."""

import json

import numpy as np
import pytest
import torch

from scratchlm.cli import main
from scratchlm.batches import BatchSampler, SlidingWindows, eval_batches
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
