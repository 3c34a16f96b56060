"""The files of a tokenizer directory: their names, a JSON reader, and stale-file removal.

Every tokenizer saves into an existing directory and removes the tokenizer files it did
not write, so that ``load_tokenizer`` never picks a stale one instead.

>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> _ = (d / "vocab.json").write_text("{}"); _ = (d / "notes.txt").write_text("mine")
>>> remove_stale_files(d, ("tokenizer.json",))
>>> sorted(p.name for p in d.iterdir())   # a file that is not a tokenizer's is kept
['notes.txt']
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .base import TokenizerError

PathLike = str | os.PathLike

# Every file name a tokenizer of ours may read.
TOKENIZER_FILES = ("char_tokenizer.json", "tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def remove_stale_files(directory: PathLike, written: tuple[str, ...]) -> None:
    """Delete the tokenizer files in ``directory`` other than the ``written`` ones."""
    directory = Path(directory)
    for name in TOKENIZER_FILES:
        if name not in written and (directory / name).is_file():
            (directory / name).unlink()


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object; a TokenizerError naming the file otherwise."""
    try:
        data = json.loads(path.read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: corrupt JSON ({e})") from None
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return data


def require_directory(directory: PathLike) -> Path:
    """The directory a tokenizer saves into, which must exist already."""
    directory = Path(directory)
    if not directory.is_dir():
        raise TokenizerError(f"{directory}: not a directory (create it before saving a tokenizer)")
    return directory
