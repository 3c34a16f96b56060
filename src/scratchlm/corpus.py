"""Documents: the built-in corpora, and the user's text files.

Built-in corpora are English text that every Python installation already carries, so
the demo and the tests run on a machine without a network:

- ``python-docs``: the docstrings of the standard library (~6,400 docstrings, ~1.6 MB
  of English prose about programming). Read with ``ast`` from the source files, so no
  module is imported (importing ``antigravity`` opens a browser; others start threads).
- ``python-reference``: the language reference topics of ``pydoc_data.topics`` (what
  ``help("if")`` prints): 79 topics, ~0.5 MB.

>>> docs = python_reference()
>>> len(docs) > 50 and all(isinstance(d, str) for d in docs)
True
>>> "python-docs" in CORPORA
True

The user's files, folders and globs (``find_text_files``) are read as documents
(``read_documents``): .txt and .md, one document per file; .jsonl, one per line, from its
``text`` field; .parquet, one per row (with ``pyarrow``). Anything that stops the read (a
missing path, a FIFO, bytes that are not UTF-8, a malformed line) is one clear error.

>>> import tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "notes.jsonl"
>>> _ = path.write_text('{"text": "first"}\\n\\n{"text": "second"}\\n')
>>> list(read_documents(path))
['first', 'second']
>>> _ = path.write_text('{"text": "first"}\\n{"body": "second"}\\n')
>>> list(read_documents(path))
Traceback (most recent call last):
...
scratchlm.errors.DataError: .../notes.jsonl:2: no string field 'text'
"""

from __future__ import annotations

import ast
import functools
import glob as globlib
import json
import os
import stat
import sysconfig
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from .errors import DataError, NotFound

# Folders of the standard library that are not prose about the library itself.
_SKIP_PARTS = {"site-packages", "dist-packages", "__pycache__", "idlelib", "lib2to3", "turtledemo",
               "tkinter", "ensurepip", "venv", "pydoc_data"}


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).parts
        if any(p in _SKIP_PARTS or p.startswith("test") for p in parts):
            continue
        files.append(path)
    return sorted(files)  # sorted: the same corpus, in the same order, on every run


def python_docs(min_chars: int = 20) -> list[str]:
    """Every module, class and function docstring of the standard library, one per document."""
    docs = []
    for path in _stdlib_files():
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError, OSError):  # e.g. a file for another Python version
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)  # dedented, like help() shows it
                if doc and len(doc) >= min_chars:
                    docs.append(doc)
    return docs


def python_reference() -> list[str]:
    """The Python language reference, one document per ``help()`` topic."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


CORPORA: dict[str, Callable[[], list[str]]] = {
    "python-docs": python_docs,
    "python-reference": python_reference,
}


def load_corpus(name: str) -> list[str]:
    """The documents of a built-in corpus by name (``python-docs`` or ``python-reference``).

    Read once per process: parsing the whole standard library takes seconds, and ``make
    demo`` reads it three times (prepare, then its report's two tasks)."""
    if name not in CORPORA:
        raise DataError(f"unknown corpus {name!r}; choose from: {', '.join(CORPORA)}")
    return list(_read_corpus(name, CORPORA[name]))


@functools.cache
def _read_corpus(name: str, reader: Callable[[], list[str]]) -> tuple[str, ...]:
    return tuple(reader())  # a tuple: every caller gets its own list of the same strings


# ---- the user's files ----------------------------------------------------------------------
TEXT_SUFFIXES = (".txt", ".md", ".jsonl", ".parquet")


def find_text_files(inputs: Sequence[str]) -> list[Path]:
    """Expand files, folders (searched recursively) and glob patterns into text files.

    Raises NotFound for a path or pattern that matches nothing and DataError for a folder
    that holds no text file or a path that is not a regular file (a FIFO, a device), each
    naming the input.
    """
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if any(ch in item for ch in "*?[") and not path.exists():
            matches = sorted(Path(m) for m in globlib.glob(item, recursive=True))
            matches = [m for m in matches if m.is_file()]
            if not matches:
                raise NotFound(f"no file matches {item!r}")
            files.extend(matches)
        elif path.is_dir():
            # is_file() is False for FIFOs and sockets, so a folder holding one is read safely.
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
            if not found:
                raise DataError(f"folder {item} has no text files ({', '.join(TEXT_SUFFIXES)})")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        elif path.exists():
            raise DataError(f"{item} is not a regular file or folder (a FIFO or a device cannot be read as text)")
        else:
            raise NotFound(f"no such file or folder: {item}")
    return files


def regular_file_size(path: Path) -> int:
    """The size of a regular file; NotFound / DataError (a FIFO, a device, no access) otherwise."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise NotFound(f"{path}: no such file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):  # reading a FIFO would block forever
        raise DataError(f"{path} is not a regular file")
    return st.st_size


def read_bytes(path: Path) -> bytes:
    """The bytes of a regular file, with a one-line error for anything that stops it."""
    regular_file_size(path)
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


def decode_text(data: bytes, path: Path, errors: str = "strict") -> str:
    """UTF-8 bytes -> text; "strict" stops with the file and offset of the first bad byte."""
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not valid UTF-8 (byte {data[e.start]:#04x} at offset {e.start}); "
                        "pass --encoding-errors replace to read it with U+FFFD in place of bad bytes, "
                        "or ignore to drop them") from None


def read_documents(path: Path, text_field: str = "text", errors: str = "strict") -> Iterator[str]:
    """The documents of one file. ``errors``: what to do with bytes that are not UTF-8 --
    "strict" (the default) stops with an error naming the file and offset, "replace"
    puts U+FFFD in their place, "ignore" drops them."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from _read_parquet(path, text_field)
        return
    text = decode_text(read_bytes(path), path, errors)
    if suffix != ".jsonl":
        yield text  # .txt, .md and anything else: the whole file is one document
        return
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise DataError(f"{path}:{line_no}: no string field {text_field!r}")
        yield record[text_field]


def _read_parquet(path: Path, text_field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    read_bytes(path)[:0]  # the same checks as any file (missing, a FIFO, unreadable)
    try:
        column = pq.read_table(path, columns=[text_field]).column(text_field).to_pylist()
    except Exception as e:  # pyarrow's errors (ArrowInvalid, ...) share no base we can name
        raise DataError(f"{path}: cannot read as Parquet with a {text_field!r} column "
                        f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    for row, text in enumerate(column):
        if text is not None and not isinstance(text, str):
            raise DataError(f"{path} row {row}: field {text_field!r} is {type(text).__name__}, not text")
        if text:
            yield text


def iter_documents(inputs: Sequence[str], text_field: str = "text", errors: str = "strict") -> Iterator[str]:
    """The documents of every file that ``inputs`` name, in order."""
    for path in find_text_files(inputs):
        yield from read_documents(path, text_field, errors)


def read_text_files(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Each file's whole text (strict UTF-8); a DataError if none holds any text."""
    texts = [decode_text(read_bytes(Path(p)), Path(p)) for p in paths]
    if not any(t.strip() for t in texts):
        raise DataError("the files hold no text")
    return texts
