"""The GGUF container: header, metadata, tensor directory, and tensor data read into torch.

A GGUF file (little-endian) is::

    "GGUF"  version (u32)  n_tensors (u64)  n_metadata (u64)
    n_metadata x  key (string)  value type (u32)  value          e.g. llama.block_count = 30
    n_tensors  x  name (string)  n_dims (u32)  dims (u64 each, fastest first)  type (u32)  offset (u64)
    padding to ``general.alignment`` (32)
    tensor data: each tensor at data_start + offset, rows of dims[0] elements

A string is a u64 length and UTF-8 bytes; an array is an item type (u32), a count (u64)
and the items. Quantized types store each row as blocks (e.g. Q8_0: 32 weights as one
f16 scale and 32 int8), and the PyPI ``gguf`` package's ``dequantize`` turns blocks back
into float32.

We parse the header here rather than with ``gguf.GGUFReader``: that reader builds a
numpy view per array item (seconds for a 50k-token vocabulary) and memory-maps the file,
whose pages would count once more next to the dequantized weights. Tensor data is read
with ``readinto`` in slices of rows, so a load holds the weights once plus one slice.

>>> import io
>>> header = b"GGUF" + (3).to_bytes(4, "little") + (0).to_bytes(8, "little") * 2
>>> GGUFFile(io.BytesIO(header)).metadata
{}
"""

from __future__ import annotations

import io
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from ..errors import NotFound, ScratchLMError

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
SLICE_WEIGHTS = 1 << 20  # weights per slice of rows dequantized at once (4 MB as float32)


class GGUFError(ScratchLMError):
    """A GGUF file that scratchlm cannot read (or a model it cannot write as one)."""


def _gguf():
    """The PyPI ``gguf`` package (the block formats and the dequantizer)."""
    try:
        import gguf
    except ImportError:
        raise GGUFError("reading or writing GGUF needs the gguf package: pip install gguf") from None
    return gguf


# GGUFValueType: 0 u8, 1 i8, 2 u16, 3 i16, 4 u32, 5 i32, 6 f32, 7 bool, 8 string, 9 array,
# 10 u64, 11 i64, 12 f64 -> struct format of one item.
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order (slowest first): a Linear weight is (out, in)
    type: int  # GGMLQuantizationType value
    offset: int  # from the start of the data section
    nbytes: int

    @property
    def type_name(self) -> str:
        gguf = _gguf()
        try:
            return gguf.GGMLQuantizationType(self.type).name
        except ValueError:
            return f"type {self.type}"


class _Cursor:
    """Reads the header from a file in growing chunks; running past the end is 'truncated'."""

    def __init__(self, file: BinaryIO, name: str):
        self.file, self.name = file, name
        self.buf, self.pos = b"", 0

    def take(self, n: int) -> memoryview:
        while self.pos + n > len(self.buf):
            more = self.file.read(max(1 << 20, self.pos + n - len(self.buf)))
            if not more:
                raise GGUFError(f"{self.name}: truncated GGUF file (the header ends early)")
            self.buf = self.buf[self.pos:] + more
            self.pos = 0
        view = memoryview(self.buf)[self.pos:self.pos + n]
        self.pos += n
        return view

    def unpack(self, fmt: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self, errors: str = "strict") -> str:
        n = self.unpack("Q")
        if n > 1 << 30:
            raise GGUFError(f"{self.name}: corrupt GGUF header (a string of {n} bytes)")
        try:
            return str(self.take(n), "utf-8", errors=errors)
        except UnicodeDecodeError:
            raise GGUFError(f"{self.name}: corrupt GGUF header (a string that is not UTF-8)") from None

    def value(self, kind: int) -> Any:
        if kind in SCALARS:
            return self.unpack(SCALARS[kind])
        if kind == STRING:
            return self.string()
        if kind == ARRAY:
            item, count = self.unpack("I"), self.unpack("Q")
            if item == STRING:
                # Token strings may hold invalid UTF-8 (some vocabularies store raw bytes).
                return [self.string(errors="replace") for _ in range(count)]
            if item in SCALARS:  # numbers in one read: a 150k-score array is one numpy call
                fmt = SCALARS[item]
                size = struct.calcsize(fmt)
                if count * size > 1 << 31:
                    raise GGUFError(f"{self.name}: corrupt GGUF header (an array of {count} items)")
                return np.frombuffer(self.take(count * size), dtype=np.dtype("<" + fmt)).tolist()
            if item == ARRAY:
                return [self.value(ARRAY) for _ in range(count)]
            raise GGUFError(f"{self.name}: corrupt GGUF header (array item type {item})")
        raise GGUFError(f"{self.name}: corrupt GGUF header (value type {kind})")


class GGUFFile:
    """The parsed header of a GGUF file: ``metadata`` {key: value} and ``tensors`` {name: TensorInfo}.

    ``path`` may be an open binary file (for tests); tensors are read with ``read_into``."""

    def __init__(self, path: str | os.PathLike | BinaryIO):
        if isinstance(path, (str, os.PathLike)):
            self.path = Path(path)
            if not self.path.is_file():
                raise NotFound(f"GGUF file not found: {self.path}")
            self.file: BinaryIO = open(self.path, "rb")  # noqa: SIM115 - closed by close()
        else:
            self.path, self.file = Path("<stream>"), path
        self._lock = threading.Lock()
        try:
            self._fd: int | None = self.file.fileno() if hasattr(os, "preadv") else None
        except (OSError, io.UnsupportedOperation):
            self._fd = None
        try:
            self._parse()
        except BaseException:
            self.close()
            raise

    def _parse(self) -> None:
        name = str(self.path)
        cur = _Cursor(self.file, name)
        try:
            magic = bytes(cur.take(4))
        except GGUFError:
            raise GGUFError(f"{name}: not a GGUF file (shorter than its 4-byte magic)") from None
        if magic != MAGIC:
            raise GGUFError(f"{name}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")
        self.version = cur.unpack("I")
        if self.version not in (2, 3):
            raise GGUFError(f"{name}: GGUF version {self.version} is not supported (2 and 3 are)")
        n_tensors, n_kv = cur.unpack("Q"), cur.unpack("Q")
        if n_tensors > 1 << 24 or n_kv > 1 << 24:
            raise GGUFError(f"{name}: corrupt GGUF header ({n_tensors} tensors, {n_kv} metadata keys)")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            self.metadata[key] = cur.value(cur.unpack("I"))
        self.tensors: dict[str, TensorInfo] = {}
        infos = []
        for _ in range(n_tensors):
            tname = cur.string()
            n_dims = cur.unpack("I")
            if n_dims > 8:
                raise GGUFError(f"{name}: corrupt GGUF header (tensor {tname} has {n_dims} dims)")
            dims = [cur.unpack("Q") for _ in range(n_dims)]
            infos.append((tname, tuple(reversed(dims)), cur.unpack("I"), cur.unpack("Q")))
        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        header_end = self.file.tell() - (len(cur.buf) - cur.pos)
        self.data_start = -(-header_end // alignment) * alignment
        size = self._size()
        for tname, shape, kind, offset in infos:
            info = TensorInfo(tname, shape, kind, offset, _nbytes(shape, kind))
            if info.nbytes == -2:
                raise GGUFError(f"{name}: corrupt GGUF header (tensor {tname}: rows of {shape[-1]} do not "
                                f"fill whole {info.type_name} blocks)")
            if info.nbytes >= 0 and self.data_start + offset + info.nbytes > size:
                raise GGUFError(f"{name}: truncated GGUF file (tensor {tname} ends past the end of the file)")
            self.tensors[tname] = info

    def _size(self) -> int:
        here = self.file.tell()
        end = self.file.seek(0, io.SEEK_END)
        self.file.seek(here)
        return end

    # ---- metadata ----------------------------------------------------------------------
    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def require(self, key: str) -> Any:
        if key not in self.metadata:
            raise GGUFError(f"{self.path}: GGUF metadata has no {key!r}")
        return self.metadata[key]

    # ---- tensor data -------------------------------------------------------------------
    def read(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The tensor ``name`` dequantized into a new tensor of ``dtype``."""
        info = self.tensors[name]
        out = torch.empty(info.shape, dtype=dtype)
        self.read_into(name, out)
        return out

    def read_into(self, name: str, out: torch.Tensor, rows_per_slice: int | None = None) -> None:
        """Dequantize tensor ``name`` into ``out`` (CPU, contiguous, of its shape), a slice of
        rows at a time: the float32 temporaries stay near one slice (SLICE_WEIGHTS)."""
        _gguf()  # the block formats come from the gguf package, even for a file of floats
        info = self.tensors[name]
        if tuple(out.shape) != info.shape:
            raise GGUFError(f"{self.path}: tensor {name} has shape {info.shape}, expected {tuple(out.shape)}")
        check_type(info, self.path)
        row_len = info.shape[-1]
        n_rows = out.numel() // row_len if row_len else 0
        flat = out.view(n_rows, row_len)
        step = rows_per_slice or max(1, SLICE_WEIGHTS // max(row_len, 1))
        native = NATIVE.get(info.type)
        if native is not None and native == out.dtype:  # bytes straight into the weights
            position = self.data_start + info.offset
            for start in range(0, n_rows, step):
                target = flat[start:start + step]
                position = self._read_at(position, memoryview(target.view(torch.uint8).numpy()).cast("B"), name)
            return
        for start, raw in self.raw_rows(name, step):
            flat[start:start + len(raw)].copy_(dequantize_rows(raw, info))

    def raw_rows(self, name: str, rows_per_slice: int):
        """Yield (first row, bytes (rows, bytes per row) uint8) of tensor ``name``, slice by slice:
        a quantized row is its blocks, one after another (rows of ``shape[-1]`` weights)."""
        gguf = _gguf()
        info = self.tensors[name]
        check_type(info, self.path)
        block, type_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(info.type)]
        row_len = info.shape[-1]
        row_bytes = row_len // block * type_bytes
        n_rows = int(np.prod(info.shape[:-1])) if row_len else 0
        position = self.data_start + info.offset
        for start in range(0, n_rows, rows_per_slice):
            raw = np.empty((min(rows_per_slice, n_rows - start), row_bytes), dtype=np.uint8)
            position = self._read_at(position, memoryview(raw).cast("B"), name)
            yield start, raw

    def _read_at(self, position: int, view: memoryview, name: str) -> int:
        """Fill ``view`` from the file at ``position`` (positional reads: safe from several
        threads at once); return the position after it."""
        done = 0
        while done < len(view):
            if self._fd is not None:
                got = os.preadv(self._fd, [view[done:]], position + done)
            else:  # platforms without preadv, and in-memory streams
                with self._lock:
                    self.file.seek(position + done)
                    got = self.file.readinto(view[done:])
            if not got:
                raise GGUFError(f"{self.path}: truncated GGUF file (tensor {name} ends early)")
            done += got
        return position + done

    def close(self) -> None:
        if not self.file.closed:
            self.file.close()

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# Types stored as plain floats, read without the dequantizer.
NATIVE = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}

# What scratchlm reads: the float types and the block formats of llama.cpp's usual quantizations.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def dequantize_rows(raw: np.ndarray, info: TensorInfo) -> torch.Tensor:
    """Rows of tensor ``info`` as stored (uint8, (rows, bytes per row)) -> float (rows, shape[-1]):
    a float type reinterpreted, a block type through the gguf package's dequantizer (float32)."""
    native = NATIVE.get(info.type)
    if native is not None:
        return torch.from_numpy(raw).view(native).view(len(raw), info.shape[-1])
    gguf = _gguf()
    return torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(info.type)))


def check_type(info: TensorInfo, path) -> None:
    if info.type_name not in SUPPORTED_TYPES:
        raise GGUFError(f"{path}: tensor {info.name} has type {info.type_name}, which scratchlm does not read "
                        f"(supported: {', '.join(SUPPORTED_TYPES)})")


def _nbytes(shape: tuple[int, ...], kind: int) -> int:
    """Bytes of a tensor of ``shape`` and type ``kind``; -1 for a type we do not know, -2 for
    rows that are not whole blocks."""
    gguf = _gguf()
    try:
        block, type_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]
    except (ValueError, KeyError):
        return -1
    if shape and shape[-1] % block:
        return -2
    n = 1
    for d in shape:
        n *= d
    return n // block * type_bytes
