"""Where a Hugging Face model is: a local directory, or a hub id fetched when online.

A name goes to the hub only when it cannot be a local path, so that a mistyped or missing
path (``run2/latest``) is reported as missing at once and never sent out over the network:

- it is ``owner/name``: exactly one slash, each part in the hub's alphabet (letters, digits,
  ``-``, ``_``, ``.``; not starting or ending with ``-`` or ``.``, at most 96 characters);
- it does not exist here, and there is no folder ``owner`` here (then it is a local path
  that is missing, and asking the hub would only add a network error to the real one);
- ``name`` does not end in a file suffix (``.gguf``, ``.safetensors``, ``.json``...) and is
  not the name of a scratchlm checkpoint folder (``latest``, ``best``).

Offline (``HF_HUB_OFFLINE=1``, which ``scratchlm serve --offline`` sets), the hub is not
asked at all: a snapshot downloaded before is used, else a NotFound says it is offline.
Only what scratchlm reads is downloaded: config, tokenizer files and the weights
(safetensors when the repository has them, else ``pytorch_model*.bin``).

>>> is_hub_id("openai-community/gpt2"), is_hub_id("./runs/gpt2"), is_hub_id("gpt2")
(True, False, False)
>>> is_hub_id("run2/latest"), is_hub_id("models/tiny.gguf"), is_hub_id("a/b/c")
(False, False, False)
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import NotFound
from .state_dict import CheckpointError

# One part of a hub id: what huggingface_hub's validate_repo_id accepts (no "--" or "..").
_HUB_PART = re.compile(r"^(?!.*(--|\.\.))[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$")
# A last part ending like a file: a path to a file, not a repository.
FILE_SUFFIXES = (".gguf", ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".json", ".jsonl", ".txt",
                 ".model", ".old", ".tmp")
# The folders a training run writes (train/core.py): `runs/x/latest` is a path, never a repository.
CHECKPOINT_NAMES = ("latest", "best")


def is_hub_id(name: str | os.PathLike) -> bool:
    """Whether ``name`` can only be a hub id (``owner/name``), not a local path; see the module
    docstring for the rules."""
    name = str(name)
    parts = name.split("/")
    if len(parts) != 2 or not all(_HUB_PART.match(p) for p in parts):
        return False
    owner, repo = parts
    if repo.lower().endswith(FILE_SUFFIXES) or repo in CHECKPOINT_NAMES:
        return False
    return not Path(name).exists() and not Path(owner).is_dir()


def offline() -> bool:
    """Whether the hub must not be asked: HF_HUB_OFFLINE set to 1 / true / yes / on."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_hf_source(source: str | os.PathLike, revision: str | None = None) -> Path:
    """A local directory holding ``source``: the path itself, or a hub snapshot."""
    path = Path(source)
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"not a model directory: {path}")
        if not (path / "config.json").exists():
            raise CheckpointError(f"{path} has no config.json: not a Hugging Face model directory")
        return path
    if not is_hub_id(source):
        raise NotFound(f"model directory not found: {source}")
    return download(str(source), revision)


def download(repo_id: str, revision: str | None = None) -> Path:
    """Fetch config, tokenizer and weights (safetensors first, else .bin) from the hub; a
    snapshot fetched before is used when the hub cannot be reached, or when offline."""
    try:
        from huggingface_hub import list_repo_files, snapshot_download
    except ImportError:
        raise NotFound(f"{repo_id}: not a local directory, and huggingface_hub is not "
                       f"installed (pip install 'scratchlm[hf]')") from None
    if offline():
        try:
            return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
        except Exception:  # noqa: BLE001 - not in the local cache
            raise NotFound(f"{repo_id}: not a local directory, and not fetched from the Hugging Face hub "
                           f"because it is offline (HF_HUB_OFFLINE is set); download it first or give "
                           f"a local path") from None
    try:
        files = list_repo_files(repo_id, revision=revision)
        weights = ["*.safetensors", "*.safetensors.index.json"] if any(f.endswith(".safetensors") for f in files) \
            else ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
        patterns = ["config.json", "generation_config.json", "tokenizer*", "vocab.json", "merges.txt",
                    "special_tokens_map.json", *weights]
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, gated repo...
        try:  # a snapshot downloaded before is good enough
            return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
        except Exception:  # noqa: BLE001
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise NotFound(f"{repo_id}: not a local directory and not fetched from the "
                           f"Hugging Face hub ({first})") from None


__all__ = ["is_hub_id", "offline", "resolve_hf_source", "download"]
