"""Write a directory all at once, and never over something that is not ours.

Every directory scratchlm writes (a model, a training checkpoint, a Hugging Face export, a
LoRA adapter, a RAG index) is written by ``atomic_directory``: the block fills a temporary
sibling ``.<name>.tmp-<pid>-<random>``; its files are flushed to disk (fsync); then renames
put it in place of ``<name>``. This module is the only one that knows the name the old
directory has between the two renames of that swap, ``<name>.old``: ``saved_dir`` finds it.

The swap of ``path`` by the finished temporary ``tmp``:

    path exists     remove path.old (path is whole: nothing is lost)
                    path -> path.old;  tmp -> path;  remove path.old
    path missing    tmp -> path        (path.old, perhaps the only copy a crash left, is kept
                    remove path.old     until the new one is in)

so a crash (kill -9, power loss) at any moment leaves ``path`` or ``path.old`` whole, and a
second crash during the next save does too. Temporary folders left by a crash are removed
by the next save to the same path.

Refused before anything is written, each with one line (``OutputError``): an output that is
a regular file; a non-empty folder that holds none of the writer's marker files (a folder of
a user's notes is never replaced); an output that is one of the command's inputs, or holds
one (``export m m``).

>>> import tempfile
>>> root = Path(tempfile.mkdtemp())
>>> with atomic_directory(root / "run", marker=MODEL_FILES) as tmp:
...     _ = (tmp / "config.json").write_text("{}")
>>> sorted(p.name for p in (root / "run").iterdir())
['config.json']
>>> _ = (root / "notes").mkdir(); _ = (root / "notes" / "todo.txt").write_text("mine")
>>> with atomic_directory(root / "notes", marker=MODEL_FILES) as tmp:
...     pass
Traceback (most recent call last):
...
scratchlm.atomic.OutputError: .../notes is a folder that holds no config.json or adapter_config.json: ...
>>> saved_dir(root / "run") == root / "run", saved_dir(root / "nothing") is None
(True, True)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import ScratchLMError

# Files that mark a folder as a model of ours (a scratchlm model or checkpoint, a Hugging Face
# export, a LoRA adapter): one of those may be replaced by another.
MODEL_FILES = ("config.json", "adapter_config.json")

_WRITING: set[Path] = set()  # temporary folders this process is filling now (never stale)


class OutputError(ScratchLMError):
    """An output path that cannot be written without losing something the user has."""


def old_path(path: str | os.PathLike) -> Path:
    """``<path>.old``: where the previous directory is between the two renames of a swap."""
    path = Path(path)
    return path.parent / f"{path.name}.old"


def saved_dir(path: str | os.PathLike, marker: str | None = None) -> Path | None:
    """The directory saved at ``path``: ``path`` itself, or ``path.old`` when a crash between
    the two renames of a save left only that; None when there is neither. With ``marker``,
    a directory counts only if it holds that file."""
    path = Path(path)
    for candidate in (path, old_path(path)):
        if (candidate / marker).exists() if marker else candidate.exists():
            return candidate
    return None


def check_output(path: str | os.PathLike, marker: Iterable[str] = (), inputs: Iterable = ()) -> Path:
    """``path`` (a symbolic link resolved to its target) if a directory may be written there;
    OutputError otherwise. ``marker``: file names, any of which marks a directory the writer
    may replace; ``inputs``: paths the command reads, which it must not replace."""
    path = Path(path)
    if path.is_symlink():
        path = path.resolve()
    here = path.resolve()
    for source in inputs:
        source = Path(source)
        if not (source.exists() or old_path(source).exists()):
            continue  # not a local path (a preset, a hub id): nothing to overwrite
        source = source.resolve()
        if here == source or here in source.parents:
            raise OutputError(f"{path} is where the input {source} is; write to another directory")
    if path.exists():
        if not path.is_dir():
            raise OutputError(f"{path} is a file, not a directory; choose another output directory")
        markers = tuple(marker)
        if not any((path / m).exists() for m in markers) and any(path.iterdir()):
            holds = f"holds no {' or '.join(markers)}" if markers else "is not empty"
            raise OutputError(f"{path} is a folder that {holds}: not one scratchlm wrote, so it is not "
                              f"replaced; choose another output directory (or empty it)")
    return path


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, marker: Iterable[str] = (), inputs: Iterable = ()) -> Iterator[Path]:
    """Write directory ``path`` all at once: the block fills the yielded temporary sibling,
    which then replaces ``path``; if the block fails, ``path`` is left as it was.

    ``marker`` and ``inputs``: what may be replaced, see ``check_output`` (checked before the
    block runs). The default replaces only a missing path or an empty folder.
    """
    path = check_output(path, marker, inputs)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    _WRITING.add(tmp)
    try:
        yield tmp
        _fsync_tree(tmp)
        swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _WRITING.discard(tmp)


def swap_in(tmp: Path, path: Path) -> None:
    """Replace directory ``path`` by ``tmp`` with renames (see the module docstring)."""
    old = old_path(path)
    if path.exists():
        if old.exists():
            shutil.rmtree(old)  # path is whole, so this is the only moment .old may go first
        os.replace(path, old)
        os.replace(tmp, path)
    else:
        os.replace(tmp, path)  # a lone .old may be the last loadable copy: new one in first
    _fsync(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def remove_stale_temporaries(path: Path) -> None:
    """Remove the ``.<name>.tmp-*`` folders that a killed save to ``path`` left behind: those
    of a process that is gone (one still running may be writing its own)."""
    prefix = f".{path.name}.tmp-"
    try:
        siblings = [p for p in path.parent.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return
    for tmp in siblings:
        pid = tmp.name[len(prefix):].split("-")[0]
        if pid.isdigit() and _running(int(pid)) and (int(pid) != os.getpid() or tmp in _WRITING):
            continue
        shutil.rmtree(tmp, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # exists but is someone else's; or not a pid we can check: leave it
    return True


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder under ``root`` to disk, so the renames that follow never
    publish a directory whose contents are still only in the page cache."""
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync(Path(folder) / name)
        _fsync(Path(folder))


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a folder; the rename is still atomic
    finally:
        os.close(fd)


__all__ = ["atomic_directory", "check_output", "saved_dir", "old_path", "swap_in", "remove_stale_temporaries",
           "OutputError", "MODEL_FILES"]
