"""Documents -> token shards on disk, and ``prepare``: a whole dataset folder.

Documents come from the user's files or a built-in corpus (corpus.py); batches.py reads
the shards back as training batches.

**Shards**: every document is tokenized and preceded by the end-of-text token, so the
model learns where documents start and never mistakes the end of one for the of the next. Whole documents go to either the train or the validation split. A shard is a 32-byte header
followed by the token ids as a flat array::

    magic  b"SLMTOKS\\0"  (8 bytes)
    version           uint32   (1)
    bytes_per_token   uint32   (2 -> uint16 ids, 4 -> uint32 ids)
    n_tokens          uint64
    reserved          8 bytes

uint16 halves the file when the vocabulary fits (<= 65,536 ids, e.g. GPT-2's 50,257);
larger vocabularies (Llama 3's 128,256) need uint32. Every id is checked against the
vocabulary where it enters, here, so the model never sees an id it has no row for.

``prepare`` builds a whole dataset folder (shards, ``meta.json``, the tokenizer) in a
temporary sibling folder and swaps it in only when complete: a prepare that fails (a bad
input file, Ctrl-C, a full disk) leaves the dataset that was there before untouched.

>>> import numpy as np, tempfile
>>> path = tempfile.mkdtemp() + "/demo.bin"
>>> write_shard(path, np.array([5, 6, 7, 8, 9]), vocab_size=100)
>>> read_shard(path).dtype, read_shard(path).tolist()
(dtype('uint16'), [5, 6, 7, 8, 9])
>>> write_shard(path, np.array([5, 100]), vocab_size=100)
Traceback (most recent call last):
...
scratchlm.errors.DataError: .../demo.bin: token id 100 is outside the vocabulary (ids 0..99)
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .corpus import decode_text, find_text_files, iter_documents, read_bytes, regular_file_size
from .errors import DataError, NotFound

# ----------------------------------------------------------------------------------------
# Shards
# ----------------------------------------------------------------------------------------
MAGIC = b"SLMTOKS\0"
HEADER = struct.Struct("<8sIIQ8x")  # magic, version, bytes_per_token, n_tokens, reserved
assert HEADER.size == 32


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits in 16 bits, otherwise uint32."""
    if not 1 <= vocab_size <= 2**32:
        raise DataError(f"a vocabulary of {vocab_size} ids does not fit a shard (1 to 2**32 ids)")
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def write_shard(path: str | os.PathLike, tokens: np.ndarray, vocab_size: int) -> None:
    """Write token ids to ``path`` (header + flat array), via a temporary file and a rename.

    Every id must be in ``[0, vocab_size)``: a DataError naming the file otherwise."""
    dtype = token_dtype(vocab_size)
    tokens = np.asarray(tokens)
    if tokens.size and not np.issubdtype(tokens.dtype, np.integer):
        raise DataError(f"{path}: token ids must be integers, got {tokens.dtype}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        bad = tokens.min() if tokens.min() < 0 else tokens.max()
        raise DataError(f"{path}: token id {bad} is outside the vocabulary (ids 0..{vocab_size - 1})")
    tmp = Path(f"{path}.tmp")
    with open(tmp, "wb") as f:
        f.write(HEADER.pack(MAGIC, 1, dtype.itemsize, tokens.size))
        f.write(tokens.astype(dtype).tobytes())
    os.replace(tmp, path)


def read_shard(path: str | os.PathLike) -> np.ndarray:
    """The tokens of a shard as a read-only memory map (nothing is read until used)."""
    path = Path(path)
    size = regular_file_size(path)
    with open(path, "rb") as f:
        head = f.read(HEADER.size)
    if len(head) < HEADER.size or head[:8] != MAGIC:
        raise DataError(f"{path} is not a scratchlm token shard (bad header)")
    _, version, itemsize, n_tokens = HEADER.unpack(head)
    if version != 1 or itemsize not in (2, 4):
        raise DataError(f"{path}: unsupported shard version {version} / {itemsize} bytes per token")
    if size != HEADER.size + n_tokens * itemsize:
        raise DataError(f"{path} is truncated: header says {n_tokens} tokens")
    dtype = np.uint16 if itemsize == 2 else np.uint32
    if n_tokens == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER.size, shape=(n_tokens,))


class ShardWriter:
    """Collects tokens and writes a shard each time ``shard_tokens`` have arrived.

    Files are ``<dir>/<split>_000000.bin``, ``<split>_000001.bin``, ... Tokens wait in
    memory as a list of arrays, so a huge ``shard_tokens`` costs nothing up front.
    """

    def __init__(self, directory: Path, split: str, vocab_size: int, shard_tokens: int):
        self.directory, self.split, self.vocab_size = Path(directory), split, vocab_size
        self.shard_tokens = shard_tokens
        self.pending: list[np.ndarray] = []
        self.filled = 0
        self.n_shards = 0
        self.n_tokens = 0
        self.n_bytes = 0  # UTF-8 bytes of the text behind the tokens: for bits per byte
        self.n_documents = 0

    def add(self, ids: Sequence[int], n_bytes: int) -> None:
        self.n_bytes += n_bytes
        self.n_documents += 1
        ids = np.asarray(ids, dtype=np.int64)
        while ids.size:
            take = min(ids.size, self.shard_tokens - self.filled)
            self.pending.append(ids[:take])
            self.filled += take
            ids = ids[take:]
            if self.filled == self.shard_tokens:
                self.flush()

    def flush(self) -> None:
        if self.filled == 0:
            return
        name = self.directory / f"{self.split}_{self.n_shards:06d}.bin"
        write_shard(name, np.concatenate(self.pending), self.vocab_size)
        self.n_shards += 1
        self.n_tokens += self.filled
        self.pending, self.filled = [], 0


VAL_FRACTION = 0.05  # prepare's default share of documents held out for validation


def split_of(index: int, val_fraction: float = VAL_FRACTION, seed: int = 0) -> str:
    """"train" or "val": the split ``prepare`` puts document number ``index`` in.

    A deterministic, well-mixed choice (a hash of (seed, index), not the order), so a
    corpus sorted by topic still gets a validation set from every topic, and anyone can
    find a prepared corpus's held-out documents again without its shards (eval/bpb.py).

    >>> [split_of(i) for i in range(3)], split_of(0, val_fraction=1.0)
    (['train', 'train', 'train'], 'val')
    """
    rng = np.random.default_rng([seed, index])
    return "val" if rng.random() < val_fraction else "train"


def split_documents(documents: Iterable[str], split: str, val_fraction: float = VAL_FRACTION,
                    seed: int = 0) -> list[str]:
    """The non-empty documents that ``prepare`` (with the same val_fraction and seed) puts in
    ``split``; documents are numbered in order, empty ones included, as ``prepare`` does."""
    if split not in ("train", "val"):
        raise DataError(f"the split must be train or val, got {split!r}")
    return [d for i, d in enumerate(documents) if d and split_of(i, val_fraction, seed) == split]


def write_token_shards(documents: Iterable[str], tokenizer, out_dir: str | os.PathLike,
                       val_fraction: float = VAL_FRACTION, shard_tokens: int = 100_000_000, seed: int = 0,
                       progress: bool = True, total: int | None = None) -> dict:
    """Tokenize ``documents`` into train/val shards under ``out_dir``; write and return
    ``meta.json`` (token counts, bytes, dtype, end-of-text id).

    Each document becomes ``[eot] + encode(document)``. Old shards in ``out_dir`` are
    removed first (``prepare`` calls this on a fresh temporary folder).
    """
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("train_*.bin")) + list(out.glob("val_*.bin")):
        old.unlink()  # a second prepare into the same folder replaces the first
    eot = tokenizer.eot_id
    if eot is None:
        raise DataError("the tokenizer has no end-of-text token (<|endoftext|>) to separate documents")
    writers = {s: ShardWriter(out, s, tokenizer.vocab_size, shard_tokens) for s in ("train", "val")}
    for i, doc in enumerate(tqdm(documents, total=total, desc="tokenizing", unit="doc", disable=not progress)):
        if not doc:
            continue
        split = split_of(i, val_fraction, seed)
        writers[split].add([eot] + _encode_plain(tokenizer, doc), len(doc.encode("utf-8")))
    for w in writers.values():
        w.flush()
    if writers["train"].n_tokens == 0:
        raise DataError("the input has no text")
    if writers["val"].n_tokens == 0:
        _split_tail(out, writers, val_fraction)
    meta = {
        "vocab_size": tokenizer.vocab_size,
        "eot_id": eot,
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "splits": {s: {"tokens": w.n_tokens, "bytes": w.n_bytes, "documents": w.n_documents,
                       "shards": w.n_shards} for s, w in writers.items()},
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _encode_plain(tokenizer, text: str) -> list[int]:
    """Encode text as ordinary text: a document that happens to contain "<|endoftext|>"
    must not produce the real separator id."""
    try:
        return tokenizer.encode(text, allowed_special="none")
    except TypeError:  # a tokenizer without that option
        return tokenizer.encode(text)


def _split_tail(out: Path, writers: dict, val_fraction: float) -> None:
    """A corpus of a few documents (one book in one file) may give no validation document:
    then the last ``val_fraction`` of its tokens become the validation split instead."""
    train = writers["train"]
    if train.n_shards != 1:
        raise DataError(f"no document went to the validation split (val_fraction={val_fraction}); "
                         "use a larger --val-fraction")
    tokens = np.array(read_shard(out / "train_000000.bin"))
    cut = int(len(tokens) * (1 - val_fraction))
    if cut < 2 or len(tokens) - cut < 2:
        raise DataError(f"the input has only {len(tokens)} tokens: too little to split into train and val")
    write_shard(out / "train_000000.bin", tokens[:cut], train.vocab_size)
    write_shard(out / "val_000000.bin", tokens[cut:], train.vocab_size)
    val = writers["val"]
    val.n_shards, val.n_tokens, train.n_tokens = 1, len(tokens) - cut, cut
    val.n_bytes = round(train.n_bytes * (1 - cut / len(tokens)))  # bytes are shared in proportion
    train.n_bytes -= val.n_bytes


def load_split(data_dir: str | os.PathLike, split: str) -> list[np.ndarray]:
    """The memory-mapped shards of one split of a prepared folder."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise NotFound(f"no prepared data folder {data_dir} (run `scratchlm prepare` first)")
    paths = sorted(data_dir.glob(f"{split}_*.bin"))
    if not paths:
        raise NotFound(f"{data_dir} has no {split}_*.bin shards (run `scratchlm prepare` first)")
    return [read_shard(p) for p in paths]


def load_meta(data_dir: str | os.PathLike) -> dict:
    """The ``meta.json`` of a prepared folder (checked: an object with a vocabulary size)."""
    path = Path(data_dir) / "meta.json"
    if not path.exists():
        raise NotFound(f"{path} not found (run `scratchlm prepare` first)")
    try:
        meta = json.loads(decode_text(read_bytes(path), path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON: {e}") from None
    vocab = meta.get("vocab_size") if isinstance(meta, dict) else None
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 1:
        raise DataError(f"{path} is not a prepared dataset's meta.json (no positive integer vocab_size)")

    def whole(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    eot, splits = meta.get("eot_id"), meta.get("splits")
    if not whole(eot) or eot >= vocab:
        raise DataError(f"{path}: eot_id must be an id below vocab_size {vocab}, got {eot!r}")
    for split in ("train", "val"):
        counts = splits.get(split) if isinstance(splits, dict) else None
        if not isinstance(counts, dict) or not all(whole(counts.get(k)) for k in ("tokens", "bytes")):
            raise DataError(f"{path}: splits.{split} must hold whole numbers of tokens and bytes "
                            "(run `scratchlm prepare` again)")
    return meta


# ----------------------------------------------------------------------------------------
# `prepare`: a whole dataset folder, swapped in when complete
# ----------------------------------------------------------------------------------------
@dataclass
class PrepareResult:
    out_dir: Path
    tokenizer: object
    meta: dict


def get_tokenizer(spec: str, text_for_training: Iterable[str] | None = None, vocab_size: int = 2048,
                  pattern: str = "gpt4"):
    """A tokenizer from ``spec``: "char" or "bpe" (trained here on the given text), or a
    directory holding a saved tokenizer."""
    from .tokenizer import BPETokenizer, CharTokenizer, load_tokenizer

    docs = list(text_for_training or [])
    if spec == "char":
        return CharTokenizer.train(docs, special_tokens=["<|endoftext|>"])
    if spec == "bpe":  # a list of documents: merges never cross from one into the next
        return BPETokenizer.train(docs, vocab_size=vocab_size, pattern=pattern, special_tokens=["<|endoftext|>"])
    path = Path(spec)
    if not path.exists():
        raise NotFound(f"tokenizer must be 'char', 'bpe' or a tokenizer folder; {spec} does not exist")
    if not path.is_dir():
        raise DataError(f"tokenizer must be 'char', 'bpe' or a tokenizer folder; {spec} is not a folder")
    tok = load_tokenizer(path)
    if tok is None:
        raise DataError(f"{spec} holds no tokenizer files")
    return tok


def check_prepare_options(vocab_size: int, tokenizer_sample_mb: float, val_fraction: float, shard_tokens: int,
                          seed: int, text_field: str, encoding_errors: str, tokenizer: str) -> None:
    """A DataError naming the first option that cannot work (before any work is done)."""
    def whole(name: str, value, low: int, high: int | None = None) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low \
                or (high is not None and value > high):
            bound = f"between {low:,} and {high:,}" if high is not None else f"at least {low:,}"
            raise DataError(f"{name} must be a whole number {bound}, got {value!r}")

    if tokenizer == "bpe":
        whole("vocab_size", vocab_size, 257, 2**32)  # 256 bytes + <|endoftext|>; ids fit uint32
    whole("shard_tokens", shard_tokens, 1)
    whole("seed", seed, 0)
    for name, value in (("val_fraction", val_fraction), ("tokenizer_sample_mb", tokenizer_sample_mb)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise DataError(f"{name} must be a finite number, got {value!r}")
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be between 0 and 1 (both excluded), got {val_fraction}")
    if tokenizer == "bpe" and tokenizer_sample_mb <= 0:
        raise DataError(f"tokenizer_sample_mb must be more than 0, got {tokenizer_sample_mb}")
    if not isinstance(text_field, str) or not text_field:
        raise DataError(f"text_field must be a non-empty field name, got {text_field!r}")
    if encoding_errors not in ("strict", "replace", "ignore"):
        raise DataError(f"encoding_errors must be 'strict', 'replace' or 'ignore', got {encoding_errors!r}")


def prepare(inputs: Sequence[str] = (), corpus: str | None = None, out_dir: str | os.PathLike = "data/prepared",
            tokenizer: str = "bpe", vocab_size: int = 2048, tokenizer_sample_mb: float = 4.0,
            val_fraction: float = VAL_FRACTION, shard_tokens: int = 100_000_000, text_field: str = "text",
            encoding_errors: str = "strict", seed: int = 0, progress: bool = True) -> PrepareResult:
    """Read the input (files/folders/globs, or a built-in corpus), get or train the
    tokenizer, and write shards + meta.json + the tokenizer files into ``out_dir``.

    The folder is built beside ``out_dir`` and swapped in when complete, so a failure
    leaves an existing dataset as it was. ``out_dir`` must be new, empty or a prepared
    dataset: a folder holding anything else is refused, never replaced."""
    from .corpus import load_corpus

    check_prepare_options(vocab_size, tokenizer_sample_mb, val_fraction, shard_tokens, seed, text_field,
                          encoding_errors, tokenizer)
    if inputs and corpus:
        raise DataError("give input files or --corpus, not both")
    out = _check_out_dir(Path(out_dir))
    if inputs:
        find_text_files(inputs)  # fail fast (missing path, empty folder) before any work

        def documents():
            return iter_documents(inputs, text_field, encoding_errors)
        total = None
    else:
        docs = load_corpus(corpus or "python-docs")
        total = len(docs)

        def documents():
            return iter(docs)

    tok = _tokenizer_for(tokenizer, documents, vocab_size, tokenizer_sample_mb)
    building = _make_sibling(out, "prepare")
    try:
        meta = write_token_shards(documents(), tok, building, val_fraction=val_fraction,
                                  shard_tokens=shard_tokens, seed=seed, progress=progress, total=total)
        meta["source"] = list(inputs) if inputs else (corpus or "python-docs")
        meta["tokenizer"] = tokenizer if tokenizer in ("char", "bpe") else str(Path(tokenizer).resolve())
        meta["requested_vocab_size"] = vocab_size if tokenizer == "bpe" else None
        (building / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        tok.save(building)
        _swap_in(building, out)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return PrepareResult(Path(out_dir), tok, meta)


def _tokenizer_for(spec: str, documents, vocab_size: int, sample_mb: float):
    if spec not in ("char", "bpe"):
        return get_tokenizer(spec)
    budget, sample = sample_mb * 1e6 if spec == "bpe" else math.inf, []
    for doc in documents():
        sample.append(doc)
        budget -= len(doc)
        if budget <= 0:
            break
    if not any(doc.strip() for doc in sample):
        raise DataError("the input has no text (only empty or blank documents)")
    return get_tokenizer(spec, sample, vocab_size)


def _is_dataset_file(name: str) -> bool:
    """A file that ``prepare`` writes (so replacing it loses nothing of the user's)."""
    from .tokenizer.files import TOKENIZER_FILES

    shard = name.startswith(("train_", "val_")) and name.endswith((".bin", ".bin.tmp"))
    return shard or name == "meta.json" or name in TOKENIZER_FILES


def _check_out_dir(out: Path) -> Path:
    """The real folder to write (symlinks followed), refused up front when it holds
    anything but a prepared dataset, so nothing of the user's is ever replaced."""
    if out.is_symlink() and not out.exists():
        raise DataError(f"--out {out} is a symlink to a missing path")
    real = out.resolve()
    if real.exists() and not real.is_dir():
        raise DataError(f"--out {out} is not a folder (it is a file or a FIFO)")
    if real.is_dir():
        try:
            foreign = sorted(p.name for p in real.iterdir() if not (p.is_file() and _is_dataset_file(p.name)))
        except OSError as e:
            raise DataError(f"--out {out}: cannot list the folder ({e.strerror or e})") from None
        if foreign:
            raise DataError(f"--out {out} holds files that are not a prepared dataset's ({', '.join(foreign[:3])}"
                            f"{', ...' if len(foreign) > 3 else ''}): give a new or empty folder")
    if real.parent == real:
        raise DataError(f"--out {out}: a dataset cannot replace the root folder")
    try:
        real.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"--out {out}: cannot create its parent folder ({e.strerror or e})") from None
    return real


def _make_sibling(out: Path, kind: str) -> Path:
    """A new hidden folder beside ``out`` (same file system, so renames are atomic)."""
    path = out.parent / f".{out.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        path.mkdir()  # mode from the umask, as any folder the user makes
    except OSError as e:
        raise DataError(f"cannot write beside {out} ({e.strerror or e})") from None
    return path


def _swap_in(building: Path, out: Path) -> None:
    """Put the complete folder ``building`` at ``out``; the old dataset goes only after."""
    if not out.exists():
        os.rename(building, out)
        return
    old = _make_sibling(out, "old")
    os.rename(out, old / "dataset")  # a crash from here to the next rename leaves both copies
    os.rename(building, out)
    shutil.rmtree(old, ignore_errors=True)
