"""`scratchlm rag index` and `scratchlm rag ask`: the command line of retrieval-augmented answers.

    scratchlm rag index                          # the Python reference -> the default index
    scratchlm rag index notes/ paper.pdf --index my-index
    scratchlm rag ask "How does the with statement work?"            # passages + sources
    scratchlm rag ask "What is X?" --index my-index --model MODEL -k 4  # a cited answer
    scratchlm rag ask "What is X?" --index my-index --retrieve-only --json
"""

from __future__ import annotations

import argparse
import json
import sys

from .options import add_config_file_option, add_config_options, config_from_args


def add_commands(subparsers) -> None:
    from ..rag.config import AskConfig

    rag = subparsers.add_parser("rag", help="retrieval-augmented answers over your documents",
                                description="Index documents (.txt .md .html .pdf), then ask questions "
                                            "answered from them with numbered citations.")
    sub = rag.add_subparsers(dest="rag_command", metavar="{index,ask}")
    rag.set_defaults(func=lambda args: (rag.print_help(), 2)[1])

    p = sub.add_parser("index", help="create or refresh an index from files and folders",
                       description="Chunk, embed and index the .txt .md .html .pdf files under PATH... "
                                   "Re-running embeds only new or changed files and drops deleted "
                                   "ones. With no PATH, indexes the Python language reference.")
    p.add_argument("paths", nargs="*", metavar="PATH", help="files or folders (default: the Python reference)")
    p.add_argument("--index", default=None, metavar="DIR",
                   help="index directory (default: $SCRATCHLM_RAG_INDEX or ~/.cache/scratchlm/rag/python-reference)")
    p.add_argument("--embedder", default=None, metavar="MODEL",
                   help="sentence-transformers model: a local path or hub id (default: all-MiniLM-L6-v2, bundled)")
    p.add_argument("--kind", choices=["flat", "hnsw", "ivf"], default=None,
                   help="FAISS index: flat (exact, default), hnsw or ivf (approximate, for large collections)")
    p.add_argument("--chunk-tokens", type=int, default=None, help="most tokens per chunk (default 128)")
    p.add_argument("--overlap", type=int, default=None, help="tokens shared by neighbouring chunks (default 16)")
    p.add_argument("--rebuild", action="store_true", help="start the index afresh (e.g. with another --embedder)")
    p.add_argument("--skip-errors", action="store_true",
                   help="leave out unreadable files (and list them) instead of stopping")
    p.set_defaults(func=_index_command)

    p = sub.add_parser("ask", help="answer a question from an index, with citations",
                       description="Retrieve the K best chunks for QUESTION; with --model, generate an "
                                   "answer citing them as [1], [2]...; without, print the passages. "
                                   "The sampling options are generate's; the defaults (a mild "
                                   "repetition penalty, no repeated 6-grams) keep small models out of loops.")
    p.add_argument("question", help="the question ('-' reads it from stdin)")
    p.add_argument("--index", default=None, metavar="DIR",
                   help="index directory (default: the Python reference index, built on first use)")
    p.add_argument("--model", default=None,
                   help="model to write the answer: scratchlm or Hugging Face directory, hub id, .gguf file, "
                        "named model (smollm2-135m-instruct) or preset")
    p.add_argument("-k", dest="k", type=int, default=argparse.SUPPRESS, help="same as --k")
    p.add_argument("--hybrid", action="store_const", const="hybrid", dest="mode", default=argparse.SUPPRESS,
                   help="same as --mode hybrid")
    p.add_argument("--retrieve-only", action="store_true", help="print the ranked chunks and scores, no answer")
    p.add_argument("--json", action="store_true", help="print JSON: the answer (or null) and one object per chunk")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="also stop the answer at this text (repeatable)")
    add_config_file_option(p)
    add_config_options(p, AskConfig)
    p.set_defaults(func=_ask_command)


def _index_command(args: argparse.Namespace) -> int:
    from ..rag.ingest import default_index_dir, index_documents

    report = index_documents(args.paths or None, args.index or default_index_dir(),
                             embedder_name=args.embedder, kind=args.kind, max_tokens=args.chunk_tokens,
                             overlap=args.overlap, rebuild=args.rebuild, skip_errors=args.skip_errors,
                             progress=sys.stderr.isatty())
    for reason in report.skipped:
        print(f"skipped {reason}", file=sys.stderr)
    print(report.summary())
    return 0


def _ask_command(args: argparse.Namespace) -> int:
    from ..rag.config import AskConfig
    from ..rag.pipeline import Answer, answer
    from ..rag.retrieve import open_retriever
    from . import UsageError

    cfg = config_from_args(AskConfig, args)  # every option checked before the index or model is opened
    question = sys.stdin.read().strip() if args.question == "-" else args.question
    if not question.strip():
        raise UsageError("the question is empty")
    hits = open_retriever(args.index).search(question, k=cfg.k, mode=cfg.mode)
    if args.model and not args.retrieve_only:
        from ..load import load_any

        model, tokenizer = load_any(args.model)
        result = answer(question, hits, model, tokenizer, template=cfg.template, stop=args.stop,
                        **cfg.generate_options())
    else:
        result = Answer(question, hits)
    if args.json:
        print(json.dumps(result.to_dict(), ensure_ascii=False, indent=2))
    elif result.text is not None:
        print(result.format())
    else:
        _print_passages(result)
        if not args.retrieve_only:
            print("\n(no --model given, so these are the retrieved passages; add --model with a "
                  "model directory, Hugging Face id or preset to get a written answer citing them)")
    return 0


def _print_passages(result) -> None:
    if not result.sources:
        print("no passages found")
    for n, hit in enumerate(result.sources, start=1):
        print(f"[{n}] score {hit.score:.3f}  {hit.label()}  chars {hit.start}-{hit.end}")
        print("    " + hit.text.strip().replace("\n", "\n    "))
        print()
