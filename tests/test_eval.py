"""Evaluation without a reference tool: answers known from constructed logits, the scorer's
speed paths equal its plain path, bad task files, the command, the report and the doctests."""

import doctest
import importlib
import json
import math

import pytest
import torch

from scratchlm import ModelConfig, Transformer
from scratchlm.cli import main
from scratchlm.eval.bpb import bits_per_byte
from scratchlm.eval.loglik import score_continuations
from scratchlm.eval.multiple_choice import evaluate_choices
from scratchlm.eval.tasks import Item, Task, load_task_file
from scratchlm.tokenizer import CharTokenizer

TOK = CharTokenizer.train("abcdxyz ", special_tokens=["<|endoftext|>"])


class Bigram(torch.nn.Module):
    """A model whose logits we write: the next-token logits are row ``W[previous token]``.
    Its hidden state is the one-hot of the token, and lm_head is W, so the log-likelihood of
    any continuation is known in closed form."""

    def __init__(self, vocab_size):
        super().__init__()
        self.config = ModelConfig.preset("gpt-tiny")
        self.config.vocab_size = vocab_size
        self.tok_emb = torch.nn.Embedding.from_pretrained(torch.eye(vocab_size))
        self.lm_head = torch.nn.Linear(vocab_size, vocab_size, bias=False)
        torch.nn.init.zeros_(self.lm_head.weight)

    def prefer(self, previous: str, following: str, by: float = 10.0):
        a, b = TOK.encode(previous)[-1], TOK.encode(following)[0]
        with torch.no_grad():
            self.lm_head.weight[b, a] += by  # logits = W @ onehot(a): column a is "after a"

    def forward(self, ids, return_hidden=False):  # not a Transformer: scored without prompt sharing
        hidden = self.tok_emb(ids)
        return hidden if return_hidden else self.lm_head(hidden)


def ids(text):
    return TOK.encode(text)


def test_multiple_choice_picks_the_preferred_option_and_acc_norm_divides_by_characters():
    model = Bigram(TOK.vocab_size)
    model.prefer(" ", "c")  # after the delimiter, "c" is likely: choice "cd" wins
    task = Task("mc", "multiple_choice", [Item(["ab"], ["xd", "cd", "zd"], 1, 1),  # acc: right
                                          Item(["ab"], ["xd", "cd"], 0, 2)])  # acc: wrong
    result = evaluate_choices(model, TOK, task)
    assert [d["prediction"] for d in result.details] == [1, 1]
    assert result.metrics["acc"] == 0.5 and result.baseline == pytest.approx((1 / 3 + 1 / 2) / 2)
    # Uniform logits: every token costs log V. " x" (2 tokens) beats " yyyy" (5 tokens) on the total,
    # but per character "yyyy" (5 log V / 4) beats "x" (2 log V / 1): acc and acc_norm disagree.
    flat = Bigram(TOK.vocab_size)
    task = Task("norm", "multiple_choice", [Item(["ab"], ["x", "yyyy"], 1, 1)])
    result = evaluate_choices(flat, TOK, task)
    [lls] = [d["loglikelihoods"] for d in result.details]
    assert lls == pytest.approx([-2 * math.log(TOK.vocab_size), -5 * math.log(TOK.vocab_size)])
    assert result.metrics["acc"] == 0.0 and result.metrics["acc_norm"] == 1.0


def test_schema_picks_the_context_that_makes_the_ending_likely():
    model = Bigram(TOK.vocab_size)
    model.prefer("b", " ")  # only the context ending in "b" makes " z" likely
    task = Task("schema", "schema", [Item(["xa", "xb", "xc"], ["z"], 1, 1)])
    result = evaluate_choices(model, TOK, task)
    assert result.details[0]["prediction"] == 1 and result.metrics["acc"] == 1.0 == result.metrics["acc_norm"]


def test_language_modelling_needs_greedy_to_reproduce_every_token():
    model = Bigram(TOK.vocab_size)
    for a, b in (("b", "c"), ("c", "d")):
        model.prefer(a, b)
    task = Task("lm", "language_modeling", [Item(["ab"], ["cd"], 0, 1), Item(["ab"], ["cx"], 0, 2)], delimiter="")
    result = evaluate_choices(model, TOK, task)
    assert [d["greedy"] for d in result.details] == [True, False] and result.metrics["acc"] == 0.5


@pytest.fixture(scope="module", params=["llama-tiny", "gemma3-tiny"])  # gemma3: a window of 16 < the contexts
def tiny(request):
    torch.manual_seed(0)
    return Transformer(ModelConfig.preset(request.param)).eval()


def test_shared_prefix_and_batching_change_no_number(tiny, monkeypatch):
    from scratchlm.eval import loglik
    packed_rows = []  # the shared path must run (packed: gemma3's window of 16 is inside the rows)
    real = loglik.continuation_hidden
    monkeypatch.setattr(loglik, "continuation_hidden", lambda model, ids, *a: packed_rows.append(len(ids)) or real(model, ids, *a))
    g = torch.Generator().manual_seed(1)
    ctx = torch.randint(0, 512, (40,), generator=g).tolist()
    requests = [(ctx, torch.randint(0, 512, (n,), generator=g).tolist()) for n in (1, 3, 7, 2)]
    requests += [(ctx[:5], [9, 8]), ([3], [4])]
    plain = [score_continuations(tiny, [r], share_prefix=False)[0] for r in requests]
    for shared in (True, False):
        for batch in (1, 2, 16):
            got = score_continuations(tiny, requests, batch_size=batch, share_prefix=shared)
            assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in plain], abs=1e-4)
            assert [g for _, g in got] == [g for _, g in plain]
    assert packed_rows and max(packed_rows) == 4  # the context's four continuations in one batch of 16
    # and against the plain forward pass written out
    ctx, cont = requests[1]
    with torch.no_grad():
        logp = tiny(torch.tensor([ctx + cont[:-1]]))[0].log_softmax(-1)
    expected = sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))
    assert plain[1][0] == pytest.approx(expected, abs=1e-4)


def test_repeated_choices_get_one_score_and_the_first_wins_a_tie(tiny, monkeypatch):
    # A question may list one ending twice (benchmarks/eval.py's item 301 does). lm-eval gives
    # both copies one number and argmax takes the first; copies at two places of a packed row
    # would differ in float32 rounding and could pick the second.
    from scratchlm.eval import loglik
    scored = []
    real = loglik._score_rows
    monkeypatch.setattr(loglik, "_score_rows", lambda model, reqs, shared: scored.extend(reqs) or real(model, reqs, shared))
    g = torch.Generator().manual_seed(2)
    ctx = torch.randint(0, 512, (60,), generator=g).tolist()
    a, b = (torch.randint(0, 512, (9,), generator=g).tolist() for _ in range(2))
    requests = [(ctx, a), (ctx, b), (ctx, a), (ctx, a), ([5, 6], a), ([5, 6], a)]
    got = score_continuations(tiny, requests, batch_size=16)
    assert got[0] == got[2] == got[3] and got[4] == got[5]  # exactly, not approximately
    assert len(scored) == 3  # each distinct request ran once
    plain = [score_continuations(tiny, [r], share_prefix=False)[0][0] for r in requests[:2]]
    assert [got[0][0], got[1][0]] == pytest.approx(plain, abs=1e-4)


def test_a_question_that_fills_the_context_exactly_is_scored_on_plain_rows(tiny, monkeypatch):
    # context + continuation = context_length + 1 tokens: the model reads context_length of
    # them (the last is never read), which fits, but the packed row's positions would not
    # (can_share). That batch goes back to plain rows; its numbers must not change.
    from scratchlm.eval import loglik
    packed = []
    real = loglik.continuation_hidden
    monkeypatch.setattr(loglik, "continuation_hidden", lambda model, ids, *a: packed.append(len(ids)) or real(model, ids, *a))
    limit = tiny.config.context_length
    g = torch.Generator().manual_seed(3)
    full = torch.randint(0, 512, (limit - 3,), generator=g).tolist()
    short = torch.randint(0, 512, (20,), generator=g).tolist()
    requests = [(full, [5, 6, 7, 8]), (full, [9, 10, 11, 12]),   # limit + 1 tokens each
                (short, [1, 2]), (short, [3, 4, 5])]             # an ordinary question
    got = score_continuations(tiny, requests, batch_size=2)
    alone = [score_continuations(tiny, [r], share_prefix=False)[0] for r in requests]
    assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in alone], abs=1e-4)
    assert packed == [2]  # one packed batch: the ordinary question's two requests, not the full ones


def test_bits_per_byte_counts_every_byte_once_whatever_the_stride(tiny):
    tok = CharTokenizer.train("abcdxyz é", special_tokens=["<|endoftext|>"])
    text = "abcd xyz é " * 30  # 330 characters, 360 bytes: é is two
    results = [bits_per_byte(tiny, tok, [text], stride=s) for s in (None, 64, 1)]
    assert {r.tokens for r in results} == {330} and {r.bytes for r in results} == {360}
    # A shorter stride gives every prediction more context: a different (not a broken) number.
    assert all(abs(r.bits_per_byte - results[0].bits_per_byte) < 1.0 for r in results)
    short = text[:100]  # fits one window (128): the stride does not matter
    assert bits_per_byte(tiny, tok, [short], stride=10).nll == pytest.approx(
        bits_per_byte(tiny, tok, [short]).nll, abs=1e-3)


def test_fewshot_is_seeded_and_never_shows_the_question_itself(tmp_path):
    rows = [{"context": f"q{i}", "choices": [f"a{i}", "no"], "label": 0} for i in range(10)]
    path = tmp_path / "fs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = load_task_file(path)
    prompts = [task.prompt(item, num_fewshot=3, seed=7) for item in task.items]
    assert prompts == [task.prompt(item, num_fewshot=3, seed=7) for item in task.items]
    assert prompts != [task.prompt(item, num_fewshot=3, seed=8) for item in task.items]
    for i, p in enumerate(prompts):
        shots = p.split("\n\n")
        assert len(shots) == 4 and shots[-1] == f"q{i}" and f"q{i} a{i}" not in shots


LAYOUTS = {
    "hellaswag": {"activity_label": "Baking", "ctx_a": "A man mixes flour.", "ctx_b": "he",
                  "endings": ["bakes [title] bread.", "swims.", "sings.", "flies."], "label": "0"},
    "arc": {"question": "What do plants need?", "choices": {"text": ["light", "rock"], "label": ["A", "B"]},
            "answerKey": "A"},
    "piqa": {"goal": "Open a jar", "sol1": "twist the lid", "sol2": "freeze it", "label": 0},
    "mmlu": {"question": "2+2?", "choices": ["3", "4", "5", "6"], "answer": 1, "subject": "high_school_math"},
    "lambada": {"text": "the cat sat on the mat"},
    "gsm8k": {"question": "1+1?", "answer": "1+1=2\n#### 2"},
    "schema": {"context_options": ["The ball was big", "The box was big"], "continuation": "so it fit", "label": 1},
}


def test_each_layout_renders_as_lm_eval_does(tmp_path):
    rendered = {}
    for name, row in LAYOUTS.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text(json.dumps(row) + "\n")
        task = load_task_file(path)
        rendered[name] = (task.kind, task.prompt(task.items[0]), task.items[0].continuations, task.items[0].label)
    assert rendered["hellaswag"] == ("multiple_choice", "Baking: A man mixes flour. He",
                                     ["bakes. bread.", "swims.", "sings.", "flies."], 0)
    assert rendered["arc"] == ("multiple_choice", "Question: What do plants need?\nAnswer:", ["light", "rock"], 0)
    assert rendered["piqa"][1:3] == ("Question: Open a jar\nAnswer:", ["twist the lid", "freeze it"])
    mmlu_prompt = ("The following are multiple choice questions (with answers) about high school math.\n\n"
                   "2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:")
    assert rendered["mmlu"] == ("multiple_choice", mmlu_prompt, ["A", "B", "C", "D"], 1)
    assert rendered["lambada"] == ("language_modeling", "the cat sat on the", [" mat"], 0)
    assert rendered["gsm8k"][0] == "generative" and rendered["schema"][0] == "schema"


# ---- bad input: one line naming the file and the row ------------------------------------------
BAD = {
    "missing field": ('{"context": "a", "choices": ["b", "c"], "label": 0}\n{"context": "a", "label": 0}\n',
                      "line 2: missing field 'choices'"),
    "label out of range": ('{"context": "a", "choices": ["b", "c"], "label": 2}\n', "line 1: label 2 is out of range"),
    "empty file": ("\n\n", "the file has no items"),
    "not json": ('{"context": "a", "choices": ["b", "c"], "label": 0}\n{oops\n', "line 2: not valid JSON"),
    "too long": ('{"context": "a", "choices": ["b", "c"], "label": 0}\n'
                 + json.dumps({"context": "word " * 200, "choices": ["b", "c"], "label": 0}) + "\n",
                 "line 2: the context and choice are"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_task_files_are_one_clear_line(case, tmp_path, capsys):
    text, expected = BAD[case]
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    assert main(["eval", "gpt-tiny", "--tasks", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and expected in err, err


def test_unknown_task_and_bad_options(capsys):
    assert main(["eval", "gpt-tiny", "--tasks", "no-such-task"]) == 2
    assert "unknown task 'no-such-task'" in capsys.readouterr().err
    assert main(["eval", "gpt-tiny", "--tasks", "humaneval", "--k", "5"]) == 2
    assert "k <= --samples" in capsys.readouterr().err


def test_eval_command_json_and_report(tmp_path, capsys):
    mc = tmp_path / "colors.jsonl"
    mc.write_text("".join(json.dumps({"context": c, "choices": ["green", "white", "blue"], "label": i}) + "\n"
                          for i, c in enumerate(["Grass is", "Snow is", "The sky is"])))
    text = tmp_path / "notes.txt"
    text.write_text("Plain text to measure. " * 20)
    out = tmp_path / "report"
    assert main(["eval", "gpt-tiny", "--tasks", f"{mc},{text}", "--json", "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    colors = report["results"]["colors"]
    assert colors["items"] == 3 and 0 <= colors["acc"] <= 1 and 0 <= colors["acc_norm"] <= 1
    assert colors["baseline"] == pytest.approx(1 / 3)
    assert report["results"]["notes"]["bytes"] == 460 and report["results"]["notes"]["bits_per_byte"] > 0
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md", "scores.png"]
    saved = json.loads((out / "report.json").read_text())
    assert len(saved["details"]["colors"]) == 3 and saved["results"] == report["results"]
    assert "| colors | multiple_choice | acc |" in (out / "report.md").read_text()


def test_chat_letter_choice_reads_the_letter_logit(tmp_path):
    from scratchlm.eval.multiple_choice import letter_choice

    tok = CharTokenizer.train("ABCD abcdxyz?.:()\nQuestionAnswer Useritheltrofpyn,", special_tokens=["<|endoftext|>"])
    model = Bigram(tok.vocab_size)
    a, b = tok.encode(":")[0], tok.encode("B")[0]  # the "plain" template ends with "Assistant:"
    with torch.no_grad():
        model.lm_head.weight[b, a] = 10.0
    task = Task("arc", "multiple_choice", [Item(["Question: x?\nAnswer:"], ["a", "b", "c"], 1, 1),
                                           Item(["Question: y?\nAnswer:"], ["a", "b", "c"], 0, 2)])
    result = letter_choice(model, tok, task, template="plain")
    assert [d["prediction"] for d in result.details] == [1, 1] and result.metrics["acc"] == 0.5


MODULES = ["loglik", "bpb", "tasks", "multiple_choice", "generative", "humaneval", "report", "runner", "sandbox"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(f"scratchlm.eval.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_questions_of_different_lengths_share_a_batch_and_still_fit(tiny):
    """Several questions in one batch: contexts left-padded; a long context next to a long
    continuation must not overflow the model's context (128 for llama-tiny)."""
    g = torch.Generator().manual_seed(2)
    rand = lambda n: torch.randint(0, 512, (n,), generator=g).tolist()
    requests = []
    for ctx_len, cont_len in ((100, 3), (5, 100), (30, 8), (2, 2), (100, 28)):
        ctx = rand(ctx_len)
        requests += [(ctx, rand(cont_len)) for _ in range(3)]
    plain = [score_continuations(tiny, [r])[0][0] for r in requests]
    got = [lp for lp, _ in score_continuations(tiny, requests, batch_size=12)]
    assert got == pytest.approx(plain, abs=1e-4)


def test_a_hub_task_offline_is_one_line_pointing_to_a_local_file(monkeypatch, capsys):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert main(["eval", "gpt-tiny", "--tasks", "arc_easy"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "arc_easy" in err and "local JSONL" in err, err
