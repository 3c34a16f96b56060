"""`scratchlm generate` and `scratchlm chat`: argument parsing for the decode loop (generate.py)."""

from __future__ import annotations

import sys
import warnings

from . import UsageError


def _add_sampling_options(p) -> None:
    p.add_argument("model", help="model directory, Hugging Face directory or id, or a preset (random weights)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="most tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; >0: sample")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample in the smallest set with this mass, in (0, 1]")
    p.add_argument("--min-p", type=float, default=None, help="drop tokens below min_p x the top probability")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help=">1 discourages repeats (default 1)")
    p.add_argument("--no-repeat-ngram", type=int, default=0, metavar="N",
                   help="never write the same N tokens twice in the output (default 0: off)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (repeatable output)")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop when this text appears (repeatable); it is not printed")
    p.add_argument("--no-cache", action="store_true", help="recompute every position each step (slow)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="run in this dtype (default: the checkpoint's)")
    p.add_argument("--weights", choices=["fp32", "bf16", "int8", "int4", "int8-dynamic"], default=None,
                   help="weight layout for decoding (see decode_weights.py); default: fp32 models get the "
                        "faster transposed fp32 layout, others stay as loaded. A GGUF file's int8 / int4 "
                        "layers are built from its quantized blocks")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the one-token decode step (static KV cache); the first reply "
                        "waits for the compiler, later steps reuse its graph")
    p.add_argument("--compile-backend", default="inductor", metavar="NAME",
                   help="the torch.compile backend for --compile (default inductor)")
    p.add_argument("--truncate", action="store_true",
                   help="cut a too-long prompt from the left (default: error)")


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("generate", help="continue a prompt",
                              description="Print the continuation of PROMPT (the prompt itself is not printed).")
    _add_sampling_options(p)
    p.add_argument("prompt", help="the text to continue ('-' reads it from stdin)")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--raw", action="store_true",
                   help="give a fine-tuned model the prompt as it is (default: laid out in the prompt "
                        "format recorded in its directory, and stopped at its end of turn)")
    p.set_defaults(func=_generate_command)

    p = subparsers.add_parser("chat", help="talk to a model (reads stdin, streams replies)",
                              description="An interactive chat: each line you type is a user turn; the "
                                          "reply streams back. /reset clears the history, /exit quits.")
    _add_sampling_options(p)
    p.add_argument("--system", default=None, help="a system message to start the conversation")
    p.add_argument("--template", default=None,
                   help="chat template: llama3, chatml, plain (default: the tokenizer's own, else guessed)")
    p.set_defaults(func=_chat_command, max_new_tokens=256)


def _check_sampling(args) -> None:
    from ..sampling import NGramBlocker, SamplingOptions

    SamplingOptions(args.temperature, args.top_k, args.top_p, args.min_p, args.repetition_penalty)
    if args.no_repeat_ngram:
        NGramBlocker(args.no_repeat_ngram, 0)
    if args.seed is not None and not 0 <= args.seed < 2**64:  # what torch.Generator takes
        raise UsageError(f"--seed must be between 0 and 2**64 - 1, got {args.seed}")
    if args.max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")


def _options(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                no_repeat_ngram=args.no_repeat_ngram,
                use_cache=not args.no_cache, overflow="truncate" if args.truncate else "error",
                compile=args.compile_backend if args.compile else False)


def _load(args):
    import torch

    from ..decode_weights import prepare_for_decode
    from ..load import load_any

    dtype = getattr(torch, args.dtype) if args.dtype else None
    # A GGUF file's int8 / int4 layers are made from its blocks (no float copy of the model).
    model, tokenizer = load_any(args.model, dtype=dtype, weights=args.weights)
    if args.weights is None and model.tok_emb.weight.dtype == torch.float32:
        prepare_for_decode(model, "fp32")
    return model, tokenizer


def _generate_command(args) -> int:
    from pathlib import Path

    from ..chat import chat_stops, read_prompt_format, render_chat
    from ..generate import generate, stream

    options = _options(args)
    _check_sampling(args)  # fail fast, before the model loads
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt:
        raise UsageError("the prompt is empty")
    model, tokenizer = _load(args)
    if tokenizer is None:
        raise UsageError(f"{args.model} has no tokenizer, so a text prompt cannot be encoded")
    stop, stop_ids = list(args.stop or []), []
    recorded = None if args.raw or not Path(args.model).is_dir() else read_prompt_format(args.model)
    if recorded:  # an instruction-tuned model: ask in the layout it learned, stop where its answer ends
        prompt = render_chat([{"role": "user", "content": prompt}], recorded, tokenizer)
        strings, stop_ids = chat_stops(recorded, tokenizer)
        stop += strings
        options["stop_token_ids"] = stop_ids
    if args.stream:
        for delta in stream(model, tokenizer, prompt, stop=stop, **options):
            sys.stdout.write(delta.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
    else:
        print(generate(model, tokenizer, prompt, stop=stop, **options)[0].text)
    return 0


def _chat_command(args) -> int:
    from ..chat import chat_stops, render_chat, resolve_template
    from ..generate import stream

    options = _options(args)
    _check_sampling(args)  # fail fast, before the model loads
    model, tokenizer = _load(args)
    if tokenizer is None:
        raise UsageError(f"{args.model} has no tokenizer: chat needs one")
    template = resolve_template(args.template, tokenizer, model_dir=args.model)  # a fine-tuned model's own format first
    stop_strings, stop_ids = chat_stops(template, tokenizer)
    stop_strings += args.stop or []
    options["overflow"] = "truncate"  # a long conversation drops its oldest tokens
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True, file=sys.stderr)
        line = sys.stdin.readline()
        if not line:
            break
        line = line.rstrip("\n")
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            messages = list(start)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        prompt = render_chat(messages, template, tokenizer)
        reply: list[str] = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the left cut of a long history is expected here
            for delta in stream(model, tokenizer, prompt, stop=stop_strings, stop_token_ids=stop_ids, **options):
                text = delta.text if any(reply) else delta.text.lstrip()  # no leading blank
                reply.append(text)
                sys.stdout.write(text)
                sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        messages.append({"role": "assistant", "content": "".join(reply).strip()})
    return 0
