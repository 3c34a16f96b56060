"""Training: the loop learns, resumes exactly, saves on Ctrl-C; configs and bad input."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from scratchlm.checkpoint import load_model, load_train_state
from scratchlm.cli import main
from scratchlm.config import ConfigError, ModelConfig
from scratchlm.data import prepare
from scratchlm.model import Transformer
from scratchlm.plots import read_metrics
from scratchlm.train import (
    DEMO_CONFIG,
    TrainConfig,
    autocast_dtype,
    cpu_has_fast_bf16,
    lr_at,
    make_trainer,
    param_groups,
    train,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and on a shared machine two OpenMP
    threads can wait on each other for far longer than the work takes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The language reference, character-tokenized: ~0.5 MB, prepared in about a second."""
    out = tmp_path_factory.mktemp("data") / "ref"
    prepare(corpus="python-reference", out_dir=out, tokenizer="char", progress=False)
    return out


def tiny(data_dir, out_dir, **changes) -> TrainConfig:
    """A two-layer model, 64 wide: a step takes milliseconds."""
    base = dict(data=str(data_dir), out_dir=str(out_dir), model="gpt-tiny", context_length=32,
                batch_size=4, max_steps=20, warmup_steps=2, lr=3e-3, min_lr=3e-4, eval_every=10,
                eval_batches=2, log_every=1, save_every=1000, sample_tokens=0, progress=False,
                precision="fp32", plot=False)
    return TrainConfig(**{**base, **changes})


# ---- it learns -----------------------------------------------------------------------------------
def test_overfits_one_batch(tmp_path):
    """One window of 33 tokens and batch size 1: the same batch every step. The model must
    memorise it."""
    text = "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs, said the cat."
    (tmp_path / "one.txt").write_text(text[:100])  # + the separator: 101 tokens, 60 of them for training
    prepare([str(tmp_path / "one.txt")], out_dir=tmp_path / "data", tokenizer="char", val_fraction=0.4,
            progress=False)
    cfg = tiny(tmp_path / "data", tmp_path / "run", batch_size=1, context_length=32, sampler="sliding",
               max_steps=150, lr=1e-2, min_lr=1e-3, warmup_steps=5, weight_decay=0.0, eval_every=1000,
               eval_batches=1)
    trainer = make_trainer(cfg, quiet=True)
    assert len(trainer.task.batches.windows) == 1
    result = trainer.run()
    assert result.losses[0] > 2.5  # about ln(vocab) at the start
    assert result.losses[-1] < 0.05


def test_loss_goes_down_on_builtin_corpus(data_dir, tmp_path):
    result = train(tiny(data_dir, tmp_path / "run", max_steps=80, eval_every=40, eval_batches=4), quiet=True)
    evals = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "eval"]
    assert len(evals) == 2
    first_train = sum(result.losses[:5]) / 5
    assert first_train > 4.0  # ln(105) = 4.65: nothing learned yet
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] < first_train - 0.5
    assert evals[-1]["val_loss"] < first_train - 1.0  # it learned the character statistics
    assert evals[-1]["val_bpb"] == pytest.approx(evals[-1]["val_loss"] / math.log(2), rel=0.05)  # ~1 byte/char
    assert evals[-1]["val_ppl"] == pytest.approx(math.exp(evals[-1]["val_loss"]))


# ---- exact resume ----------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", ["random", "sliding"])
def test_resume_is_exact(data_dir, tmp_path, sampler):
    """N steps straight == N/2 steps, stop, --resume for N/2: the same loss at every step,
    the same final weights. Dropout is on, so the RNG state must be restored too."""
    common = dict(max_steps=12, dropout=0.1, sampler=sampler, eval_every=5, grad_accum=2)
    straight = train(tiny(data_dir, tmp_path / "a", **common), quiet=True)
    first = train(tiny(data_dir, tmp_path / "b", stop_at_step=6, **common), quiet=True)
    assert first.step == 6 and load_train_state(tmp_path / "b" / "latest")["step"] == 6
    second = train(tiny(data_dir, tmp_path / "b", resume=True, **common), quiet=True)
    assert len(straight.losses) == 12
    assert first.losses + second.losses == straight.losses  # bit for bit
    a, _ = load_model(tmp_path / "a" / "latest")
    b, _ = load_model(tmp_path / "b" / "latest")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    # The resumed run's log continues the first one's, without duplicates.
    steps = [r["step"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == list(range(1, 13))


def test_checkpoints_best_and_plot(data_dir, tmp_path):
    cfg = tiny(data_dir, tmp_path / "run", max_steps=30, eval_every=10, save_every=10, plot=True,
               sample_tokens=8)
    result = train(cfg, quiet=True)
    run = tmp_path / "run"
    assert (run / "loss.png").stat().st_size > 5000
    evals = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [10, 20, 30]
    assert all(isinstance(r["sample"], str) for r in evals)
    best_step = min(evals, key=lambda r: r["val_loss"])["step"]
    assert json.loads((run / "best" / "train_config.json").read_text())["max_steps"] == 30
    model, tok = load_model(run / "best")
    assert tok is not None and model.config.vocab_size == tok.vocab_size
    assert load_train_state(run / "latest")["step"] == 30 == result.step
    best = json.loads((run / "best" / "best.json").read_text())
    assert best["step"] == best_step and best["val_loss"] == min(r["val_loss"] for r in evals)


def test_resume_skips_a_torn_last_metrics_line_and_names_a_corrupt_one(data_dir, tmp_path):
    """A crash in the middle of writing metrics.jsonl leaves half a line at its end: --resume
    drops it. A bad line anywhere else is damage: a clear error naming the file and line."""
    from scratchlm.errors import ScratchLMError

    common = dict(max_steps=8, eval_every=100)
    train(tiny(data_dir, tmp_path / "run", stop_at_step=4, **common), quiet=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"kind": "train", "step": 5, "tok')  # torn
    train(tiny(data_dir, tmp_path / "run", resume=True, **common), quiet=True)
    steps = [r["step"] for r in read_metrics(metrics) if r["kind"] == "train"]
    assert steps == list(range(1, 9))
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(lines[:2] + ["{not json"] + lines[2:]) + "\n")
    with pytest.raises(ScratchLMError, match=r"metrics\.jsonl line 3 is not valid JSON"):
        train(tiny(data_dir, tmp_path / "run", resume=True, max_steps=10, eval_every=100), quiet=True)


def test_pretraining_reads_the_loss_only_when_it_logs(data_dir, tmp_path, monkeypatch):
    """No Tensor.item per step: with log_every = max_steps, 3 and 9 steps read alike."""
    calls = {"n": 0}
    item = torch.Tensor.item

    def counted(self):
        calls["n"] += 1
        return item(self)

    monkeypatch.setattr(torch.Tensor, "item", counted)

    def items(steps):
        calls["n"] = 0
        train(tiny(data_dir, tmp_path / str(steps), max_steps=steps, log_every=steps, eval_every=1000,
                   eval_batches=1), quiet=True)
        return calls["n"]

    assert items(3) == items(9)


# ---- schedule, optimizer groups, precision -----------------------------------------------------------
def test_lr_schedule():
    cfg = TrainConfig(max_steps=110, warmup_steps=10, lr=1.0, min_lr=0.1)
    lrs = [lr_at(s, cfg) for s in range(111)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])  # linear warmup
    assert lrs[10] == pytest.approx(1.0) and lrs[110] == pytest.approx(0.1)
    assert lrs[60] == pytest.approx(0.55)  # halfway through the cosine
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # decays monotonically
    assert lr_at(5000, cfg) == pytest.approx(0.1)


def test_no_weight_decay_on_biases_norms_embeddings():
    for preset in ("gpt-tiny", "llama-tiny"):
        model = Transformer(ModelConfig.preset(preset))
        decay, no_decay = param_groups(model, 0.1)
        names = {id(p): n for n, p in model.named_parameters()}
        decayed = {names[id(p)] for p in decay["params"]}
        # the matrices of linear layers only (an untied output head is one too)
        assert decayed and all(n.endswith("_proj.weight") or n == "lm_head.weight" for n in decayed)
        assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
        kept = {names[id(p)] for p in no_decay["params"]}
        assert "tok_emb.weight" in kept and any("norm" in n for n in kept)
        assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_bf16_autocast_matches_fp32(data_dir, tmp_path):
    """The fast path on this CPU (bf16 autocast) ends within 1% of fp32's validation loss."""
    # Far enough into training that the loss curve is smooth: early on, a small difference in
    # rounding shifts *when* the loss drops, which says nothing about the final quality.
    common = dict(max_steps=250, eval_every=250, eval_batches=8, context_length=64, batch_size=8,
                  warmup_steps=20, lr=2e-3, min_lr=2e-4, seed=1)
    fp32 = train(tiny(data_dir, tmp_path / "fp32", precision="fp32", **common), quiet=True)
    bf16 = train(tiny(data_dir, tmp_path / "bf16", precision="bf16", **common), quiet=True)
    assert bf16.val_loss == pytest.approx(fp32.val_loss, rel=0.01)
    assert autocast_dtype("fp32", torch.device("cpu")) is None
    assert autocast_dtype("auto", torch.device("cpu")) == (torch.bfloat16 if cpu_has_fast_bf16() else None)


# ---- configuration -------------------------------------------------------------------------------------
def test_config_file_and_overrides(data_dir, tmp_path):
    (tmp_path / "c.yaml").write_text(f"data: {data_dir}\nbatch_size: 3\nlr: 0.002\nmodel: gpt-tiny\n")
    (tmp_path / "c.toml").write_text(f'data = "{data_dir}"\nbatch_size = 3\nlr = 2e-3\nmodel = "gpt-tiny"\n')
    for name in ("c.yaml", "c.toml"):
        cfg = TrainConfig.from_file(tmp_path / name, lr=0.01)
        assert (cfg.batch_size, cfg.lr, cfg.model, cfg.grad_accum) == (3, 0.01, "gpt-tiny", 1)
    with pytest.raises(ConfigError, match="batch_size must be int"):
        TrainConfig.from_dict({"batch_size": "many"})
    # The repository's demo config is the demo the code runs.
    import yaml

    assert yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text()) == {**DEMO_CONFIG, "data": "data/python-docs",
                                                                            "out_dir": "runs/demo", "max_minutes": 3.0}


def test_train_help_lists_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for name in TrainConfig.__dataclass_fields__:
        assert f"--{name}" in out
    assert "(default: 16)" in out  # batch_size's default is shown


def _cli_error(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("scratchlm: error: "), err
    return err[0]


def test_cli_trains_and_bad_input_is_one_line(data_dir, tmp_path, capsys):
    run = str(tmp_path / "run")
    args = ["train", "--data", str(data_dir), "--out_dir", run, "--model", "gpt-tiny", "--context_length", "32",
            "--batch_size", "2", "--max_steps", "4", "--eval_every", "2", "--eval_batches", "1",
            "--sample_tokens", "0", "--progress", "false", "--plot", "false"]
    assert main(args) == 0
    assert "val loss" in capsys.readouterr().out
    (tmp_path / "bad.yaml").write_text("batch_size: 2\nlearning_rate: 0.1\n")
    assert "unknown option(s): learning_rate" in _cli_error(capsys, ["train", "--config", str(tmp_path / "bad.yaml")])
    assert "config file not found" in _cli_error(capsys, ["train", "--config", str(tmp_path / "none.yaml")])
    assert "run `scratchlm prepare` first" in _cli_error(capsys, ["train", "--data", str(tmp_path / "nodata")])
    # A model that disagrees with the checkpoint it should resume.
    msg = _cli_error(capsys, args + ["--resume", "--n_layers", "3"])
    assert "disagrees" in msg and "n_layers=2 in the checkpoint, 3 now" in msg
    assert "no checkpoint" in _cli_error(capsys, args[:4] + [str(tmp_path / "elsewhere"), "--resume"])
    # A truncated training state.
    state = Path(run) / "latest" / "train_state.pt"
    state.write_bytes(state.read_bytes()[:200])
    assert "corrupt or truncated" in _cli_error(capsys, args + ["--resume"])


def test_ctrl_c_saves_a_checkpoint(data_dir, tmp_path):
    """SIGINT in the middle of training: the run saves latest/ and exits with 130; --resume
    continues from there."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "scratchlm.cli", "train", "--data", str(data_dir), "--out_dir", str(run),
           "--model", "gpt-tiny", "--context_length", "32", "--batch_size", "2", "--max_steps", "100000",
           "--log_every", "1", "--eval_every", "100000", "--eval_batches", "1", "--sample_tokens", "0",
           "--progress", "false", "--plot", "false", "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    step = load_train_state(run / "latest")["step"]
    assert step >= 3
    model, _ = load_model(run / "latest")
    assert model.config.n_layers == 2
    resumed = make_trainer(TrainConfig.from_dict(json.loads((run / "train_config.json").read_text()) | {"resume": True}))
    assert resumed.step == step


def test_pick_threads_leaves_training_state_alone(data_dir, tmp_path):
    from scratchlm.train import pick_threads

    torch.set_num_threads(2)
    trainer = make_trainer(tiny(data_dir, tmp_path / "run"), quiet=True)
    before = {k: v.clone() for k, v in trainer.raw_model.state_dict().items()}
    choice = pick_threads(trainer)
    assert choice in (1, 2) and torch.get_num_threads() == choice
    assert trainer.step == 0 and all(p.grad is None for p in trainer.raw_model.parameters())
    assert all(torch.equal(v, trainer.raw_model.state_dict()[k]) for k, v in before.items())
