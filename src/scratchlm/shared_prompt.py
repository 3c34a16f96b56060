"""Rows that share a prompt: the prompt runs through the model once, not once per row.

Post-training batches repeat their prompts: a DPO pair is one prompt with two responses,
a GRPO group one prompt with G completions. Under causal attention a prompt's keys and
values do not depend on what follows it, so they can be computed once per distinct prompt
and serve every row that continues it. Two layouts do it, and continuation_hidden takes
the one with fewer multiply-adds (_layout_cost):

    packed: one row per distinct prompt, the prompt then each continuation, (P, W):
            one forward, an attention mask letting each continuation see its prompt and
            itself only, positions counting on from the prompt for each continuation.
            No padding inside a group; the attention is a full W x W square per row.
            Best for few continuations per prompt (a DPO pair: one forward of B rows).
    cached: the distinct prompts (P, Wp), left-padded, in one forward whose keys and values
            stay in a KV cache (with gradients), copied to their N owners (index_select:
            the gradient flows back); the continuations (N, Lc), right-padded, in one forward
            on top of it. Best for many long continuations per prompt (a GRPO group).

The logits equal the plain forward's over the full rows (to float32 rounding: the tests
compare them), at the positions that predict continuation tokens; only those positions
reach the output head. A pair of 25-token responses after a 25-token prompt: 75 positions
packed instead of 100 in the plain forward's two rows; a group of 8 completions of 16 tokens
after a prompt of 30, cached: 2.3x fewer positions.

>>> import torch
>>> from scratchlm import ModelConfig, Transformer
>>> torch.manual_seed(0)
<torch._C.Generator object at ...>
>>> model = Transformer(ModelConfig.preset("llama-tiny", vocab_size=50)).eval()
>>> ids = torch.tensor([[1, 2, 3, 4, 5], [1, 2, 3, 6, 0], [7, 8, 9, 9, 9]])   # rows 0 and 1 share 1 2 3
>>> starts, ends = [3, 3, 2], [5, 4, 5]
>>> with torch.no_grad():
...     full, shared = model(ids)[:, :-1], continuation_logits(model, ids, starts, ends)
>>> shared.shape                                  # (N, L - 1, V): the plain forward's layout
torch.Size([3, 4, 50])
>>> all(torch.allclose(full[i, s - 1:e - 1], shared[i, s - 1:e - 1], atol=1e-5) for i, (s, e) in enumerate(zip(starts, ends)))
True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .kv_cache import KVCache
from .model import Transformer
from .unpadding import select_rows


def can_share(model, ids: torch.Tensor, starts: Sequence[int], ends: Sequence[int]) -> bool:
    """Whether the shared-prompt forward applies: a plain Transformer (not a DDP or compiled
    wrapper, which expect one forward per step) and every position within the context."""
    if not isinstance(model, Transformer):
        return False
    return max(ends) <= model.config.context_length


def continuation_hidden(model: Transformer, ids: torch.Tensor, starts: Sequence[int], ends: Sequence[int]
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden (n, d_model), index (n,)): the final normed hidden states at the n columns that
    predict a continuation token, starts[i] - 1 .. ends[i] - 2 of each row i in turn, and the
    flat index of each in the plain forward's (N, L - 1) layout (row i, column t: i * (L - 1)
    + t), over right-padded rows ``ids`` (N, L). Row i's prompt is ids[i, :starts[i]] (at
    least one token), its continuation ids[i, starts[i]:ends[i]]; rows with the same prompt
    share its forward, laid out the cheaper way (_layout_cost): packed or through a cache."""
    rows = ids.tolist()
    index: dict[tuple[int, ...], int] = {}  # the distinct prompts, in order of first appearance
    owner = [index.setdefault(tuple(r[:s]), len(index)) for r, s in zip(rows, starts)]
    prompts = list(index)
    L = ids.shape[1]
    flat = torch.tensor([t for i, (s, e) in enumerate(zip(starts, ends)) for t in range(i * (L - 1) + s - 1,
                                                                                        i * (L - 1) + e - 1)],
                        dtype=torch.long)
    packed = _packed_width(prompts, owner, starts, ends)
    # The cache holds the longest prompt and the longest continuation side by side: within the context.
    fits = max(len(p) for p in prompts) + max(max(e - s for s, e in zip(starts, ends)), 1) <= model.config.context_length
    if not fits or _layout_cost(model, prompts, starts, ends, packed, packed=True) <= _layout_cost(
            model, prompts, starts, ends, packed, packed=False):
        hidden = _packed_hidden(model, rows, prompts, owner, starts, ends, packed)
    else:
        hidden = _cached_hidden(model, rows, prompts, owner, starts, ends)
    return hidden, flat.to(ids.device)


def continuation_logits(model: Transformer, ids: torch.Tensor, starts: Sequence[int], ends: Sequence[int]
                        ) -> torch.Tensor:
    """Logits (N, L - 1, V) of ``model`` over right-padded rows ``ids`` (N, L), in the plain
    forward's layout (column t predicts ids[:, t + 1]), computed at the columns that predict
    a continuation token (continuation_hidden), 0 elsewhere."""
    hidden, flat = continuation_hidden(model, ids, starts, ends)
    logits = model.lm_head(hidden)  # (n, V)
    N, L = ids.shape
    return logits.new_zeros(N * (L - 1), logits.shape[-1]).index_copy(0, flat, logits).view(N, L - 1, -1)


def continuation_logprobs(model: Transformer, ids: torch.Tensor, starts: Sequence[int], ends: Sequence[int],
                          temperature: float = 1.0) -> torch.Tensor:
    """log p(ids[:, t + 1]) (N, L - 1) under softmax(logits / temperature), at the columns
    continuation_hidden computes (0 elsewhere): from the continuation's columns only, never
    a (N, L, V) tensor."""
    hidden, flat = continuation_hidden(model, ids, starts, ends)
    logits = model.lm_head(hidden).float() / temperature  # (n, V)
    targets = ids[:, 1:].flatten()[flat]
    logps = logits.gather(-1, targets[:, None])[:, 0] - logits.logsumexp(-1)  # (n,)
    N, L = ids.shape
    return logps.new_zeros(N * (L - 1)).index_copy(0, flat, logps).view(N, L - 1)


# ----------------------------------------------------------------------------------------
# The two layouts
# ----------------------------------------------------------------------------------------
def _packed_width(prompts, owner, starts, ends) -> int:
    """The longest packed row: a prompt followed by every continuation of it."""
    widths = [len(p) for p in prompts]
    for k, s, e in zip(owner, starts, ends):
        widths[k] += e - s
    return max(widths)


def _layout_cost(model, prompts, starts, ends, packed_width: int, packed: bool) -> float:
    """Multiply-adds of a forward in one layout, roughly: every position through the
    matrices (12 d^2 per layer, what a dense block has) and every query against the keys it
    computes with. Packed, the attention kernel computes a whole P x W x W masked square;
    through the cache a prompt attends causally and a continuation to its prompt and itself."""
    d = model.config.d_model
    P, Wp = len(prompts), max(len(p) for p in prompts)
    Lc = max(max(e - s for s, e in zip(starts, ends)), 1)
    if packed:  # the padding runs through the attention only (_packed_hidden)
        positions, pairs = sum(len(p) for p in prompts) + sum(e - s for s, e in zip(starts, ends)), P * packed_width ** 2
    else:
        positions, pairs = P * Wp + len(starts) * Lc, P * Wp * Wp / 2 + len(starts) * Lc * (Wp + Lc / 2)
    return positions * 12 * d * d + pairs * 2 * d


def _packed_hidden(model, rows, prompts, owner, starts, ends, W: int) -> torch.Tensor:
    """Packed: one row per distinct prompt, the prompt then each of its continuations,
    (P, W), one forward. A continuation counts its positions on from its prompt and sees,
    through the attention mask, the prompt and its own earlier tokens, none of the others'."""
    device, P = model.tok_emb.weight.device, len(prompts)
    packed = [list(p) for p in prompts]
    segment = [[0] * len(p) for p in prompts]  # 0: the prompt; j: the row's j-th continuation
    positions = [list(range(len(p))) for p in prompts]
    columns = []  # per target, its packed row and the column of the input that predicts it
    for r, k, s, e in zip(rows, owner, starts, ends):
        row, a, n = packed[k], len(packed[k]), e - s
        segment[k] += [segment[k][-1] + 1 if a > s else 1] * n
        row += r[s:e]
        positions[k] += range(s, e)
        if n:  # the prompt's last token predicts the first token, each token the next
            columns += [k * W + s - 1, *range(k * W + a, k * W + a + n - 1)]
    ids = torch.zeros(P, W, dtype=torch.long)
    pos = torch.zeros(P, W, dtype=torch.long)
    seg = torch.full((P, W), -1, dtype=torch.long)  # -1: padding, seen by no real token
    for k in range(P):
        m = len(packed[k])
        ids[k, :m], pos[k, :m], seg[k, :m] = torch.tensor(packed[k]), torch.tensor(positions[k]), torch.tensor(segment[k])
    causal = torch.ones(W, W, dtype=torch.bool).tril()
    mask = causal & ((seg[:, None, :] == seg[:, :, None]) | (seg[:, None, :] == 0))  # (P, W, W): key j for query i
    # Only the real positions go through the token-wise layers (Transformer.forward's real_index):
    # the rows' widths differ, and the padding would be a sixth of a DPO batch.
    real = seg.flatten() >= 0
    real_index = real.nonzero()[:, 0]  # (n,) flat positions in (P, W)
    row_of = torch.full((P * W,), -1, dtype=torch.long)
    row_of[real_index] = torch.arange(len(real_index))  # flat position -> its row in the (n, d) output
    hidden = model(ids.to(device), positions=pos.to(device), attn_mask=mask.to(device), return_hidden=True,
                   real_index=real_index.to(device))  # (n, d_model)
    return select_rows(hidden, row_of[torch.tensor(columns, dtype=torch.long)].to(device))


def _cached_hidden(model, rows, prompts, owner, starts, ends) -> torch.Tensor:
    """Through a cache: the distinct prompts (P, Wp), left-padded, in one forward whose keys
    and values stay in a KV cache (with gradients), copied to their N owners; then the
    continuations (N, Lc), right-padded, in one forward on top of it."""
    N = len(rows)
    device = model.tok_emb.weight.device
    P, Wp = len(prompts), max(len(p) for p in prompts)
    Lc = max(max(e - s for s, e in zip(starts, ends)), 1)
    lengths = torch.tensor([len(p) for p in prompts])

    # Prompts left-padded to Wp: the last column of every row is its last prompt token.
    prompt_ids = torch.zeros(P, Wp, dtype=torch.long)
    for k, p in enumerate(prompts):
        prompt_ids[k, Wp - len(p):] = torch.tensor(p)
    columns = torch.arange(Wp + Lc)
    key_mask = columns[None, :] >= (Wp - lengths)[:, None]  # (P, Wp + Lc): False on the left padding
    positions = (columns[None, :Wp] - (Wp - lengths)[:, None]).clamp(min=0)  # each prompt from 0
    cont = torch.zeros(N, Lc, dtype=torch.long)
    valid = torch.zeros(N, Lc, dtype=torch.bool)  # the columns that predict a continuation token
    for i, (r, s, e) in enumerate(zip(rows, starts, ends)):
        cont[i, :e - s] = torch.tensor(r[s:e], dtype=torch.long)
        valid[i, :e - s] = True
    owner_t = torch.tensor(owner)
    # Continuations go on counting after their prompt (padding columns clamped into the table).
    cont_positions = (lengths[owner_t][:, None] + torch.arange(Lc)[None, :]).clamp(max=model.config.context_length - 1)

    cache = model.new_cache(P, Wp + Lc, ring=False)
    cache.key_mask = key_mask.to(device)
    h_prompt = model(prompt_ids.to(device), cache=cache, positions=positions.to(device), return_hidden=True)[:, -1]
    owner_t, cont = owner_t.to(device), cont.to(device)
    shared = KVCache.from_tensors([k.index_select(0, owner_t) for k in cache.k],
                                  [v.index_select(0, owner_t) for v in cache.v], length=Wp,
                                  key_mask=cache.key_mask.index_select(0, owner_t), max_length=Wp + Lc)
    h_cont = model(cont, cache=shared, positions=cont_positions.to(device), return_hidden=True)
    hidden = torch.cat([h_prompt.index_select(0, owner_t)[:, None], h_cont[:, :-1]], dim=1)  # (N, Lc, d)
    return select_rows(hidden.flatten(0, 1), valid.flatten().nonzero()[:, 0].to(device))  # (n, d), row by row


__all__ = ["can_share", "continuation_hidden", "continuation_logits", "continuation_logprobs"]
