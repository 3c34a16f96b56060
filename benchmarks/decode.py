"""Decode speed on GPT-2 124M (random weights): scratchlm against its peers, side by side.

Peers, all greedy, all holding the same weights, run interleaved round by round in one
process so that a busy machine slows them alike:

    hf          transformers GPT2LMHeadModel.generate(use_cache=True), fp32
    lfs         llms_from_scratch.kv_cache.gpt2 (the book's KV-cache GPT), fp32, its own greedy loop
    ours        scratchlm.generate on the model as trained (nn.Linear, fp32), then after
                decode_weights.prepare_for_decode: fp32 transposed, bf16, int8 weight-only

Tokens/s counts the new tokens over the whole call (a 32-token prefill included). The
memory-bandwidth limit is what a perfect decoder would reach: read bandwidth (measured
here, summing a 1 GiB tensor) / bytes of weights read per token (every matrix once; the
embedding lookups read one row, and a tied output head is the embedding matrix).

    python benchmarks/decode.py                      # 2 threads, 32 new tokens, 5 rounds
    python benchmarks/decode.py --quick              # fewer tokens and rounds

Needs the bench extra (pip install -e '.[bench]') and pip install --no-deps llms-from-scratch.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes/s that summing a large fp32 tensor reaches (the best of a few tries)."""
    x = torch.ones(int(gib * 2**30) // 4)
    x.sum()
    best = min(_timed(x.sum)[0] for _ in range(repeats))
    return x.numel() * 4 / best


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of parameters and buffers read to produce one token: everything but the
    embedding tables (one row is looked up) and non-persistent tables; shared tensors once."""
    seen, total = set(), 0
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            continue
        if hasattr(module, "packed"):  # DynamicInt8Linear: int8 matrix + fp32 scales and bias, packed
            total += module.in_features * module.out_features + 8 * module.out_features
        tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        for t in tensors:
            if t is None or t.data_ptr() in seen or t.dtype == torch.bool:
                continue
            if any(t is b for n, b in module.named_buffers(recurse=False) if n.startswith(("rope_", "pos_table"))):
                continue
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


# ---- peers: each takes prompt ids (B, T) and returns the new ids (B, N) -----------------
def hf_peer(hf_model, n_new):
    def run(ids):
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, use_cache=True,
                                max_new_tokens=n_new, min_new_tokens=n_new, pad_token_id=0)
        return out[:, ids.shape[1]:]
    return run


def lfs_peer(lfs_model, n_new):
    from llms_from_scratch.kv_cache.utils import KVCache as LfsCache

    @torch.inference_mode()
    def run(ids):
        lfs_model.current_pos = 0
        cache = LfsCache(n_layers=len(lfs_model.trf_blocks))
        logits = lfs_model(ids, use_cache=True, cache=cache)
        out = []
        for _ in range(n_new):
            nxt = logits[:, -1].argmax(dim=-1, keepdim=True)
            out.append(nxt)
            if len(out) == n_new:
                break
            logits = lfs_model(nxt, use_cache=True, cache=cache)
        return torch.cat(out, dim=1)
    return run


def ours_peer(model, n_new, **options):
    from scratchlm.generate import generate

    def run(ids):
        done = generate(model, None, ids.tolist(), max_new_tokens=n_new, **options)
        return torch.tensor([c.token_ids for c in done])
    return run


def _book_attention_with_mask_fix(self, x, use_cache=False, start_pos=0, cache=None):
    """The book's cached attention (separate q/k/v projections, the cache grown with
    torch.cat, explicit scores) with one fix: llms-from-scratch 1.0.19 slices the causal
    mask by columns, which fails as soon as a cached step feeds fewer tokens than it sees.
    Here the rows of the new queries are taken instead."""
    B, T, _ = x.shape
    split = lambda t: t.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # noqa: E731
    q, k, v = split(self.W_query(x)), split(self.W_key(x)), split(self.W_value(x))
    if use_cache:
        if cache is not None:
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
        new_cache = (k, v)
    else:
        new_cache = None
    S = k.shape[2]
    hidden = torch.ones(S, S, dtype=torch.bool, device=x.device).triu(1)[-T:, :]  # (T, S): future keys
    scores = (q @ k.transpose(2, 3)).masked_fill_(hidden, -torch.inf)
    weights = self.dropout(torch.softmax(scores / self.head_dim ** 0.5, dim=-1))
    y = (weights @ v).transpose(1, 2).contiguous().view(B, T, self.d_out)
    return self.out_proj(y), new_cache


def lfs_model_from(hf_model):
    """The book's GPTModel holding the Hugging Face GPT-2's weights."""
    from llms_from_scratch.kv_cache import gpt2 as book
    from llms_from_scratch.kv_cache.gpt2 import GPTModel

    book.MultiHeadAttention.forward = _book_attention_with_mask_fix

    c = hf_model.config
    cfg = {"vocab_size": c.vocab_size, "context_length": c.n_positions, "emb_dim": c.n_embd, "n_heads": c.n_head,
           "n_layers": c.n_layer, "drop_rate": 0.0, "qkv_bias": True}
    model = GPTModel(cfg).eval()
    s = hf_model.state_dict()
    with torch.no_grad():
        model.tok_emb.weight.copy_(s["transformer.wte.weight"])
        model.pos_emb.weight.copy_(s["transformer.wpe.weight"])
        model.out_head.weight.copy_(s["lm_head.weight"])
        model.final_norm.scale.copy_(s["transformer.ln_f.weight"])
        model.final_norm.shift.copy_(s["transformer.ln_f.bias"])
        for i, block in enumerate(model.trf_blocks):
            p = f"transformer.h.{i}."
            wq, wk, wv = s[p + "attn.c_attn.weight"].t().split(c.n_embd, dim=0)
            bq, bk, bv = s[p + "attn.c_attn.bias"].split(c.n_embd)
            for lin, w, b in ((block.att.W_query, wq, bq), (block.att.W_key, wk, bk), (block.att.W_value, wv, bv)):
                lin.weight.copy_(w)
                lin.bias.copy_(b)
            block.att.out_proj.weight.copy_(s[p + "attn.c_proj.weight"].t())
            block.att.out_proj.bias.copy_(s[p + "attn.c_proj.bias"])
            block.ff.layers[0].weight.copy_(s[p + "mlp.c_fc.weight"].t())
            block.ff.layers[0].bias.copy_(s[p + "mlp.c_fc.bias"])
            block.ff.layers[2].weight.copy_(s[p + "mlp.c_proj.weight"].t())
            block.ff.layers[2].bias.copy_(s[p + "mlp.c_proj.bias"])
            block.norm1.scale.copy_(s[p + "ln_1.weight"])
            block.norm1.shift.copy_(s[p + "ln_1.bias"])
            block.norm2.scale.copy_(s[p + "ln_2.weight"])
            block.norm2.shift.copy_(s[p + "ln_2.bias"])
    return model


def agreement(tokens: torch.Tensor, reference: torch.Tensor) -> str:
    if torch.equal(tokens, reference):
        return "same"
    row = tokens[0] != reference[0]
    return f"differs from token {int(row.nonzero()[0])}" if row.any() else "same (row 0)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8, help="batch size of the throughput run (0: skip)")
    ap.add_argument("--quick", action="store_true", help="32 new tokens, 2 rounds")
    args = ap.parse_args()
    if args.quick:
        args.new_tokens, args.rounds = 16, 3
    torch.set_num_threads(args.threads)

    import transformers

    from scratchlm.hf import from_hf_model
    from scratchlm.decode_weights import prepare_for_decode

    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()
    plain = from_hf_model(hf).eval()  # nn.Linear layout, as trained
    ours32 = prepare_for_decode(copy.deepcopy(plain), "fp32")
    ours16 = prepare_for_decode(copy.deepcopy(plain), "bf16")
    ours8 = prepare_for_decode(copy.deepcopy(plain), "int8")
    ours8d = prepare_for_decode(copy.deepcopy(plain), "int8-dynamic")
    models = {"hf fp32": hf, "ours fp32 (Linear)": plain, "ours fp32": ours32, "ours bf16": ours16,
              "ours int8": ours8, "ours int8-dynamic": ours8d}
    n = args.new_tokens
    peers = {"hf fp32": hf_peer(hf, n)}
    try:
        lfs = lfs_model_from(hf)
        models["lfs fp32"] = lfs
        peers["lfs fp32"] = lfs_peer(lfs, n)
    except ImportError:
        print("llms-from-scratch not installed: pip install --no-deps llms-from-scratch")
    peers |= {"ours fp32 (Linear)": ours_peer(plain, n), "ours fp32": ours_peer(ours32, n), "ours bf16": ours_peer(ours16, n), "ours int8": ours_peer(ours8, n),
              "ours int8-dynamic": ours_peer(ours8d, n)}

    bandwidth = read_bandwidth()
    print(f"GPT-2 124M, random weights, {args.threads} threads, prompt {args.prompt_tokens} tokens, "
          f"{n} new tokens, {args.rounds} interleaved rounds")
    print(f"read bandwidth: {bandwidth / 1e9:.1f} GB/s (sum of a 1 GiB tensor)")
    prompt = torch.randint(0, 50257, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(1))
    for name, run in peers.items():  # warm up
        run(prompt)

    times: dict[str, list[float]] = {name: [] for name in peers}
    tokens: dict[str, torch.Tensor] = {}
    for _ in range(args.rounds):
        for name, run in peers.items():
            t, out = _timed(run, prompt)
            times[name].append(t)
            tokens[name] = out
    # x hf: the median over rounds of (hf time / peer time) within the same round, which a
    # machine whose load drifts from round to round disturbs least.
    print(f"\nbatch 1             tok/s best / median   x hf (median of rounds)   bytes/token   limit tok/s"
          f"   best of limit   greedy vs hf fp32")
    for name in peers:
        best, median = min(times[name]), statistics.median(times[name])
        ratio = statistics.median(h / t for h, t in zip(times["hf fp32"], times[name]))
        per_token = weight_bytes_per_token(models[name])
        limit = bandwidth / per_token
        print(f"{name:18s} {n / best:10.1f} / {n / median:6.1f}   {ratio:10.2f}               {per_token / 1e6:8.0f} MB"
              f"   {limit:10.1f}   {n / best / limit:10.0%}      {agreement(tokens[name], tokens['hf fp32'])}")

    if args.batch:
        batch = torch.randint(0, 50257, (args.batch, args.prompt_tokens), generator=torch.Generator().manual_seed(2))
        btimes: dict[str, list[float]] = {name: [] for name in peers}
        for _ in range(max(2, args.rounds // 2)):
            for name, run in peers.items():
                btimes[name].append(_timed(run, batch)[0])
        print(f"\nbatch {args.batch}            tokens/s best (all rows)   x hf (median of rounds)")
        for name in peers:
            ratio = statistics.median(h / t for h, t in zip(btimes["hf fp32"], btimes[name]))
            print(f"{name:18s} {args.batch * n / min(btimes[name]):14.1f}          {ratio:10.2f}")


if __name__ == "__main__":
    main()
