"""Batch-1 decode speed of a small mixture of experts, against the dense model of its active
size and against transformers' Mixtral holding the same weights.

    moe     scratchlm, n_experts=8, experts_per_token=2, d_ff_expert=F (random weights, fp32)
    dense   scratchlm, the same model with one SwiGLU MLP of d_ff = 2 * F: the same active
            parameters per token (less the router's d_model * 8), a quarter of the experts'
            weights in memory
    hf      transformers MixtralForCausalLM with the MoE's weights, .generate(use_cache=True)

All greedy, interleaved round by round in one process so a busy machine slows them alike.
Goal: the MoE decodes at the cost of its active parameters, tok/s within 1.5x of dense.

    python benchmarks/moe.py                  # d_model 512, 8 layers, 2 threads, 5 rounds
    python benchmarks/moe.py --quick          # fewer tokens and rounds
    python benchmarks/moe.py --weights int8   # both scratchlm models in a decode layout

Measured on a shared 2-core machine (other jobs running; the defaults: 64 tokens, median of
5 interleaved rounds; tokens/s include a 16-token prefill, which reads every expert), with
the batch-1 path MoE.one_token:

    weights      moe    dense     hf   dense / moe   moe / hf
    (plain)     56.1     55.7   48.6      0.99x        1.15x   same tokens as hf
    fp32        62.5     67.0   46.7      1.07x        1.34x   same tokens as hf
    int8       119.5    140.3   49.5      1.17x        2.41x   (hf stays fp32)
    int4       145.1    187.9   47.0      1.30x        3.09x

Before it (the sort-count-scatter of experts_forward at every step) the same machine gave
dense / moe 1.20-1.37x in int8 (four runs) and 1.35-1.95x in int4 (three); timing one decode
step at a time, interleaved (median of 200), int8 went from 1.30x to 1.21x and int4 from
1.13x to 1.08x. On a loaded machine the figures move by 30% from run to run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: no spinning helpers

import torch  # noqa: E402


def build(args):
    from scratchlm import ModelConfig, Transformer

    shape = dict(vocab_size=args.vocab, context_length=512, d_model=args.d_model, n_layers=args.layers,
                 n_heads=args.d_model // 64, n_kv_heads=max(1, args.d_model // 256), norm="rmsnorm", mlp="swiglu",
                 positions="rope", bias=False, tie_embeddings=False, dtype="float32")
    torch.manual_seed(0)
    moe = Transformer(ModelConfig(**shape, d_ff=args.d_ff_expert, n_experts=8, experts_per_token=2)).eval()
    dense = Transformer(ModelConfig(**shape, d_ff=2 * args.d_ff_expert)).eval()
    return moe, dense


def hf_mixtral(moe):
    """transformers' MixtralForCausalLM holding the MoE's weights (exported and read back)."""
    import tempfile

    import transformers

    from scratchlm.hf import save_hf

    with tempfile.TemporaryDirectory() as tmp:
        save_hf(f"{tmp}/mixtral", moe)
        return transformers.AutoModelForCausalLM.from_pretrained(f"{tmp}/mixtral").eval()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--d-ff-expert", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="16 tokens, 2 rounds")
    p.add_argument("--no-hf", action="store_true", help="skip transformers")
    p.add_argument("--weights", choices=("fp32", "int8", "int4"), help="decode layout for moe and dense "
                   "(decode_weights.prepare_for_decode; the hf peer keeps plain fp32)")
    args = p.parse_args()
    if args.quick:
        args.tokens, args.rounds = 16, 2
    torch.set_num_threads(args.threads)

    from scratchlm.generate import generate

    moe, dense = build(args)
    peers = {}
    print(f"moe: {moe.num_parameters() / 1e6:.1f}M parameters, {moe.num_active_parameters() / 1e6:.1f}M active; "
          f"dense: {dense.num_parameters() / 1e6:.1f}M")
    prompt = torch.randint(0, args.vocab, (1, 16))

    def ours(model):
        def run():
            [c] = generate(model, None, prompt.tolist(), max_new_tokens=args.tokens, ignore_eos=True)
            return c.token_ids
        return run

    if not args.no_hf:
        try:
            hf = hf_mixtral(moe)

            def hf_run():
                out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, use_cache=True,
                                  max_new_tokens=args.tokens, min_new_tokens=args.tokens, pad_token_id=0)
                return out[0, prompt.shape[1]:].tolist()
            peers["hf"] = hf_run
        except ImportError:
            print("transformers is not installed: no hf peer")
    if args.weights:  # after the hf peer has copied the plain weights
        from scratchlm.decode_weights import prepare_for_decode

        moe, dense = prepare_for_decode(moe, args.weights), prepare_for_decode(dense, args.weights)
    peers = {"moe": ours(moe), "dense": ours(dense), **peers}
    times = {name: [] for name in peers}
    outputs = {}
    with torch.inference_mode():
        for fn in peers.values():  # warm up
            fn()
        for _ in range(args.rounds):
            for name, fn in peers.items():
                start = time.perf_counter()
                outputs[name] = fn()
                times[name].append(time.perf_counter() - start)
    tps = {name: args.tokens / statistics.median(t) for name, t in times.items()}
    for name, v in tps.items():
        print(f"{name:6s} {v:8.1f} tok/s")
    print(f"dense / moe: {tps['dense'] / tps['moe']:.2f}x (goal <= 1.5x)")
    if "hf" in tps:
        print(f"moe / hf:    {tps['moe'] / tps['hf']:.2f}x; same tokens as hf: {outputs['moe'] == outputs['hf']}")


if __name__ == "__main__":
    main()
