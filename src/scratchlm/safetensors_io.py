"""Reading weights files without holding them twice: safetensors, sharded checkpoints, .bin.

The safetensors format: 8 bytes (little-endian u64) = header size N, then N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}}``, then the raw data, offsets
counted from the end of the header. ``SafetensorsFile`` reads one tensor at a time with
``readinto`` into a fresh empty tensor, so each weight is in memory once (no memory map
whose pages would count a second time), and a matrix stored transposed (GPT-2's Conv1D) is
read straight into its transpose a few rows at a time.

``LazyWeights(directory)`` is a read-only {name: tensor} mapping over a Hugging Face
directory's weights: ``model.safetensors``, a sharded checkpoint (its
``model.safetensors.index.json`` maps each name to its file) or ``pytorch_model.bin``
(``torch.load(weights_only=True, mmap=True)``: no pickled code runs). Each tensor is read
when it is asked for.

>>> import tempfile, torch
>>> from safetensors.torch import save_file
>>> d = Path(tempfile.mkdtemp())
>>> save_file({"w": torch.arange(6.0).reshape(2, 3)}, str(d / "model.safetensors"))
>>> weights = LazyWeights(d)
>>> list(weights), weights["w"].tolist(), weights.transposed("w").shape
(['w'], [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]], torch.Size([3, 2]))
>>> weights.close()
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from .state_dict import CheckpointError, read_json

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


class SafetensorsFile:
    """Reads single tensors of a .safetensors file straight into fresh tensors (see the
    module docstring for the format). The header is checked when the file is opened: a
    truncated or corrupt file is a CheckpointError at once, not halfway through loading."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "rb")  # noqa: SIM115 - kept open while tensors are read
        size = path.stat().st_size
        try:
            n = int.from_bytes(self.file.read(8), "little")
            if not 2 <= n <= size - 8:
                raise ValueError(f"header size {n} does not fit a file of {size} bytes")
            self.header = json.loads(self.file.read(n))
            self.data_start = 8 + n
            self.header.pop("__metadata__", None)
            for name, entry in self.header.items():
                begin, end = entry["data_offsets"]
                if entry["dtype"] not in SAFETENSORS_DTYPES:
                    raise ValueError(f"{name} has unsupported dtype {entry['dtype']}")
                if self.data_start + end > size:
                    raise ValueError(f"{name} ends past the end of the file")
        except (ValueError, KeyError, TypeError) as e:
            self.file.close()
            raise CheckpointError(f"{path} is corrupt or truncated ({e})") from None

    def keys(self):
        return self.header.keys()

    def get_transposed(self, name: str, rows_per_read: int = 32) -> torch.Tensor:
        """A 2-D tensor read straight into its transpose, a few rows at a time: no full-size
        temporary (which, freed between kept tensors, would fragment the heap)."""
        entry = self.header[name]
        if len(entry["shape"]) != 2:
            return self.get_tensor(name)
        rows, cols = entry["shape"]
        dtype = SAFETENSORS_DTYPES[entry["dtype"]]
        out = torch.empty(cols, rows, dtype=dtype)  # (out, in) for a Conv1D stored (in, out)
        buffer = torch.empty(rows_per_read, cols, dtype=dtype)
        row_bytes = cols * buffer.element_size()
        begin, end = entry["data_offsets"]
        if end - begin != rows * row_bytes:
            raise CheckpointError(f"{self.path}: {name} has {end - begin} bytes, its shape needs {rows * row_bytes}")
        self.file.seek(self.data_start + begin)
        for r0 in range(0, rows, rows_per_read):
            n = min(rows_per_read, rows - r0)
            chunk = buffer[:n]
            if self.file.readinto(memoryview(chunk.view(-1).view(torch.uint8).numpy())) != n * row_bytes:
                raise CheckpointError(f"{self.path}: {name} is truncated")
            out[:, r0:r0 + n] = chunk.t()
        return out

    def get_tensor(self, name: str) -> torch.Tensor:
        entry = self.header[name]
        begin, end = entry["data_offsets"]
        tensor = torch.empty(entry["shape"], dtype=SAFETENSORS_DTYPES[entry["dtype"]])
        view = tensor.view(-1).view(torch.uint8) if tensor.numel() else tensor.view(torch.uint8)
        if view.numel() != end - begin:
            raise CheckpointError(f"{self.path}: {name} has {end - begin} bytes, its shape needs {view.numel()}")
        self.file.seek(self.data_start + begin)
        if view.numel() and self.file.readinto(memoryview(view.numpy())) != view.numel():
            raise CheckpointError(f"{self.path}: {name} is truncated")
        return tensor


class LazyWeights(Mapping):
    """A read-only {name: tensor} view of a checkpoint that reads each tensor when asked.

    safetensors files are read tensor by tensor (``SafetensorsFile``); ``pytorch_model.bin``
    files with ``torch.load(weights_only=True, mmap=True)``, which never runs pickled code.
    A sharded checkpoint's index maps each name to its file.
    """

    def __init__(self, directory: Path):
        self.directory = directory
        self.where: dict[str, Path] = {}  # tensor name -> file holding it
        self._open: dict[Path, object] = {}
        index = next((directory / f for f in WEIGHT_FILES[1::2] if (directory / f).exists()), None)
        single = next((directory / f for f in WEIGHT_FILES[0::2] if (directory / f).exists()), None)
        if (directory / "model.safetensors").exists():
            self._add_file(directory / "model.safetensors")
        elif index is not None:
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index} has no weight_map")
            for name, file in weight_map.items():
                path = directory / file
                if not path.exists():
                    raise CheckpointError(f"{directory}: shard {file} listed in {index.name} is missing "
                                          f"(incomplete download?)")
                self.where[name] = path
        elif single is not None:
            self._add_file(single)
        else:
            raise CheckpointError(f"{directory} has no weights: expected one of {', '.join(WEIGHT_FILES)}")

    def _add_file(self, path: Path) -> None:
        for name in self._handle(path).keys():
            self.where[name] = path

    def _handle(self, path: Path):
        if path not in self._open:
            if path.suffix == ".safetensors":
                self._open[path] = SafetensorsFile(path)
            else:
                try:
                    self._open[path] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except Exception as e:  # noqa: BLE001 - any failure to unpickle means a bad file
                    first = str(e).splitlines()[0] if str(e) else type(e).__name__
                    raise CheckpointError(f"{path} is corrupt or not a weights-only checkpoint ({first})") from None
        return self._open[path]

    def __getitem__(self, name: str) -> torch.Tensor:
        path = self.where[name]
        handle = self._handle(path)
        return handle.get_tensor(name) if path.suffix == ".safetensors" else handle[name]

    def transposed(self, name: str) -> torch.Tensor:
        """state[name].t().contiguous(), read without a full-size temporary when possible."""
        path = self.where[name]
        handle = self._handle(path)
        if isinstance(handle, SafetensorsFile):
            return handle.get_transposed(name)
        return handle[name].t().contiguous()

    def close(self) -> None:
        for handle in self._open.values():
            if isinstance(handle, SafetensorsFile):
                handle.file.close()
        self._open.clear()

    def __contains__(self, name) -> bool:
        return name in self.where

    def __iter__(self) -> Iterator[str]:
        return iter(self.where)

    def __len__(self) -> int:
        return len(self.where)



__all__ = ["SafetensorsFile", "LazyWeights", "WEIGHT_FILES", "SAFETENSORS_DTYPES"]
