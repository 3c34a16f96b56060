"""Eager against torch.compile'd decode steps (compiled_decode.py), interleaved rounds.

    python benchmarks/compiled_decode.py                       # smollm2-135m shape, inductor
    python benchmarks/compiled_decode.py --preset gpt2 --weights int8 --device cuda

Random weights (the speed does not depend on them). Prints the one-off compile time (the
first generate call with compile on), then per round the decode tok/s of both, the medians
and their ratio, and whether the tokens agree. The first compiled call also pays for the
compilation; it is not counted in the rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from scratchlm import ModelConfig, Transformer
from scratchlm.decode_weights import WEIGHTS, prepare_for_decode
from scratchlm.generate import generate


def timed(model, prompt, new_tokens, compile):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    [c] = generate(model, None, prompt, max_new_tokens=new_tokens, ignore_eos=True, compile=compile)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, c.token_ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="smollm2-135m")
    ap.add_argument("--weights", choices=WEIGHTS, default="fp32")
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset(args.preset)).to(args.device).eval()
    if args.weights != "fp32" or args.device == "cpu":
        prepare_for_decode(model, args.weights)
    prompt = [torch.randint(0, model.config.vocab_size, (args.prompt_tokens,)).tolist()]

    seconds, _ = timed(model, prompt, args.new_tokens, args.backend)
    print(f"{args.preset} {args.weights} on {args.device}, {args.threads} threads: first compiled call "
          f"(compiles) {seconds:.1f} s")
    rates = {"eager": [], "compiled": []}
    for r in range(args.rounds):
        tokens = {}
        for name, compile in (("eager", False), ("compiled", args.backend)):  # interleaved
            seconds, tokens[name] = timed(model, prompt, args.new_tokens, compile)
            rates[name].append(args.new_tokens / seconds)
        print(f"round {r}: eager {rates['eager'][-1]:.1f} tok/s, compiled {rates['compiled'][-1]:.1f} tok/s, "
              f"same tokens: {tokens['eager'] == tokens['compiled']}")
    eager, compiled = statistics.median(rates["eager"]), statistics.median(rates["compiled"])
    print(f"median: eager {eager:.1f} tok/s, compiled {compiled:.1f} tok/s, ratio {compiled / eager:.2f}x "
          f"(prefill included in both)")


if __name__ == "__main__":
    main()
