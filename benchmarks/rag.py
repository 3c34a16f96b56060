"""Retrieval benchmark: indexing throughput, query latency at 10k/100k chunks, recall@1/@5.

    .venv/bin/python benchmarks/rag.py                 # everything (~5 min on 2 busy cores)
    .venv/bin/python benchmarks/rag.py --only latency  # one part: throughput, latency, recall

1. **Indexing throughput** on the built-in corpus (the Python reference topics, chunked
   as `scratchlm rag index` does): sentence-transformers' default ``encode`` (fp32,
   batches of 32) against ``Embedder.encode`` (bf16 where native, token-budget batches),
   timed side by side on the same chunks, slice by slice (so machine load hits both
   alike), plus the cosine of our vectors to the fp32 ones (goal: >= 2x, cosine >= 0.99).
2. **Query latency**, end to end (embed the question, search, fetch the k chunks from
   SQLite) over an index of 10k and 100k chunks with synthetic unit vectors, p50/p99 in
   ms: the baseline (default ``encode`` + exact FAISS search) against ours (cached model,
   fast ``encode_query``; exact flat and HNSW). Goal: p50 < 20 ms at 100k.
3. **Recall@1 and @5** of the 72 questions in ``benchmarks/rag_questions.jsonl`` (each with
   the topic that answers it) on the full built-in index: dense, keyword (BM25), hybrid.
   "strict" counts only the named topic; "+copies" also accepts a topic that contains the
   named one verbatim (``compound`` holds the whole text of ``with``, ``if``, ``try``...).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from scratchlm.rag.chunking import Chunk, chunk_document  # noqa: E402
from scratchlm.rag.embed import load_embedder  # noqa: E402
from scratchlm.rag.index import RagIndex  # noqa: E402
from scratchlm.rag.ingest import index_documents  # noqa: E402
from scratchlm.rag.loaders import Document, python_reference_documents  # noqa: E402
from scratchlm.rag.retrieve import Retriever, _threads  # noqa: E402

HERE = Path(__file__).parent


def questions() -> list[dict]:
    return [json.loads(line) for line in (HERE / "rag_questions.jsonl").read_text().splitlines() if line.strip()]


def corpus_chunks(embedder) -> list[Chunk]:
    chunks = []
    for doc in python_reference_documents():
        chunks += chunk_document(doc.text, source=doc.source, token_spans=embedder.token_spans)
    return chunks


# ---- 1. indexing throughput --------------------------------------------------------------

def bench_throughput(embedder, n_chunks: int, slice_size: int = 100) -> None:
    chunks = corpus_chunks(embedder)
    step = max(1, len(chunks) // n_chunks)
    texts = [c.text for c in chunks[::step]][:n_chunks]  # spread over the whole corpus
    embedder.encode(texts[:16])  # warm both paths (kernel set-up is not throughput)
    embedder.reference_encode(texts[:16])
    base_s = fast_s = 0.0
    base, fast = [], []
    for i in range(0, len(texts), slice_size):  # alternate slices: load hits both alike
        part = texts[i:i + slice_size]
        t = time.perf_counter()
        base.append(embedder.reference_encode(part))
        base_s += time.perf_counter() - t
        t = time.perf_counter()
        fast.append(embedder.encode(part))
        fast_s += time.perf_counter() - t
    base, fast = np.concatenate(base), np.concatenate(fast)
    cosine = (base * fast).sum(1)
    tokens = [len(embedder.token_spans(t)) for t in texts]
    print(f"\n== Indexing throughput: {len(texts)} of the {len(chunks)} chunks of the Python reference "
          f"(mean {statistics.mean(tokens):.0f} tokens), dtype {embedder.dtype}, {torch.get_num_threads()} threads")
    print(f"  sentence-transformers encode (fp32, batch 32): {len(texts) / base_s:7.1f} chunks/s")
    print(f"  scratchlm Embedder.encode                      : {len(texts) / fast_s:7.1f} chunks/s"
          f"   {base_s / fast_s:.2f}x")
    print(f"  cosine to fp32: min {cosine.min():.5f}, mean {cosine.mean():.5f}  (goal >= 0.99)")


# ---- 2. query latency ----------------------------------------------------------------------

def synthetic_index(n: int, dim: int, kind: str, seed: int = 0) -> RagIndex:
    """An index of ``n`` chunks with random unit vectors (texts are placeholders)."""
    rng = np.random.default_rng(seed)
    index = RagIndex.create("benchmark", dim, kind=kind)
    per_doc = 1000
    for d in range(0, n, per_doc):
        m = min(per_doc, n - d)
        vectors = rng.standard_normal((m, dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        source = f"synthetic-{d // per_doc}"
        chunks = [Chunk(source, f"synthetic chunk {d + i} " * 20, i * 400, i * 400 + 400, position=i)
                  for i in range(m)]
        index.add(Document(source, "", sha256=source, title=source), chunks, vectors)
    return index


def percentiles(times: list[float]) -> str:
    ms = np.asarray(times) * 1e3
    return f"p50 {np.percentile(ms, 50):6.2f} ms  p99 {np.percentile(ms, 99):6.2f} ms"


def bench_latency(embedder, sizes: list[int], repeats: int, hnsw: bool) -> None:
    import faiss

    qs = [q["question"] for q in questions()]
    print(f"\n== Query latency, end to end (embed + search + fetch k=4 chunks), {repeats} queries")
    embedder.encode_query(qs[0])
    embedder.reference_encode([qs[0]])
    kinds = ["flat", "hnsw"] if hnsw else ["flat"]
    for n in sizes:
        for kind in kinds:
            t = time.perf_counter()
            index = synthetic_index(n, embedder.dim, kind)
            index.faiss_index()
            build_s = time.perf_counter() - t
            index.meta["embedder"] = embedder.name
            retriever = Retriever(index, embedder)  # query_threads=1 (the default)
            base, ours, search_only = [], [], []
            for r in range(repeats):  # interleaved: baseline, then ours, per query
                q = qs[r % len(qs)]
                t = time.perf_counter()
                v = embedder.reference_encode([q])[0]
                index.search(v, 4)
                base.append(time.perf_counter() - t)
                t = time.perf_counter()
                retriever.search(q, k=4)
                ours.append(time.perf_counter() - t)
                with _threads(1):
                    t = time.perf_counter()
                    index.search_ids(v, 4)
                    search_only.append(time.perf_counter() - t)
            label = f"{n // 1000}k {kind}"
            print(f"  {label:>9} (built in {build_s:5.1f} s)  search alone, 1 thread: {percentiles(search_only)}")
            if kind == "flat":  # the baseline: default encode + exact search at this size
                baseline = base
                print(f"  {'':>9} baseline (ST encode + exact search): {percentiles(base)}")
            print(f"  {'':>9} scratchlm Retriever.search          : {percentiles(ours)}"
                  f"   p50 {np.median(baseline) / np.median(ours):.2f}x vs the exact baseline")
    print(f"  (baseline: torch and faiss on their default {torch.get_num_threads()} / "
          f"{faiss.omp_get_max_threads()} threads; ours: 1 thread per query, Retriever(query_threads=1))")


# ---- 3. recall ---------------------------------------------------------------------------

def copies_of(topic: str) -> set[str]:
    """Topics whose text contains ``topic``'s own first paragraphs verbatim."""
    from pydoc_data.topics import topics

    body = topics[topic].split("\n\n", 1)[-1][:200]
    return {topic} | {other for other, text in topics.items() if other != topic and body in text}


def bench_recall(embedder, index_dir: Path) -> None:
    t = time.perf_counter()
    report = index_documents(None, index_dir, embedder=embedder)
    print(f"\n== Recall on {len(questions())} questions, full built-in index ({report.n_chunks} chunks; "
          f"{'built' if report.embedded else 'loaded'} in {time.perf_counter() - t:.1f} s)")
    retriever = Retriever(index_dir, embedder)
    qs = questions()
    for mode in ("dense", "keyword", "hybrid"):
        strict1 = strict5 = loose1 = loose5 = 0
        misses = []
        for q in qs:
            topics = [h.source.split(":", 1)[1] for h in retriever.search(q["question"], k=5, mode=mode)]
            accept = copies_of(q["topic"])
            strict1 += topics[:1] == [q["topic"]]
            strict5 += q["topic"] in topics
            loose1 += bool(topics) and topics[0] in accept
            loose5 += any(t in accept for t in topics)
            if not (topics and topics[0] in accept):
                misses.append(f"{q['question']} -> {topics[:1]} (want {q['topic']})")
        n = len(qs)
        print(f"  {mode:>7}: recall@1 {strict1 / n:.3f}  recall@5 {strict5 / n:.3f}   "
              f"(+copies: @1 {loose1 / n:.3f}  @5 {loose5 / n:.3f})")
        if mode == "hybrid":
            for miss in misses[:8]:
                print(f"           miss: {miss}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["throughput", "latency", "recall"], action="append")
    parser.add_argument("--chunks", type=int, default=400, help="chunks for the throughput test (default 400)")
    parser.add_argument("--sizes", default="10000,100000", help="index sizes for the latency test")
    parser.add_argument("--repeats", type=int, default=200, help="queries per latency measurement")
    parser.add_argument("--no-hnsw", action="store_true", help="skip HNSW (its 100k build takes a while)")
    parser.add_argument("--index", default=None, help="where to build/reuse the built-in index for recall")
    args = parser.parse_args()
    parts = args.only or ["throughput", "latency", "recall"]
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, bf16 native: "
          f"{torch.ops.mkldnn._is_mkldnn_bf16_supported()}")
    embedder = load_embedder()
    if "throughput" in parts:
        bench_throughput(embedder, args.chunks)
    if "latency" in parts:
        bench_latency(embedder, [int(s) for s in args.sizes.split(",")], args.repeats, not args.no_hnsw)
    if "recall" in parts:
        index_dir = Path(args.index) if args.index else Path(tempfile.gettempdir()) / "scratchlm-rag-bench-index"
        bench_recall(embedder, index_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
