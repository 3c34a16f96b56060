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


# ---- the atomic swap under repeated crashes ----------------------------------------------------
def _weights_of(path):
    return load_model(path)[0].tok_emb.weight


def _fail_at(monkeypatch, name, call):
    """Make the ``call``-th call (1-based) of atomic.os.replace or atomic.shutil.rmtree raise,
    as a kill at that moment would stop the save."""
    import scratchlm.atomic as atomic

    module = atomic.os if name == "replace" else atomic.shutil
    real = getattr(module, name)
    calls = []

    def fake(*args, **kwargs):
        calls.append(args)
        if len(calls) == call:
            raise KeyboardInterrupt(f"killed at {name} #{call} (simulated)")
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, fake)


@pytest.mark.parametrize("where", [("replace", 1), ("replace", 2), ("rmtree", 1), ("rmtree", 2)])
def test_a_second_kill_after_one_between_the_renames_still_leaves_a_checkpoint(tmp_path, monkeypatch, where):
    """Kill 1 lands between the two renames (only run.old is left); kill 2 lands anywhere in the
    next save. One of the two good checkpoints must still load (the old swap deleted run.old first)."""
    first, second, third = _model(0), _model(1), _model(2)
    save_model(tmp_path / "run", first)
    _fail_at(monkeypatch, "replace", 2)  # run -> run.old done, run.tmp -> run not
    with pytest.raises(KeyboardInterrupt):
        save_model(tmp_path / "run", second)
    monkeypatch.undo()
    assert not (tmp_path / "run").exists() and (tmp_path / "run.old").is_dir()
    assert torch.equal(_weights_of(tmp_path / "run"), first.tok_emb.weight)  # falls back to run.old

    _fail_at(monkeypatch, *where)
    try:
        save_model(tmp_path / "run", third)
    except KeyboardInterrupt:
        pass
    monkeypatch.undo()
    loaded = _weights_of(tmp_path / "run")
    assert torch.equal(loaded, first.tok_emb.weight) or torch.equal(loaded, third.tok_emb.weight)

    save_model(tmp_path / "run", third)  # and a save that completes tidies up
    assert torch.equal(_weights_of(tmp_path / "run"), third.tok_emb.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_temporary_folders_left_by_kills_are_removed_by_the_next_save(tmp_path):
    import subprocess
    import sys

    save_model(tmp_path / "run", _model(0))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a pid that no process has now
    stale = [tmp_path / f".run.tmp-{gone}-0123abcd", tmp_path / ".run.tmp-89abcdef"]  # + the older naming
    alive = tmp_path / f".run.tmp-{os.getppid()}-fedc4321"  # a running process may be writing it
    other = tmp_path / f".other.tmp-{gone}-0123abcd"  # another directory's: not this save's business
    for d in (*stale, alive, other):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"half")
    save_model(tmp_path / "run", _model(1))
    assert not any(d.exists() for d in stale)
    assert alive.exists() and other.exists()
    assert torch.equal(_weights_of(tmp_path / "run"), _model(1).tok_emb.weight)


# ---- what a save may replace ------------------------------------------------------------------------
def _tree(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_a_save_never_replaces_a_users_folder_a_file_or_its_input(tmp_path):
    from scratchlm.atomic import OutputError
    from scratchlm.errors import ScratchLMError

    model = _model(0)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("buy milk")
    with pytest.raises(OutputError, match="notes is a folder that holds no config.json"):
        save_model(notes, model)
    assert _tree(notes) == {"todo.txt": b"buy milk"}

    file = tmp_path / "out.bin"
    file.write_bytes(b"precious")
    with pytest.raises(OutputError, match="is a file"):
        save_model(file, model)
    assert file.read_bytes() == b"precious" and not (tmp_path / "out.bin.old").exists()

    save_model(tmp_path / "m", model)
    before = _tree(tmp_path / "m")
    for target in (tmp_path / "m", tmp_path):  # the input itself, or a folder that holds it
        with pytest.raises(OutputError, match="input"):
            save_model(target, _model(1), inputs=[tmp_path / "m"])
    assert _tree(tmp_path / "m") == before
    assert issubclass(OutputError, ScratchLMError)
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name or p.name.endswith(".old")] == []

    (tmp_path / "empty").mkdir()
    save_model(tmp_path / "empty", model)  # an empty folder made beforehand is fine
    save_model(tmp_path / "m", _model(1))  # and a model folder of ours is replaced in place
    assert torch.equal(_weights_of(tmp_path / "m"), _model(1).tok_emb.weight)


def test_a_symlinked_output_is_written_where_it_points(tmp_path):
    save_model(tmp_path / "real", _model(0))
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    save_model(tmp_path / "link", _model(1))
    assert (tmp_path / "link").is_symlink()
    assert torch.equal(_weights_of(tmp_path / "real"), _model(1).tok_emb.weight)


def test_merge_lora_refuses_to_write_over_its_inputs(tmp_path, capsys):
    from scratchlm.cli import main
    from scratchlm.lora import apply_lora, save_adapter

    base = _model(0)
    save_model(tmp_path / "base", base)
    apply_lora(base, rank=2, alpha=4, targets=["qkv_proj"])
    save_adapter(tmp_path / "adapter", base, base_model=str(tmp_path / "base"))
    before = {name: _tree(tmp_path / name) for name in ("base", "adapter")}
    for out in ("base", "adapter"):
        capsys.readouterr()
        assert main(["merge-lora", str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("scratchlm: error: ") and len(err.strip().splitlines()) == 1 and "input" in err
    assert {name: _tree(tmp_path / name) for name in ("base", "adapter")} == before
    assert main(["merge-lora", str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 0


# ---- the one loading helper: every mismatch names its keys -------------------------------------------
def test_weights_that_do_not_fit_the_config_name_the_keys(tmp_path):
    model = _model(0)
    save_model(tmp_path / "run", model)
    weights = tmp_path / "run" / "model.safetensors"
    good = safetensors.torch.load_file(str(weights))

    def load_with(state):
        safetensors.torch.save_file(state, str(weights))
        with pytest.raises(CheckpointError) as e:
            load_model(tmp_path / "run")
        return str(e.value)

    assert "missing final_norm.bias" in load_with({k: v for k, v in good.items() if k != "final_norm.bias"})
    assert "unexpected extra.weight" in load_with({**good, "extra.weight": torch.zeros(2)})
    msg = load_with({**good, "final_norm.weight": torch.zeros(3)})
    assert "shape mismatch for final_norm.weight" in msg and "(3,)" in msg
    msg = load_with({**good, "final_norm.weight": good["final_norm.weight"].half()})
    assert "dtype mismatch for final_norm.weight" in msg and "torch.float16" in msg
    # Asking for a dtype converts instead (and records it in the config).
    safetensors.torch.save_file(good, str(weights))
    half, _ = load_model(tmp_path / "run", dtype=torch.bfloat16)
    assert half.final_norm.weight.dtype == torch.bfloat16 and half.config.dtype == "bfloat16"


def test_loaded_model_ties_its_head_and_rebuilds_its_tables(tmp_path):
    config = ModelConfig.preset("llama-tiny").replace(tie_embeddings=True)
    torch.manual_seed(0)
    model = Transformer(config).eval()
    save_model(tmp_path / "run", model)
    again, _ = load_model(tmp_path / "run")
    assert again.lm_head.weight is again.tok_emb.weight  # one Parameter, as Transformer() makes it
    assert again.rope_cos.device.type == "cpu" and torch.equal(again.rope_cos, model.rope_cos)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))
