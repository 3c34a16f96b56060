"""Text -> token shards on disk -> batches of (inputs, targets).

Three steps, one per section below:

1. **Read documents** from files, folders and globs (.txt and .md: one document per
   file; .jsonl: one per line, from its ``text`` field; .parquet: one per row, if
   ``pyarrow`` is installed), or from a built-in corpus (corpus.py).
2. **Write shards**: every document is tokenized and preceded by the end-of-text token,
   so the model learns where documents start and never mistakes the end of one for the
   beginning of the next. Whole documents go to either the train or the validation split.
   A shard is a 32-byte header followed by the token ids as a flat array::

       magic  b"SLMTOKS\\0"  (8 bytes)
       version           uint32   (1)
       bytes_per_token   uint32   (2 -> uint16 ids, 4 -> uint32 ids)
       n_tokens          uint64
       reserved          8 bytes

   uint16 halves the file when the vocabulary fits (<= 65,536 ids, e.g. GPT-2's 50,257);
   larger vocabularies (Llama 3's 128,256) need uint32.
3. **Batches**: windows of ``context_length + 1`` tokens, read straight from the
   memory-mapped shards; ``x`` is the window without its last token and ``y`` without
   its first, so ``y[t]`` is the token that follows ``x[:t+1]``. Windows start at random
   positions (``sampler="random"``, for corpora much larger than one run reads) or step
   through the corpus by ``stride`` in a shuffled order (``sampler="sliding"``).

>>> import numpy as np, tempfile
>>> path = tempfile.mkdtemp() + "/demo.bin"
>>> write_shard(path, np.array([5, 6, 7, 8, 9]), vocab_size=100)
>>> read_shard(path).dtype, read_shard(path).tolist()
(dtype('uint16'), [5, 6, 7, 8, 9])
>>> windows = SlidingWindows([read_shard(path)], context_length=3, stride=1)
>>> x, y = windows[1]
>>> x.tolist(), y.tolist()
([6, 7, 8], [7, 8, 9])
"""

from __future__ import annotations

import glob as globlib
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
import torch

# ----------------------------------------------------------------------------------------
# 1. Reading documents
# ----------------------------------------------------------------------------------------
TEXT_SUFFIXES = (".txt", ".md", ".jsonl", ".parquet")


def find_text_files(inputs: Sequence[str]) -> list[Path]:
    """Expand files, folders (searched recursively) and glob patterns into text files.

    Raises FileNotFoundError for a path or pattern that matches nothing and ValueError for
    a folder that holds no text file, each naming the input.
    """
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if any(ch in item for ch in "*?[") and not path.exists():
            matches = sorted(Path(m) for m in globlib.glob(item, recursive=True))
            matches = [m for m in matches if m.is_file()]
            if not matches:
                raise FileNotFoundError(f"no file matches {item!r}")
            files.extend(matches)
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
            if not found:
                raise ValueError(f"folder {item} has no text files ({', '.join(TEXT_SUFFIXES)})")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"no such file or folder: {item}")
    return files


def _decode(data: bytes, path: Path, errors: str) -> str:
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not valid UTF-8 (byte {data[e.start]:#04x} at offset {e.start}); "
                         "pass --encoding-errors replace to read it with U+FFFD in place of bad bytes, "
                         "or ignore to drop them") from None


def read_documents(path: Path, text_field: str = "text", errors: str = "strict") -> Iterator[str]:
    """The documents of one file. ``errors``: what to do with bytes that are not UTF-8 --
    "strict" (the default) stops with an error naming the file and offset, "replace"
    puts U+FFFD in their place, "ignore" drops them."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
        table = pq.read_table(path, columns=[text_field])
        yield from (t for t in table.column(text_field).to_pylist() if t)
        return
    text = _decode(path.read_bytes(), path, errors)
    if suffix != ".jsonl":
        yield text  # .txt, .md and anything else: the whole file is one document
        return
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise ValueError(f"{path}:{line_no}: no string field {text_field!r}")
        yield record[text_field]


def iter_documents(inputs: Sequence[str], text_field: str = "text", errors: str = "strict") -> Iterator[str]:
    for path in find_text_files(inputs):
        yield from read_documents(path, text_field, errors)


# ----------------------------------------------------------------------------------------
# 2. Shards
# ----------------------------------------------------------------------------------------
MAGIC = b"SLMTOKS\0"
HEADER = struct.Struct("<8sIIQ8x")  # magic, version, bytes_per_token, n_tokens, reserved
assert HEADER.size == 32


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits in 16 bits, otherwise uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def write_shard(path: str | os.PathLike, tokens: np.ndarray, vocab_size: int) -> None:
    """Write token ids to ``path`` (header + flat array), via a temporary file and a rename."""
    dtype = token_dtype(vocab_size)
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(f"token ids must be in [0, {vocab_size}), got {tokens.min()}..{tokens.max()}")
    tmp = Path(f"{path}.tmp")
    with open(tmp, "wb") as f:
        f.write(HEADER.pack(MAGIC, 1, dtype.itemsize, tokens.size))
        f.write(tokens.astype(dtype).tobytes())
    os.replace(tmp, path)


def read_shard(path: str | os.PathLike) -> np.ndarray:
    """The tokens of a shard as a read-only memory map (nothing is read until used)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(HEADER.size)
    if len(head) < HEADER.size or head[:8] != MAGIC:
        raise ValueError(f"{path} is not a scratchlm token shard (bad header)")
    _, version, itemsize, n_tokens = HEADER.unpack(head)
    if version != 1 or itemsize not in (2, 4):
        raise ValueError(f"{path}: unsupported shard version {version} / {itemsize} bytes per token")
    if path.stat().st_size != HEADER.size + n_tokens * itemsize:
        raise ValueError(f"{path} is truncated: header says {n_tokens} tokens")
    dtype = np.uint16 if itemsize == 2 else np.uint32
    if n_tokens == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER.size, shape=(n_tokens,))


class ShardWriter:
    """Collects tokens and writes a shard each time ``shard_tokens`` have arrived.

    Files are ``<dir>/<split>_000000.bin``, ``<split>_000001.bin``, ...
    """

    def __init__(self, directory: Path, split: str, vocab_size: int, shard_tokens: int):
        self.directory, self.split, self.vocab_size = Path(directory), split, vocab_size
        self.shard_tokens = shard_tokens
        self.buffer = np.empty(shard_tokens, dtype=np.int64)
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
            self.buffer[self.filled:self.filled + take] = ids[:take]
            self.filled += take
            ids = ids[take:]
            if self.filled == self.shard_tokens:
                self.flush()

    def flush(self) -> None:
        if self.filled == 0:
            return
        name = self.directory / f"{self.split}_{self.n_shards:06d}.bin"
        write_shard(name, self.buffer[:self.filled], self.vocab_size)
        self.n_shards += 1
        self.n_tokens += self.filled
        self.filled = 0


def _split_of(index: int, val_fraction: float, seed: int) -> str:
    """Deterministic, well-mixed choice of split for document ``index``: a hash, not the
    order, so a corpus sorted by topic still gets a validation set from every topic."""
    rng = np.random.default_rng([seed, index])
    return "val" if rng.random() < val_fraction else "train"


def write_token_shards(documents: Iterable[str], tokenizer, out_dir: str | os.PathLike,
                       val_fraction: float = 0.05, shard_tokens: int = 100_000_000, seed: int = 0,
                       progress: bool = True, total: Optional[int] = None) -> dict:
    """Tokenize ``documents`` into train/val shards under ``out_dir``; write and return
    ``meta.json`` (token counts, bytes, dtype, end-of-text id).

    Each document becomes ``[eot] + encode(document)``.
    """
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("train_*.bin")) + list(out.glob("val_*.bin")):
        old.unlink()  # a second prepare into the same folder replaces the first
    eot = tokenizer.eot_id
    if eot is None:
        raise ValueError("the tokenizer has no end-of-text token (<|endoftext|>) to separate documents")
    writers = {s: ShardWriter(out, s, tokenizer.vocab_size, shard_tokens) for s in ("train", "val")}
    for i, doc in enumerate(tqdm(documents, total=total, desc="tokenizing", unit="doc", disable=not progress)):
        if not doc:
            continue
        split = _split_of(i, val_fraction, seed)
        writers[split].add([eot] + _encode_plain(tokenizer, doc), len(doc.encode("utf-8")))
    for w in writers.values():
        w.flush()
    if writers["train"].n_tokens == 0:
        raise ValueError("the input has no text")
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
        raise ValueError(f"no document went to the validation split (val_fraction={val_fraction}); "
                         "use a larger --val-fraction")
    tokens = np.array(read_shard(out / "train_000000.bin"))
    cut = int(len(tokens) * (1 - val_fraction))
    if cut < 2 or len(tokens) - cut < 2:
        raise ValueError(f"the input has only {len(tokens)} tokens: too little to split into train and val")
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
        raise FileNotFoundError(f"no prepared data folder {data_dir} (run `scratchlm prepare` first)")
    paths = sorted(data_dir.glob(f"{split}_*.bin"))
    if not paths:
        raise FileNotFoundError(f"{data_dir} has no {split}_*.bin shards (run `scratchlm prepare` first)")
    return [read_shard(p) for p in paths]


def load_meta(data_dir: str | os.PathLike) -> dict:
    path = Path(data_dir) / "meta.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found (run `scratchlm prepare` first)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


# ----------------------------------------------------------------------------------------
# 3. Batches
# ----------------------------------------------------------------------------------------
class _Windows:
    """Windows of context_length + 1 tokens that never cross a shard boundary.

    Window number ``i`` (counted over all shards, shard after shard) is located with a
    binary search on the running count of windows per shard.
    """

    def __init__(self, shards: Sequence[np.ndarray], context_length: int, stride: int):
        self.shards, self.context_length, self.stride = list(shards), context_length, stride
        per_shard = [max(0, (len(s) - context_length - 1) // stride + 1) for s in self.shards]
        self.ends = np.cumsum(per_shard)  # ends[k]: windows in shards 0..k
        if not per_shard or self.ends[-1] == 0:
            longest = max((len(s) for s in self.shards), default=0)
            raise ValueError(f"not enough tokens for one window of {context_length + 1} "
                             f"(longest shard: {longest} tokens); use a shorter context_length")

    def __len__(self) -> int:
        return int(self.ends[-1])

    def window(self, i: int) -> np.ndarray:
        shard = int(np.searchsorted(self.ends, i, side="right"))
        local = i - (int(self.ends[shard - 1]) if shard else 0)
        start = local * self.stride
        return self.shards[shard][start:start + self.context_length + 1]

    def stack(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), each (len(indices), context_length) int64: y is x shifted by one."""
        rows = np.stack([self.window(int(i)) for i in indices]).astype(np.int64)
        rows = torch.from_numpy(rows)
        return rows[:, :-1], rows[:, 1:]


class SlidingWindows(_Windows, torch.utils.data.Dataset):
    """A map-style dataset of overlapping windows: item i starts at token i * stride.

    stride == context_length: each token is a target once per epoch; a smaller stride
    gives more (overlapping) examples from a small corpus.
    """

    def __init__(self, shards: Sequence[np.ndarray], context_length: int, stride: Optional[int] = None):
        super().__init__(shards, context_length, stride or context_length)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        row = torch.from_numpy(self.window(i).astype(np.int64))
        return row[:-1], row[1:]


class BatchSampler:
    """Which windows make up optimizer step ``step``: a pure function of (seed, step).

    Every rank computes the same ``global_batch_size`` window numbers and reads only its
    own slice of them, so the data are sharded by rank without any communication, and
    resuming at step k needs nothing but k. Rows are ordered (micro-step, rank, row):
    two ranks with one micro-step each read exactly what one process with two micro-steps
    reads, which is what makes DDP match gradient accumulation.

    sampler="random": window starts drawn uniformly (stride 1) with replacement.
    sampler="sliding": every window of the given stride once per epoch, in an order
    shuffled anew each epoch.
    """

    def __init__(self, shards: Sequence[np.ndarray], context_length: int, batch_size: int,
                 grad_accum: int = 1, world_size: int = 1, sampler: str = "random",
                 stride: Optional[int] = None, seed: int = 0):
        if sampler not in ("random", "sliding"):
            raise ValueError(f"sampler must be 'random' or 'sliding', got {sampler!r}")
        self.sampler, self.seed = sampler, seed
        self.windows = _Windows(shards, context_length, 1 if sampler == "random" else (stride or context_length))
        self.batch_size, self.grad_accum, self.world_size = batch_size, grad_accum, world_size
        self.global_batch_size = batch_size * grad_accum * world_size
        self._epoch, self._order = -1, None

    def _window_numbers(self, step: int) -> np.ndarray:
        G, N = self.global_batch_size, len(self.windows)
        if self.sampler == "random":
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
            return torch.randint(0, N, (G,), generator=g).numpy()
        samples = np.arange(step * G, (step + 1) * G)  # the global sample numbers of this step
        out = np.empty(G, dtype=np.int64)
        for j, s in enumerate(samples):
            epoch = int(s // N)
            if epoch != self._epoch:  # one permutation per epoch, cached
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._epoch, self._order = epoch, torch.randperm(N, generator=g).numpy()
            out[j] = self._order[s % N]
        return out

    def micro_batch(self, step: int, micro: int, rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), each (batch_size, context_length), for one micro-step of one rank."""
        numbers = self._window_numbers(step)
        first = (micro * self.world_size + rank) * self.batch_size
        return self.windows.stack(numbers[first:first + self.batch_size])

    def epoch_of(self, step: int) -> float:
        return step * self.global_batch_size / len(self.windows)


def eval_batches(shards: Sequence[np.ndarray], context_length: int, batch_size: int,
                 max_batches: int, rank: int = 0, world_size: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed set of non-overlapping windows (the same at every evaluation), spread
    evenly over the split so a small set still sees all of it; split between ranks."""
    windows = _Windows(shards, context_length, context_length)
    n = min(len(windows), max_batches * batch_size) // world_size * world_size  # equal work per rank
    if n == 0:
        raise ValueError(f"the validation split has fewer than {world_size} windows of {context_length + 1} tokens")
    picks = np.linspace(0, len(windows) - 1, n).round().astype(np.int64)[rank::world_size]
    return [windows.stack(picks[i:i + batch_size]) for i in range(0, len(picks), batch_size)]


# ----------------------------------------------------------------------------------------
# `scratchlm prepare`
# ----------------------------------------------------------------------------------------
@dataclass
class PrepareResult:
    out_dir: Path
    tokenizer: object
    meta: dict


def get_tokenizer(spec: str, text_for_training: Optional[Iterable[str]] = None, vocab_size: int = 2048,
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
        raise FileNotFoundError(f"tokenizer must be 'char', 'bpe' or a tokenizer folder; {spec} does not exist")
    tok = load_tokenizer(path)
    if tok is None:
        raise ValueError(f"{spec} holds no tokenizer files")
    return tok


def prepare(inputs: Sequence[str] = (), corpus: Optional[str] = None, out_dir: str | os.PathLike = "data/prepared",
            tokenizer: str = "bpe", vocab_size: int = 2048, tokenizer_sample_mb: float = 4.0,
            val_fraction: float = 0.05, shard_tokens: int = 100_000_000, text_field: str = "text",
            encoding_errors: str = "strict", seed: int = 0, progress: bool = True) -> PrepareResult:
    """Read the input (files/folders/globs, or a built-in corpus), get or train the
    tokenizer, and write shards + meta.json + the tokenizer files into ``out_dir``."""
    from .corpus import load_corpus

    if inputs and corpus:
        raise ValueError("give input files or --corpus, not both")
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
    out = Path(out_dir)
    meta = write_token_shards(documents(), tok, out, val_fraction=val_fraction, shard_tokens=shard_tokens,
                              seed=seed, progress=progress, total=total)
    meta["source"] = list(inputs) if inputs else (corpus or "python-docs")
    meta["tokenizer"] = tokenizer if tokenizer in ("char", "bpe") else str(Path(tokenizer).resolve())
    meta["requested_vocab_size"] = vocab_size if tokenizer == "bpe" else None
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    tok.save(out)
    return PrepareResult(out, tok, meta)


def _tokenizer_for(spec: str, documents, vocab_size: int, sample_mb: float):
    if spec not in ("char", "bpe"):
        return get_tokenizer(spec)
    budget, sample = sample_mb * 1e6 if spec == "bpe" else math.inf, []
    for doc in documents():
        sample.append(doc)
        budget -= len(doc)
        if budget <= 0:
            break
    if not any(sample):
        raise ValueError("the input has no text")
    return get_tokenizer(spec, sample, vocab_size)


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "prepare", help="tokenize text into train/val shards for `scratchlm train`",
        description="Tokenize text files, folders or globs (.txt, .md, .jsonl, .parquet), or a built-in "
                    "corpus, into token shards with an end-of-text token before every document.")
    p.add_argument("inputs", nargs="*", help="files, folders or glob patterns (default: --corpus)")
    p.add_argument("--corpus", choices=["python-docs", "python-reference"], default=None,
                   help="built-in corpus to use when no input is given (default: python-docs)")
    p.add_argument("--out", default="data/prepared", help="output folder (default: %(default)s)")
    p.add_argument("--tokenizer", default="bpe",
                   help="'bpe' or 'char' to train one on this text, or a tokenizer folder (default: %(default)s)")
    p.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary size (default: %(default)s)")
    p.add_argument("--tokenizer-sample-mb", type=float, default=4.0,
                   help="train the BPE tokenizer on the first this many MB of text (default: %(default)s)")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="fraction of documents held out for validation (default: %(default)s)")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard (default: %(default)s)")
    p.add_argument("--text-field", default="text", help="field of .jsonl/.parquet records (default: %(default)s)")
    p.add_argument("--encoding-errors", choices=["strict", "replace", "ignore"], default="strict",
                   help="bytes that are not UTF-8: stop with an error (strict), replace with U+FFFD, "
                        "or drop them (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split (default: %(default)s)")
    p.set_defaults(func=_prepare_command)


def _prepare_command(args) -> int:
    if not 0 < args.val_fraction < 1:
        raise ValueError(f"--val-fraction must be between 0 and 1, got {args.val_fraction}")
    if args.vocab_size < 257 and args.tokenizer == "bpe":
        raise ValueError(f"--vocab-size must be at least 257 for byte-level BPE, got {args.vocab_size}")
    result = prepare(args.inputs, corpus=args.corpus, out_dir=args.out, tokenizer=args.tokenizer,
                     vocab_size=args.vocab_size, tokenizer_sample_mb=args.tokenizer_sample_mb,
                     val_fraction=args.val_fraction, shard_tokens=args.shard_tokens, text_field=args.text_field,
                     encoding_errors=args.encoding_errors, seed=args.seed)
    s = result.meta["splits"]
    print(f"wrote {result.out_dir}: {s['train']['tokens']:,} train tokens ({s['train']['documents']:,} documents), "
          f"{s['val']['tokens']:,} val tokens, vocab {result.meta['vocab_size']:,} ({result.meta['dtype']})")
    return 0
