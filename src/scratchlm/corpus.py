"""Built-in corpora: English text that every Python installation already carries.

No download is needed, so the demo and the tests run on a machine without a network.

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
"""

from __future__ import annotations

import ast
import sysconfig
from pathlib import Path
from typing import Callable

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
    """The documents of a built-in corpus by name (``python-docs`` or ``python-reference``)."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; choose from: {', '.join(CORPORA)}")
    return CORPORA[name]()
