"""scratchlm's evaluation gives lm-evaluation-harness's numbers (its `hf` backend) on the same
model and the same local task files: per-item log-likelihoods within 1e-4, accuracy exactly,
rolling bits per byte as lm-eval's loglikelihood_rolling tasks (wikitext-style) compute it."""

import json
import os

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")
transformers = pytest.importorskip("transformers")

from scratchlm.eval import load_model
from scratchlm.eval.bpb import bits_per_byte, rolling_windows
from scratchlm.eval.multiple_choice import evaluate_choices
from scratchlm.eval.tasks import load_task_file
from test_hf import hf_tokenizer, make_hf

MC = [
    {"context": "The quick brown fox", "choices": ["jumps over", "sleeps", "Hello world!"], "label": 0},
    {"context": "Generation runs token", "choices": ["by token", "cache keeps", "x"], "label": 1},
    {"context": "Ünïcödé, naïve ", "choices": ["café", "ok 😀", "the lazy dog."], "label": 2},
    {"context": "", "choices": ["naïve café", "ok"], "label": 0},
    {"context": "and a cache keeps the keys", "choices": ["and values.", "or not", "dog"], "label": 0},
    {"context": "A", "choices": ["quick", "brown fox jumps over the lazy dog. Hello"], "label": 1},
]
TEXTS = ["The quick brown fox jumps over the lazy dog. " * 12 + "Ünïcödé, naïve café: 😀 ok.",
         "Hello world! Generation runs token by token.", "and a cache keeps the keys and values. " * 4]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def setup(request, tmp_path_factory):
    """A random transformers model saved as a directory, the same tasks as JSONL files and as
    local lm-eval YAML tasks over them."""
    d = tmp_path_factory.mktemp(f"ref-{request.param}")
    tok = hf_tokenizer()
    model = make_hf(request.param, len(tok))
    model.save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    (d / "toy_mc.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in MC))
    (d / "toy_text.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in TEXTS))
    tasks = d / "tasks"
    tasks.mkdir()
    common = (f"dataset_path: json\ndataset_kwargs:\n  cache_dir: {d / 'cache'}\n  data_files:\n"
              f"    test: {d}/NAME.jsonl\ntest_split: test\n")
    (tasks / "toy_mc.yaml").write_text(
        "task: toy_mc\n" + common.replace("NAME", "toy_mc") + "output_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n")
    (tasks / "toy_text.yaml").write_text(
        "task: toy_text\n" + common.replace("NAME", "toy_text") + "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n  - metric: bits_per_byte\n'
        "  - metric: byte_perplexity\n  - metric: word_perplexity\n")
    from lm_eval.tasks import TaskManager

    import scratchlm.eval.harness  # noqa: F401 - registers "scratchlm"

    manager = TaskManager(include_path=str(tasks), include_defaults=False)  # indexing its 10,000 YAMLs is slow
    runs = {}
    for backend in ("hf", "scratchlm"):
        runs[backend] = lm_eval.simple_evaluate(
            model=backend, model_args=f"pretrained={d / 'model'},batch_size=4", tasks=["toy_mc", "toy_text"],
            task_manager=manager, log_samples=True, device="cpu")
    return d, runs


def per_item(run, task="toy_mc"):
    samples = sorted(run["samples"][task], key=lambda s: s["doc_id"])
    return [[float(r[0][0]) for r in s["resps"]] for s in samples]


def test_adapter_equals_the_hf_backend(setup):
    _, runs = setup
    hf, ours = runs["hf"], runs["scratchlm"]
    for a, b in zip(per_item(hf), per_item(ours)):
        assert a == pytest.approx(b, abs=1e-4)
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"]["toy_mc"][metric] == hf["results"]["toy_mc"][metric]
    for metric in ("bits_per_byte,none", "byte_perplexity,none", "word_perplexity,none"):
        assert ours["results"]["toy_text"][metric] == pytest.approx(hf["results"]["toy_text"][metric], rel=1e-5)


def test_our_multiple_choice_equals_lm_eval(setup):
    d, runs = setup
    model, tokenizer = load_model(d / "model")
    result = evaluate_choices(model, tokenizer, load_task_file(d / "toy_mc.jsonl"), batch_size=3)
    ours = [item["loglikelihoods"] for item in result.details]
    for a, b in zip(per_item(runs["hf"]), ours):
        assert a == pytest.approx(b, abs=1e-4)
    hf = runs["hf"]["results"]["toy_mc"]
    assert result.metrics["acc"] == hf["acc,none"] and result.metrics["acc_norm"] == hf["acc_norm,none"]
    # The scores are not degenerate: the two metrics disagree somewhere, so both are checked.
    assert {i["prediction"] for i in result.details} != {0}


def test_our_bits_per_byte_equals_lm_eval_rolling(setup):
    d, runs = setup
    model, tokenizer = load_model(d / "model")
    assert len(tokenizer.encode(TEXTS[0])) > model.config.context_length  # several windows
    ours = bits_per_byte(model, tokenizer, TEXTS, batch_size=3)
    hf = runs["hf"]["results"]["toy_text"]
    assert ours.bits_per_byte == pytest.approx(hf["bits_per_byte,none"], rel=1e-5)
    assert ours.word_perplexity == pytest.approx(hf["word_perplexity,none"], rel=1e-5)


@pytest.mark.parametrize("stride", [None, 1, 7, 50, 128])
def test_rolling_windows_are_lm_evals(stride):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    tokens = list(range(300))
    for n in (1, 5, 128, 129, 300):
        ref = [make_disjoint_window(w) for w in get_rolling_token_windows(
            tokens[:n], prefix_token=999, max_seq_len=128, context_len=128 - (stride or 128) + 1)]
        ours = rolling_windows(tokens[:n], 999, 128, stride)
        assert ours == [(list(a), list(b)) for a, b in ref]
        assert [t for _, cont in ours for t in cont] == tokens[:n]  # every token once, in order


def test_generate_until_equals_the_hf_backend(setup):
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    d, _ = setup
    args = f"pretrained={d / 'model'},batch_size=2"
    gen = {"until": ["\n", "dog"], "max_gen_toks": 12, "do_sample": False}
    requests = [Instance("generate_until", {}, (c, dict(gen)), i)
                for i, c in enumerate(["The quick", "Hello", "and a cache keeps the keys and values. " * 2])]
    hf = get_model("hf").create_from_arg_string(args, {"device": "cpu"}).generate_until(requests, True)
    ours = get_model("scratchlm").create_from_arg_string(args).generate_until(requests, True)
    assert ours == hf
