"""Checkpoints: training state round trip, a save that dies halfway, corrupt files."""

import os
from pathlib import Path

import pytest
import safetensors.torch
import torch

import scratchlm.checkpoint as checkpoint
from scratchlm.checkpoint import CheckpointError, load_model, load_train_state, save_model, save_train_state
from scratchlm.config import ModelConfig
from scratchlm.model import Transformer


def _model(seed: int) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig.preset("gpt-tiny"))


def _optimizer_state(model) -> dict:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    opt.step()
    return opt.state_dict()


def test_train_state_round_trip(tmp_path):
    model = _model(0)
    state = {"step": 7, "tokens": 1024, "elapsed": 1.5, "best_val": 3.25, "optimizer": _optimizer_state(model),
             "rng_cpu": torch.get_rng_state()}
    save_model(tmp_path / "run", model, extra=lambda d: save_train_state(d, state))
    back = load_train_state(tmp_path / "run")
    assert (back["step"], back["tokens"], back["elapsed"], back["best_val"]) == (7, 1024, 1.5, 3.25)
    assert torch.equal(back["rng_cpu"], state["rng_cpu"])
    exp_avg = state["optimizer"]["state"][0]["exp_avg"]
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], exp_avg)
    with pytest.raises(CheckpointError, match="nothing to resume"):
        save_model(tmp_path / "bare", model)
        load_train_state(tmp_path / "bare")


@pytest.mark.parametrize("where", ["weights", "train_state", "swap"])
def test_save_that_dies_halfway_keeps_previous_checkpoint(tmp_path, monkeypatch, where):
    """A crash while the new checkpoint is being written (simulated by an exception in the
    middle of the save) leaves the previous one whole and loadable, and no temporary files."""
    old_model = _model(0)
    old_state = {"step": 1}
    save_model(tmp_path / "run", old_model, extra=lambda d: save_train_state(d, old_state))

    def die(*args, **kwargs):
        raise OSError("disk full (simulated)")

    new_model = _model(1)
    extra = lambda d: save_train_state(d, {"step": 2})  # noqa: E731
    if where == "weights":  # dies while writing model.safetensors
        real = safetensors.torch.save_file

        def half_then_die(tensors, filename, metadata=None):
            real(dict(list(tensors.items())[:2]), filename, metadata=metadata)
            die()
        monkeypatch.setattr(checkpoint, "save_file", half_then_die)
    elif where == "train_state":  # dies while writing train_state.pt
        def partial(d):
            (Path(d) / "train_state.pt").write_bytes(b"PK\x03\x04 half a zip")
            die()
        extra = partial
    else:  # dies between moving the old checkpoint away and moving the new one in
        real_replace = os.replace
        calls = []

        def replace(src, dst):
            calls.append(src)
            if len(calls) == 2:
                die()
            real_replace(src, dst)
        monkeypatch.setattr(checkpoint.os, "replace", replace)
    with pytest.raises(OSError, match="simulated"):
        save_model(tmp_path / "run", new_model, extra=extra)
    monkeypatch.undo()

    loaded, _ = load_model(tmp_path / "run")
    assert torch.equal(loaded.tok_emb.weight, old_model.tok_emb.weight)
    assert load_train_state(tmp_path / "run")["step"] == 1
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_corrupt_or_truncated_checkpoint_is_a_clear_error(tmp_path):
    model = _model(0)
    save_model(tmp_path / "run", model, extra=lambda d: save_train_state(d, {"step": 3}))
    weights = tmp_path / "run" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(tmp_path / "run")
    weights.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(tmp_path / "run")
    state = tmp_path / "run" / "train_state.pt"
    state.write_bytes(state.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="train_state.pt is corrupt or truncated"):
        load_train_state(tmp_path / "run")
    state.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_train_state(tmp_path / "run")


def test_train_state_never_unpickles_objects(tmp_path):
    """weights_only loading: a train_state.pt holding an arbitrary object is refused."""
    save_model(tmp_path / "run", _model(0))

    import datetime

    torch.save({"step": 1, "payload": datetime.datetime.now()}, tmp_path / "run" / "train_state.pt")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_train_state(tmp_path / "run")
