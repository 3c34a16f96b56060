"""torchrun on CPU (gloo): DDP equals gradient accumulation; FSDP2 equals DDP.

Each test launches `torchrun --standalone --nproc_per_node 2 -m scratchlm.cli train`, the
command a user runs, with one thread per process.
"""

import os
import subprocess
import sys

import pytest
import torch

from scratchlm.checkpoint import load_model
from scratchlm.data import prepare
from scratchlm.plots import read_metrics
from scratchlm.train import TrainConfig, train

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")

STEPS = 6
COMMON = dict(model="gpt-tiny", context_length=32, max_steps=STEPS, warmup_steps=2, lr=3e-3, min_lr=3e-4,
              eval_every=3, eval_batches=2, log_every=1, sample_tokens=0, progress=False, plot=False,
              precision="fp32", threads=1)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "ref"
    prepare(corpus="python-reference", out_dir=out, tokenizer="char", progress=False)
    return out


@pytest.fixture(scope="module")
def single(data_dir, tmp_path_factory):
    """One process, batch 2, two micro-batches per step: the reference."""
    out = tmp_path_factory.mktemp("single")
    before = torch.get_num_threads()
    try:
        train(TrainConfig(data=str(data_dir), out_dir=str(out), batch_size=2, grad_accum=2, **COMMON), quiet=True)
    finally:
        torch.set_num_threads(before)
    return out


def torchrun(data_dir, out_dir, *extra):
    args = [f"--{k}={v}" for k, v in {**COMMON, "data": data_dir, "out_dir": out_dir, "batch_size": 2}.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "scratchlm.cli", "train", *args, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    if proc.returncode != 0:  # the lines that say why, not the whole of both ranks. logs
        (out_dir.parent / "torchrun_stderr.txt").write_text(proc.stderr)
        why = [line for line in proc.stderr.splitlines() if "Error" in line or "error" in line]
        pytest.fail(f"torchrun exited with {proc.returncode}:\n" + "\n".join(why[-15:] or proc.stderr.splitlines()[-30:]))
    return proc


def losses(run_dir):
    rows = read_metrics(run_dir / "metrics.jsonl")
    return [r["train_loss"] for r in rows if r["kind"] == "train"], [r["val_loss"] for r in rows if r["kind"] == "eval"]


def weights(run_dir):
    model, _ = load_model(run_dir / "latest")
    return model.state_dict()


@pytest.fixture(scope="module")
def ddp(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    torchrun(data_dir, out, "--distributed=ddp")
    return out


def test_ddp_matches_gradient_accumulation(single, ddp):
    """Two processes with one micro-batch each == one process with two micro-batches."""
    (train_1, val_1), (train_2, val_2) = losses(single), losses(ddp)
    assert len(train_2) == STEPS
    assert train_2 == pytest.approx(train_1, rel=1e-5)
    assert val_2 == pytest.approx(val_1, rel=1e-5)
    w1, w2 = weights(single), weights(ddp)
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-4, atol=1e-5)


def test_fsdp2_matches_ddp_and_its_checkpoint_loads_in_one_process(ddp, data_dir, tmp_path):
    torchrun(data_dir, tmp_path, "--distributed=fsdp")
    (train_d, val_d), (train_f, val_f) = losses(ddp), losses(tmp_path)
    assert train_f == pytest.approx(train_d, rel=1e-5)
    assert val_f == pytest.approx(val_d, rel=1e-5)
    model, tok = load_model(tmp_path / "latest")  # a plain, unsharded model in this process
    assert tok is not None and not any(type(p).__name__ == "DTensor" for p in model.parameters())
    w = weights(ddp)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, w[name], rtol=1e-4, atol=1e-5)
    ids = torch.tensor([tok.encode("def ")])
    assert torch.isfinite(model(ids)).all()


def test_fsdp2_resume_continues_exactly(ddp, data_dir, tmp_path):
    """Stop an FSDP2 run halfway and resume it: the same losses as DDP straight through
    (the optimizer state is gathered whole into train_state.pt and sharded again)."""
    torchrun(data_dir, tmp_path, "--distributed=fsdp", f"--stop_at_step={STEPS // 2}")
    torchrun(data_dir, tmp_path, "--distributed=fsdp", "--resume=true")
    assert losses(tmp_path)[0] == pytest.approx(losses(ddp)[0], rel=1e-5)


# ---- fine-tuning runs in the same core: DDP == accumulation, FSDP2 == DDP ---------------------------
@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    """A tiny model directory and instruction file, and the one-process reference run."""
    import json

    from scratchlm import ModelConfig, Transformer
    from scratchlm.checkpoint import save_model
    from scratchlm.finetune import finetune_instruct
    from scratchlm.tokenizer import CharTokenizer

    root = tmp_path_factory.mktemp("sft")
    letters = "abcdefghijklmnopqrstuvwxyz"
    tok = CharTokenizer.train(letters + letters.upper() + " .,:;!?#()'\n", special_tokens=["<|endoftext|>"])
    torch.manual_seed(0)
    save_model(root / "base", Transformer(ModelConfig.preset("gpt-tiny", vocab_size=tok.vocab_size,
                                                              context_length=256)), tok)
    rows = [{"instruction": f"say {w}.", "output": f"{w}!"} for w in ("hi", "bye", "yes", "no", "ok", "why")]
    (root / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = torch.get_num_threads()
    try:
        finetune_instruct(root / "base", root / "d.jsonl", root / "single", template="alpaca", val_fraction=0.0,
                          batch_size=2, grad_accum=2, max_steps=4, lr=1e-3, device="cpu", progress=False,
                          plot=False, n_samples=0, quiet=True, threads=1)
    finally:
        torch.set_num_threads(before)
    return root


def finetune_torchrun(root, out, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "scratchlm.cli", "finetune", "instruct", str(root / "base"), "--data", str(root / "d.jsonl"),
           "--out", str(out), "--template", "alpaca", "--val-fraction", "0", "--batch-size", "2",
           "--max-steps", "4", "--lr", "1e-3", "--device", "cpu", "--no-progress", "--no-plot", "--samples", "0",
           *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_finetuning_under_ddp_and_fsdp2_matches_one_process(sft):
    finetune_torchrun(sft, sft / "ddp")
    finetune_torchrun(sft, sft / "fsdp", "--distributed", "fsdp")
    reference = losses(sft / "single")[0]
    assert len(reference) == 4
    assert losses(sft / "ddp")[0] == pytest.approx(reference, rel=1e-5)
    assert losses(sft / "fsdp")[0] == pytest.approx(reference, rel=1e-5)
    w1, w2 = weights(sft / "single"), weights(sft / "fsdp")
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-4, atol=1e-5)
