"""Evaluation during training (--eval-tasks): the report in RUN_DIR/eval, the scores in
metrics.jsonl, equal to `scratchlm eval` on the saved model; and the public split function."""

import json

import pytest
import torch

from scratchlm.cli import main
from scratchlm.config import ConfigError
from scratchlm.corpus import load_corpus
from scratchlm.data import load_split, prepare, split_documents, split_of
from scratchlm.eval import load_model
from scratchlm.eval.runner import EvalOptions, run_tasks
from scratchlm.plots import read_metrics
from scratchlm.train import TrainConfig, make_trainer


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "ref"
    prepare(corpus="python-reference", out_dir=out, tokenizer="char", progress=False)
    return out


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    rows = [{"context": "The with statement", "choices": [" wraps a block", " zzzz qqq"], "label": 0},
            {"context": "A for loop", "choices": [" iterates", " xq"], "label": 0},
            {"context": "Raise an", "choices": [" exception", " qqqq"], "label": 0}]
    (root / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "held-out.txt").write_text("The try statement specifies exception handlers for a group of statements.\n")
    return [str(root / "mc.jsonl"), str(root / "held-out.txt")]


def tiny(data_dir, out_dir, **changes) -> TrainConfig:
    base = dict(data=str(data_dir), out_dir=str(out_dir), model="gpt-tiny", context_length=32, batch_size=4,
                max_steps=4, warmup_steps=1, lr=3e-3, min_lr=3e-4, eval_every=2, eval_batches=1, log_every=1,
                save_every=1000, sample_tokens=0, progress=False, precision="fp32", plot=False)
    return TrainConfig(**{**base, **changes})


def test_cli_train_writes_the_report_and_logs_the_scores(data_dir, tasks, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--data", str(data_dir), "--out_dir", str(run), "--model", "gpt-tiny", "--context_length", "32",
            "--batch_size", "2", "--max_steps", "4", "--eval_every", "2", "--eval_batches", "1",
            "--sample_tokens", "0", "--progress", "false", "--plot", "false",
            # fp32: where the CPU has native bf16 the default precision trains under bf16 autocast,
            # and the in-training scores would then differ from a float32 reload in the 5th digit.
            "--precision", "fp32",
            "--eval-tasks", ",".join(tasks), "--eval-tasks-every", "2"]
    assert main(args) == 0
    assert sorted(p.name for p in (run / "eval").iterdir()) == ["report.json", "report.md", "scores.png",
                                                               "step-2", "step-4"]
    report = json.loads((run / "eval" / "report.json").read_text())
    assert set(report["results"]) == {"mc", "held-out"} and report["config"]["step"] == 4
    rows = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "eval_tasks"]
    assert [r["step"] for r in rows] == [2, 4, 4]  # every 2 steps, then the final report
    final = rows[-1]
    # The same numbers as `scratchlm eval` on the saved model (latest/ is the final model).
    model, tokenizer = load_model(run / "latest")
    reference = {f"{r.name}/{r.main_metric}": r.metrics[r.main_metric]
                 for r in run_tasks(model, tokenizer, tasks, EvalOptions(batch_size=8))}
    assert set(final) - {"kind", "step", "tokens", "elapsed_s"} == set(reference)
    for key, value in reference.items():
        assert final[key] == pytest.approx(value, abs=1e-6)
    assert report["results"]["mc"]["acc"] == pytest.approx(reference["mc/acc"])
    assert "eval tasks: mc/acc" in capsys.readouterr().out


def test_a_bad_task_fails_before_training(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["train", "--data", str(data_dir), "--out_dir", str(run), "--max_steps", "2",
                 "--eval-tasks", str(tmp_path / "missing.jsonl"), "--progress", "false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "task file not found" in err[0]
    assert not run.exists()


def test_eval_tasks_need_a_hook_and_sane_values(data_dir, tmp_path):
    with pytest.raises(ConfigError, match="evaluation hook"):
        make_trainer(tiny(data_dir, tmp_path / "r", eval_tasks="python-docs:val"), quiet=True)
    with pytest.raises(ConfigError, match="eval_tasks_every needs eval_tasks"):
        tiny(data_dir, tmp_path / "r", eval_tasks_every=2)
    with pytest.raises(ConfigError, match="eval_tasks_every must be a positive integer"):
        tiny(data_dir, tmp_path / "r", eval_tasks="x", eval_tasks_every=0)
    with pytest.raises(ConfigError, match="names no task"):
        tiny(data_dir, tmp_path / "r", eval_tasks=" , ")


def test_training_rng_is_untouched_by_the_hook(data_dir, tasks, tmp_path):
    """Weights after training are the same with and without the eval hook (it restores every RNG)."""
    from scratchlm.eval.train_hook import training_eval_hook

    plain = make_trainer(tiny(data_dir, tmp_path / "a", dropout=0.1), quiet=True)
    plain.run()
    cfg = tiny(data_dir, tmp_path / "b", dropout=0.1, eval_tasks=",".join(tasks), eval_tasks_every=1)
    hooked = make_trainer(cfg, quiet=True, eval_hook=training_eval_hook(tasks, cfg.out_dir))
    result = hooked.run()
    assert set(result.eval_scores) == {"mc/acc", "held-out/bits_per_byte"}
    for a, b in zip(plain.raw_model.parameters(), hooked.raw_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_split_documents_is_the_split_prepare_writes(tmp_path):
    """The public split function picks the very documents `prepare` put in each split."""
    docs = [d for d in load_corpus("python-reference")][:300]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = tmp_path / "data"
    prepare([str(tmp_path / "docs.jsonl")], out_dir=out, tokenizer="char", val_fraction=0.2, seed=7,
            progress=False)
    val = split_documents(docs, "val", val_fraction=0.2, seed=7)
    assert val == [d for i, d in enumerate(docs) if d and split_of(i, 0.2, 7) == "val"]
    from scratchlm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(out)
    tokens = [int(t) for shard in load_split(out, "val") for t in shard]
    assert len(tokens) == sum(1 + len(tokenizer.encode(d)) for d in val)  # [eot] + each held-out document
    with pytest.raises(Exception, match="train or val"):
        split_documents(docs, "test")


def test_the_demo_report_card_tasks(tmp_path):
    """make demo's tasks: bits per byte on the held-out docstrings and python-docs-choice,
    whose items all come from held-out documents (none the demo model trained on)."""
    from scratchlm.eval.tasks import docstring_choice_task
    from scratchlm.eval.train_hook import training_eval_hook
    from scratchlm.train.config import task_list
    from scratchlm.train.demo import DEMO_EVAL_TASKS

    task = docstring_choice_task()
    held_out = split_documents(load_corpus("python-docs"), "val")
    firsts = {" ".join(d.strip().split("\n", 1)[0].split()) for d in held_out}
    assert len(task.items) == 200 and task.kind == "multiple_choice"
    for item in task.items:
        assert len(item.continuations) == 4 and len(set(item.continuations)) == 4
        assert f"{item.contexts[0]} {item.continuations[item.label]}" in firsts
    assert sorted({i.label for i in task.items}) == [0, 1, 2, 3]  # the right answer moves around
    model, tokenizer = load_model("gpt-tiny")
    hook = training_eval_hook(task_list(DEMO_EVAL_TASKS), tmp_path, EvalOptions(limit=8, batch_size=8))
    scores = hook(model, tokenizer, 5, True)
    assert set(scores) == {"python-docs-val/bits_per_byte", "python-docs-choice/acc"}
    assert (tmp_path / "eval" / "report.md").read_text().count("python-docs") >= 2
