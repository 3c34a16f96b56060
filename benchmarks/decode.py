"""Decode speed of scratchlm against its peers, side by side, on random weights.

Models: ``--model smollm2-135m`` (the Llama architecture with GQA: 30 layers, 9 query heads
sharing 3 key/value heads, tied head, vocabulary 49,152; the default) or ``--model gpt2``
(GPT-2 124M). Peers, all greedy, all holding the same weights, run interleaved round by
round in one process so that a busy machine slows them alike:

    hf          transformers .generate(use_cache=True), fp32
    lfs         llms_from_scratch.kv_cache.gpt2 (the book's KV-cache GPT, GPT-2 only)
    llama.cpp   llama-cpp-python on the same weights written as GGUF F16, Q8_0 and Q4_0 with
                the gguf package's writer (smollm2 shape only; skipped if not installed)
    ours        scratchlm.generate on the model as trained (nn.Linear, fp32), then after
                decode_weights.prepare_for_decode: fp32 transposed, bf16, int8, int4, each
                with the small ops fused (decode_block.py), and fp32 without them. The fp32
                and bf16 heads find the greedy token from an int8 copy of themselves
                (decode_weights.HeadScreen, the same tokens); "whole head" rows read the
                head itself each step, as sampling does, and their "x ours fp32" is against
                "ours fp32 whole head"

Tokens/s counts the new tokens over the whole call (a 32-token prefill included). Prefill
tokens/s is a 512-token prompt read once (the time to the first token). The memory-bandwidth
limit is what a perfect decoder would reach: read bandwidth (measured here, summing a 1 GiB
tensor) / bytes of weights read per token (every matrix once; the embedding lookups read one
row, and a tied output head is the embedding matrix).

    python benchmarks/decode.py                      # smollm2-135m, 2 threads, 5 rounds
    python benchmarks/decode.py --model gpt2
    python benchmarks/decode.py --quick              # fewer tokens and rounds
    python benchmarks/decode.py --compile fp32 bf16  # also the torch.compile'd decode step
    python benchmarks/decode.py --attention          # only the per-call attention timings
    python benchmarks/decode.py --attention --cached 85 512 2048
    python benchmarks/decode.py --profile            # only a profile of one decode step

Needs the bench extra (pip install -e '.[bench]'), pip install --no-deps llms-from-scratch,
and for the llama.cpp peer gguf and llama-cpp-python (``make bench-setup``).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch


class ReadBandwidth:
    """Bytes/s that summing a large fp32 tensor reaches, the best of every try. The benchmark
    tries once a round, beside the decoders, so that a moment of load on this shared machine
    when it starts does not set the limit (one such start measured 12.8 GB/s, the rounds 20+)."""

    def __init__(self, gib: float = 1.0, repeats: int = 3):
        self.x = torch.ones(int(gib * 2**30) // 4)
        self.x.sum()  # fault the pages in
        self.best = min(_timed(self.x.sum)[0] for _ in range(repeats))

    def measure(self) -> None:
        self.best = min(self.best, _timed(self.x.sum)[0])

    @property
    def bytes_per_s(self) -> float:
        return self.x.numel() * 4 / self.best


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of parameters and buffers read to produce one token: everything but the
    embedding tables (one row is looked up) and non-persistent tables; shared tensors once."""
    seen, total = set(), 0
    head = getattr(model, "lm_head", None)
    if getattr(head, "screen", None) is not None:  # greedy reads the head's int8 copy, not the head
        seen |= {t.data_ptr() for t in head.buffers(recurse=False) if t is not None}
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


def hf_model_for(name: str):
    """A randomly initialised transformers model of the named shape (seed 0)."""
    import transformers

    from scratchlm.config import ModelConfig

    torch.manual_seed(0)
    if name == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()
    c = ModelConfig.preset(name)
    config = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, max_position_embeddings=c.context_length,
        rope_theta=c.rope_theta, rms_norm_eps=c.norm_eps, tie_word_embeddings=c.tie_embeddings)
    return transformers.LlamaForCausalLM(config).eval()


# ---- llama.cpp on the same weights ---------------------------------------------------------
def write_gguf(model, path: str, qtype: str) -> int:
    """Write scratchlm Llama ``model`` (nn.Linear layout) as a GGUF file for llama.cpp with
    every matrix in ``qtype`` (F16, Q8_0 or Q4_0) and the norms in F32; returns the bytes of
    the tensors read per token. The vocabulary is placeholder pieces (random weights)."""
    import gguf
    import numpy as np

    c = model.config
    kind = gguf.GGMLQuantizationType[qtype]
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(c.context_length)
    w.add_embedding_length(c.d_model)
    w.add_block_count(c.n_layers)
    w.add_feed_forward_length(c.d_ff)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"<t{i}>".encode() for i in range(c.vocab_size)])
    w.add_token_scores([0.0] * c.vocab_size)
    w.add_token_types([1] * c.vocab_size)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    per_token = 0

    def matrix(name, t):
        nonlocal per_token
        a = t.detach().float().numpy()
        if kind == gguf.GGMLQuantizationType.F16:
            data = a.astype(np.float16)
            w.add_tensor(name, data)
        else:
            data = gguf.quants.quantize(a, kind)
            w.add_tensor(name, data, raw_dtype=kind)
        if name != "token_embd.weight" or c.tie_embeddings:  # the head reads the whole table
            per_token += data.nbytes

    def vector(name, t):
        w.add_tensor(name, t.detach().float().numpy())

    matrix("token_embd.weight", model.tok_emb.weight)
    for i, b in enumerate(model.blocks):
        q, k, v = b.attn.qkv_proj.weight.split([c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim,
                                                c.n_kv_heads * c.head_dim])
        vector(f"blk.{i}.attn_norm.weight", b.attn_norm.weight)
        matrix(f"blk.{i}.attn_q.weight", q)
        matrix(f"blk.{i}.attn_k.weight", k)
        matrix(f"blk.{i}.attn_v.weight", v)
        matrix(f"blk.{i}.attn_output.weight", b.attn.out_proj.weight)
        vector(f"blk.{i}.ffn_norm.weight", b.mlp_norm.weight)
        matrix(f"blk.{i}.ffn_gate.weight", b.mlp.gate_proj.weight)
        matrix(f"blk.{i}.ffn_up.weight", b.mlp.up_proj.weight)
        matrix(f"blk.{i}.ffn_down.weight", b.mlp.down_proj.weight)
    vector("output_norm.weight", model.final_norm.weight)
    if not c.tie_embeddings:
        matrix("output.weight", model.lm_head.weight)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return per_token


def llama_cpp_runs(path: str, threads: int) -> bool:
    """Whether this llama-cpp-python build can read and run ``path``: tried in a child
    process, since a wheel built for other CPU features dies of SIGILL (seen here on the
    Q8_0 and Q4_0 kernels of a prebuilt wheel), which would end the whole benchmark."""
    import subprocess
    import sys

    code = ("from llama_cpp import Llama; m = Llama(model_path=%r, n_ctx=64, n_threads=%d, verbose=False); "
            "m.eval([1, 2, 3]); print('ok')" % (path, threads))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    return "ok" in done.stdout


def llama_cpp_peer(path: str, n_new: int, threads: int, n_ctx: int):
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=512,
                verbose=False)

    def run(ids):
        if ids.shape[0] != 1:
            raise ValueError("batch 1 only")
        llm.reset()
        out = []
        for token in llm.generate(ids[0].tolist(), temp=0.0, top_k=1, reset=True):
            out.append(token)
            if len(out) == n_new:
                break
        return torch.tensor([out])
    return run


def agreement(tokens: torch.Tensor, reference: torch.Tensor, hf_model=None, prompt=None) -> str:
    """"same", or where row 0 first differs from the reference (hf fp32's greedy tokens) and by
    how much hf's own fp32 logits there prefer its token over ours: a gap of a few thousandths
    is a near tie that any change of rounding (bf16 sums, quantized weights) may flip."""
    if torch.equal(tokens, reference):
        return "same"
    row = tokens[0] != reference[0]
    if not row.any():
        return "same (row 0)"
    i = int(row.nonzero()[0])
    if hf_model is None:
        return f"differs from token {i}"
    with torch.inference_mode():
        logits = hf_model(torch.cat([prompt[0], reference[0, :i]])[None]).logits[0, -1].float()
    gap = float(logits[reference[0, i]] - logits[tokens[0, i]])
    return f"differs from token {i} (hf logit gap {gap:.4f}, logits' std {float(logits.std()):.2f})"


def attention_per_call(config, cached: int = 85, repeats: int = 20) -> None:
    """Per-call time of the decode attention (one query token, ``cached`` keys) in the
    layouts and kernel choices that were considered, best of interleaved rounds. Each call reads
    one of n_layers caches in turn, as a decode step does (a layer's cache, then the weights
    until the next layer's), so that a long cache comes from memory, not from a warm L2."""
    import torch.nn.functional as F

    from scratchlm import cpu_gemv

    ops = cpu_gemv.kernels()
    H, Hkv, D, L = config.n_heads, config.n_kv_heads, config.head_dim, config.n_layers
    print(f"attention per call: {H} query heads, {Hkv} kv heads, head_dim {D}, {cached} cached positions, "
          f"{L} layers' caches in turn")
    for dtype in (torch.float32, torch.bfloat16):
        for B in (1, 8):
            q = torch.randn(B, 1, H, D, dtype=dtype).transpose(1, 2)  # (B, H, 1, D) as the model makes it
            qkv = torch.randn(B, (H + 2 * Hkv) * D, dtype=dtype)  # what attend_one takes
            bufs = [(torch.randn(B, Hkv, cached + 1, D, dtype=dtype), torch.randn(B, Hkv, cached + 1, D, dtype=dtype))
                    for _ in range(L)]
            views = [(k[:, :, :cached], v[:, :, :cached]) for k, v in bufs]  # the cache's views
            packed = [(k.contiguous(), v.contiguous()) for k, v in views]
            grouped = q.reshape(B, Hkv, H // Hkv, D)
            calls = {"enable_gqa on the cache views": lambda: [F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
                                                               for k, v in views],
                     "enable_gqa on contiguous keys": lambda: [F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
                                                               for k, v in packed],
                     "repeat_interleave to MHA": lambda: [F.scaled_dot_product_attention(
                         q, k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)) for k, v in views],
                     "group folded into queries": lambda: [F.scaled_dot_product_attention(grouped, k, v)
                                                           for k, v in views]}
            if ops is not None:  # the fused decode path's (rotary off): the new key written, then read
                calls["attend_one (ours, fused)"] = lambda: [ops.attend_one(qkv, None, None, k, v, cached, cached + 1,
                                                                            None, H, Hkv, 0.0, 0, 0, None, None, 1e-5)
                                                             for k, v in bufs]
            best = {name: float("inf") for name in calls}
            with torch.inference_mode():
                for _ in range(5):
                    for name, fn in calls.items():
                        best[name] = min(best[name], _timed(lambda: [fn() for _ in range(repeats)])[0] / (repeats * L))
            print(f"  {str(dtype)[6:]:8s} batch {B}: " + ", ".join(f"{n} {t * 1e6:.0f} us" for n, t in best.items()))


def profile_step(model, steps: int = 10, cached: int = 85) -> None:
    """torch.profiler table of ``steps`` decode steps at ``cached`` positions."""
    from torch.profiler import ProfilerActivity, profile

    cache = model.new_cache(1, cached + 1)
    with torch.inference_mode():
        model(torch.randint(0, model.config.vocab_size, (1, cached)), cache=cache)
        ids = torch.tensor([[5]])

        def step():
            cache.length = cached
            return model.lm_head(model(ids, cache=cache, return_hidden=True)[:, -1])
        for _ in range(3):
            step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["smollm2-135m", "gpt2"], default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--prefill-tokens", type=int, default=512, help="prompt of the prefill run (0: skip)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8, help="batch size of the throughput run (0: skip)")
    ap.add_argument("--draft-k", type=int, default=4, help="draft tokens per round of speculative decoding (0: skip)")
    ap.add_argument("--no-llama-cpp", action="store_true", help="skip the llama.cpp peers")
    ap.add_argument("--compile", nargs="*", default=[], metavar="LAYOUT",
                    help="also time these layouts through the torch.compile'd decode step (e.g. fp32 bf16); "
                         "the compilation happens in the warm-up and is not timed")
    ap.add_argument("--quick", action="store_true", help="16 new tokens, 3 rounds")
    ap.add_argument("--attention", action="store_true", help="only time the decode attention per call")
    ap.add_argument("--cached", type=int, nargs="+", default=[85],
                    help="with --attention: the cache lengths to time it at (e.g. 85 512 2048)")
    ap.add_argument("--profile", action="store_true", help="only profile decode steps (fp32 and bf16)")
    args = ap.parse_args()
    if args.quick:
        args.new_tokens, args.rounds = 16, 3
    torch.set_num_threads(args.threads)

    from scratchlm.decode_weights import prepare_for_decode
    from scratchlm.hf import from_hf_model

    hf = hf_model_for(args.model)
    plain = from_hf_model(hf).eval()  # nn.Linear layout, as trained
    if args.attention:
        for cached in args.cached:
            attention_per_call(plain.config, cached)
        return
    if args.profile:
        for layout in ("fp32", "bf16"):
            print(f"--- {layout}")
            profile_step(prepare_for_decode(copy.deepcopy(plain), layout))
        return
    models = {"hf fp32": hf, "ours fp32 (Linear)": plain,
              # model.py's Block for the one-token steps too: what the fused small ops gain
              "ours fp32 unfused": prepare_for_decode(copy.deepcopy(plain), "fp32", fused=False)}
    for layout in ("fp32", "bf16", "int8", "int4"):
        models[f"ours {layout}"] = prepare_for_decode(copy.deepcopy(plain), layout, fused=True)
    for layout in ("fp32", "bf16"):  # the head read whole, as sampling does (no HeadScreen)
        models[f"ours {layout} whole head"] = prepare_for_decode(copy.deepcopy(plain), layout, screen_head=False)
    n = args.new_tokens
    peers = {"hf fp32": hf_peer(hf, n)}
    if args.model == "gpt2":
        try:
            lfs = lfs_model_from(hf)
            models["lfs fp32"] = lfs
            peers["lfs fp32"] = lfs_peer(lfs, n)
        except ImportError:
            print("llms-from-scratch not installed: pip install --no-deps llms-from-scratch")
    peers |= {name: ours_peer(m, n) for name, m in models.items() if name.startswith("ours")}
    for layout in args.compile:  # the same weights as "ours LAYOUT", through the compiled step
        models[f"ours {layout} compiled"] = models[f"ours {layout}"]
        peers[f"ours {layout} compiled"] = ours_peer(models[f"ours {layout}"], n, compile=True)
    gguf_bytes: dict[str, int] = {}
    if args.model != "gpt2" and not args.no_llama_cpp:
        try:
            import tempfile

            import llama_cpp  # noqa: F401

            folder = tempfile.mkdtemp(prefix="decode-bench-")
            for qtype in ("F16", "Q8_0", "Q4_0"):
                path = f"{folder}/{args.model}-{qtype}.gguf"
                per_token = write_gguf(plain, path, qtype)
                if not llama_cpp_runs(path, args.threads):
                    print(f"llama.cpp {qtype} skipped: this llama-cpp-python build crashes on it "
                          f"(rebuild: CMAKE_ARGS='-DGGML_NATIVE=ON' pip install --no-binary :all: llama-cpp-python)")
                    continue
                gguf_bytes[f"llama.cpp {qtype}"] = per_token
                peers[f"llama.cpp {qtype}"] = llama_cpp_peer(path, n, args.threads,
                                                             max(args.prefill_tokens, args.prompt_tokens) + n + 8)
        except ImportError:
            print("llama.cpp peers skipped: pip install gguf llama-cpp-python")

    read = ReadBandwidth()
    print(f"{args.model}, random weights, {args.threads} threads, prompt {args.prompt_tokens} tokens, "
          f"{n} new tokens, {args.rounds} interleaved rounds")
    vocab = plain.config.vocab_size
    prompt = torch.randint(0, vocab, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(1))
    for name, run in peers.items():  # warm up
        run(prompt)

    times: dict[str, list[float]] = {name: [] for name in peers}
    tokens: dict[str, torch.Tensor] = {}
    for _ in range(args.rounds):
        for name, run in peers.items():
            t, out = _timed(run, prompt)
            times[name].append(t)
            tokens[name] = out
        read.measure()
    bandwidth = read.bytes_per_s
    print(f"read bandwidth: {bandwidth / 1e9:.1f} GB/s (sum of a 1 GiB tensor, best of {args.rounds + 3} tries "
          "beside the rounds)")
    # x hf: the median over rounds of (hf time / peer time) within the same round, which a
    # machine whose load drifts from round to round disturbs least. x llama.cpp: against the
    # llama.cpp file of the same bits per weight (fp32 and bf16 against F16). x ours fp32: the
    # same median against our fp32 layout (the bf16 goal).
    same_bits = {"ours fp32": "llama.cpp F16", "ours bf16": "llama.cpp F16", "ours int8": "llama.cpp Q8_0",
                 "ours int4": "llama.cpp Q4_0"}
    same_bits |= {f"{name} compiled": peer for name, peer in same_bits.items()}
    print("\nbatch 1                 tok/s best / median   x hf    x llama.cpp   x ours fp32   bytes/token"
          "   limit tok/s   best of limit   greedy vs hf fp32")
    for name in peers:
        best, median = min(times[name]), statistics.median(times[name])
        ratio = statistics.median(h / t for h, t in zip(times["hf fp32"], times[name]))
        peer = same_bits.get(name)
        x_cpp = (f"{statistics.median(c / t for c, t in zip(times[peer], times[name])):8.2f}"
                 if peer in times else "       -")
        ours_fp32 = "ours fp32 whole head" if name.endswith("whole head") else "ours fp32"  # like for like
        x_fp32 = statistics.median(f / t for f, t in zip(times[ours_fp32], times[name]))
        per_token = gguf_bytes[name] if name in gguf_bytes else weight_bytes_per_token(models[name])
        limit = bandwidth / per_token
        same = (agreement(tokens[name], tokens["hf fp32"], hf, prompt) if not name.startswith("llama.cpp")
                else "(own vocab)")
        print(f"{name:22s} {n / best:10.1f} / {n / median:6.1f}   {ratio:5.2f}   {x_cpp}      {x_fp32:8.2f}"
              f"      {per_token / 1e6:8.0f} MB"
              f"   {limit:10.1f}   {n / best / limit:10.0%}      {same}")

    if args.prefill_tokens:
        long = torch.randint(0, vocab, (1, args.prefill_tokens), generator=torch.Generator().manual_seed(3))
        first = {name: (hf_peer(hf, 1) if name == "hf fp32" else
                        llama_cpp_peer_first(peers, name) if name.startswith("llama.cpp") else
                        ours_peer(models[name], 1) if name.startswith("ours") and not name.endswith("compiled")
                        else None) for name in peers}  # (compiling changes only the one-token steps)
        first = {k: v for k, v in first.items() if v is not None}
        ptimes: dict[str, list[float]] = {name: [] for name in first}
        for _ in range(max(2, args.rounds // 2)):
            for name, run in first.items():
                ptimes[name].append(_timed(run, long)[0])
        print(f"\nprefill of {args.prefill_tokens} tokens       prompt tokens/s best   x hf (median of rounds)")
        for name in first:
            ratio = statistics.median(h / t for h, t in zip(ptimes["hf fp32"], ptimes[name]))
            print(f"{name:22s} {args.prefill_tokens / min(ptimes[name]):14.1f}          {ratio:10.2f}")

    if args.batch:
        batch = torch.randint(0, vocab, (args.batch, args.prompt_tokens), generator=torch.Generator().manual_seed(2))
        batched = {name: run for name, run in peers.items()  # (a compiled step is shaped for batch 1)
                   if not name.startswith("llama.cpp") and not name.endswith("compiled")}
        btimes: dict[str, list[float]] = {name: [] for name in batched}
        for _ in range(max(2, args.rounds // 2)):
            for name, run in batched.items():
                btimes[name].append(_timed(run, batch)[0])
        print(f"\nbatch {args.batch:<3d}                tokens/s best (all rows)   x hf (median of rounds)")
        for name in batched:
            ratio = statistics.median(h / t for h, t in zip(btimes["hf fp32"], btimes[name]))
            print(f"{name:22s} {args.batch * n / min(btimes[name]):14.1f}          {ratio:10.2f}")

    if args.draft_k:
        speculative_run(models, prompt[0].tolist(), n, args.draft_k, args.rounds)


def llama_cpp_peer_first(peers, name):
    """The llama.cpp peer's first token only: its prefill. (Peers are closures over n_new.)"""
    run = peers[name]
    llm = next(c.cell_contents for c in run.__closure__ if type(c.cell_contents).__name__ == "Llama")

    def first(ids):
        llm.reset()
        llm.eval(ids[0].tolist())
    return first


def speculative_run(models, prompt: list[int], n: int, k: int, rounds: int) -> None:
    """Target: ours fp32; draft: the same weights in int4 (it shares the tokenizer by
    construction). The accepted-token rate, and the speed-up over the target alone."""
    from scratchlm.generate import generate
    from scratchlm.speculative import speculative_generate

    target, draft = models["ours fp32"], models["ours int4"]
    alone = lambda: generate(target, None, [prompt], max_new_tokens=n)  # noqa: E731
    spec = lambda: speculative_generate(target, draft, prompt, max_new_tokens=n, k=k)  # noqa: E731
    alone(), spec()
    ta, ts = [], []
    for _ in range(rounds):
        ta.append(_timed(alone)[0])
        t, result = _timed(spec)
        ts.append(t)
    same = result.token_ids == alone()[0].token_ids
    print(f"\nspeculative (target ours fp32, draft ours int4, k={k}): accepted {result.acceptance_rate:.0%} of "
          f"proposals, {result.tokens_per_round:.2f} tokens per target pass, "
          f"x target alone {statistics.median(a / s for a, s in zip(ta, ts)):.2f} (median of rounds), "
          f"tokens identical: {same}")


if __name__ == "__main__":
    main()
