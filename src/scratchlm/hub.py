"""Where a Hugging Face model is: a local directory, or a hub id fetched when online.

A name goes to the hub only when it cannot be a local path: ``owner/name`` (one slash),
not starting with ``.``, ``/`` or ``~``, and no folder ``owner`` here (then it is a local
path that is missing, and asking the hub would only add a network error to the real one).
Only what scratchlm reads is downloaded: config, tokenizer files and the weights
(safetensors when the repository has them, else ``pytorch_model*.bin``).

>>> is_hub_id("openai-community/gpt2"), is_hub_id("./runs/gpt2"), is_hub_id("gpt2")
(True, False, False)
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import NotFound
from .state_dict import CheckpointError


def is_hub_id(name: str | os.PathLike) -> bool:
    """Whether ``name`` reads as a hub id (``owner/name``) rather than a local path."""
    name = str(name)
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name.split("/")[0]).is_dir()


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
    snapshot fetched before is used when the hub cannot be reached."""
    try:
        from huggingface_hub import list_repo_files, snapshot_download
    except ImportError:
        raise NotFound(f"{repo_id}: not a local directory, and huggingface_hub is not "
                       f"installed (pip install 'scratchlm[hf]')") from None
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


__all__ = ["is_hub_id", "resolve_hf_source", "download"]
