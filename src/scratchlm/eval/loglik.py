"""Log-likelihood of a continuation given a context: the one measurement every scored task makes.

A request is a pair of token lists, (context, continuation). The model reads
context + continuation[:-1] and we add up the log-probabilities it gave each
continuation token, at the position just before it::

    tokens     c0  c1  c2 | x0  x1  x2        context c, continuation x
    input      c0  c1  c2   x0  x1            (the last token is never read)
    scored              ^   ^   ^             log p(x0 | c), log p(x1 | c x0), log p(x2 | c x0 x1)

``is_greedy`` says whether argmax at each of those positions is the continuation's token
(LAMBADA-style "the model would have written exactly this").

Text pairs are split into tokens as lm-evaluation-harness does (``encode_pair``): the
context's trailing spaces move to the continuation, the whole string is encoded once and
the continuation is what follows the context's tokens, so a word is tokenized as it is
in running text.

Speed, without changing a number:

- requests are sorted longest first and batched with right padding (a causal model never
  looks right, so padding after a row cannot change it, and no mask is needed);
- the output head runs only at the scored positions (the head is the largest matrix of a
  small model with a big vocabulary), the log-softmax only there, in float32;
- requests that share a context (the choices of one question) read it once: the context
  is run through the model into a KV cache, which every choice then continues (several
  questions per batch, their contexts left-padded and masked, as ``generate`` pads prompts).
  That pass only fills the cache (``cache_only``): nothing reads the context's outputs,
  so the last layer computes the context's keys and values and skips attention and MLP.

>>> import torch
>>> from scratchlm import ModelConfig, Transformer
>>> _ = torch.manual_seed(0)
>>> model = Transformer(ModelConfig.preset("gpt-tiny")).eval()
>>> [(lp, greedy)] = score_continuations(model, [([1, 2, 3], [4, 5])])
>>> logits = model(torch.tensor([[1, 2, 3, 4]]))[0].log_softmax(-1)
>>> abs(lp - float(logits[2, 4] + logits[3, 5])) < 1e-5
True
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch

from ..errors import ScratchLMError

Request = tuple[list[int], list[int]]  # (context ids, continuation ids)


class ContextTooLong(ScratchLMError):
    """A request that does not fit the model's context (``index`` says which)."""

    def __init__(self, message: str, index: int):
        super().__init__(message)
        self.index = index


def encode_pair(tokenizer, context: str, continuation: str, prefix_id: int | None = None) -> Request:
    """Text (context, continuation) -> token ids, split the way lm-evaluation-harness splits them.

    An empty context becomes ``[prefix_id]`` (BOS, else end-of-text), so the first token of
    the continuation is still predicted from something.

    >>> from scratchlm.tokenizer import CharTokenizer
    >>> tok = CharTokenizer.train("abc ")
    >>> ctx, cont = encode_pair(tok, "ab ", "c")
    >>> tok.decode(ctx), tok.decode(cont)
    ('ab', ' c')
    """
    if not context:
        if prefix_id is None:
            prefix_id = prefix_token_id(tokenizer)
        ids = tokenizer.encode(continuation)
        if ids and ids[0] == prefix_id:
            return ids[:1], ids[1:]
        return [prefix_id], ids
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids):]


def prefix_token_id(tokenizer) -> int:
    """The token that stands before a text with no context: BOS, else end-of-text (lm-eval's rule)."""
    for name in ("bos_id", "eot_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    raise ScratchLMError("the tokenizer has neither a BOS nor an end-of-text token to start a text with")


@torch.inference_mode()
def score_continuations(model, requests: Sequence[Request], *, batch_size: int = 32,
                        truncate: bool = False, share_prefix: bool = True,
                        progress: bool = False) -> list[tuple[float, bool]]:
    """(log-likelihood, is_greedy) of each request's continuation, in the requests' order.

    truncate: a request longer than the context (context + continuation - 1 tokens) is cut
        from the left, as lm-eval does; False raises ContextTooLong naming the request.
    share_prefix: requests with the same context read it once through the KV cache.
    """
    limit = model.config.context_length
    rows: list[Request] = []
    for i, (context, continuation) in enumerate(requests):
        context, continuation = [int(t) for t in context], [int(t) for t in continuation]
        if not context or not continuation:
            raise ScratchLMError(f"request {i}: context and continuation need at least one token each")
        if len(continuation) > limit:
            raise ContextTooLong(f"request {i}: a continuation of {len(continuation)} tokens does not fit "
                                 f"the context of {limit}", i)
        if len(context) + len(continuation) - 1 > limit:
            if not truncate:
                raise ContextTooLong(f"request {i}: {len(context) + len(continuation)} tokens do not fit "
                                     f"the model's context of {limit}", i)
            context = (context + continuation)[-(limit + 1):][:-len(continuation)]
        rows.append((context, continuation))

    results: list[tuple[float, bool] | None] = [None] * len(rows)
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, (context, _) in enumerate(rows):
        groups[tuple(context)].append(i)
    shared = [ids for ctx, ids in groups.items() if share_prefix and len(ids) > 1 and len(ctx) > 1]
    alone = sorted((i for ctx, ids in groups.items() if not (share_prefix and len(ids) > 1 and len(ctx) > 1)
                    for i in ids), key=lambda i: -(len(rows[i][0]) + len(rows[i][1])))

    from tqdm.auto import tqdm

    bar = tqdm(total=len(rows), desc="scoring", unit="req", disable=not progress, leave=False)
    for start in range(0, len(alone), batch_size):
        chunk = alone[start:start + batch_size]
        inputs = [rows[i][0] + rows[i][1][:-1] for i in chunk]
        for i, result in zip(chunk, _score_batch(model, inputs, [rows[i][1] for i in chunk])):
            results[i] = result
        bar.update(len(chunk))
    # Groups of one context: the context but its last token goes into the cache; the last one
    # is where the first continuation token is predicted, so it is read with the continuations.
    # Several groups share a batch (their contexts left-padded), up to batch_size rows. Every
    # row of a batch is padded to its longest continuation, and a batch's B rows outnumber
    # its G contexts (B = G x choices): groups are sorted by their longest continuation
    # first, by context length second (on benchmarks/eval.py's items, 26% fewer padded
    # positions than by context length alone, where 63% of the continuation rows were padding).
    shared.sort(key=lambda members: (-max(len(rows[i][1]) for i in members), -len(rows[members[0]][0])))
    parts = [members[i:i + batch_size] for members in shared for i in range(0, len(members), batch_size)]
    batch: list[list[int]] = []

    def fits(groups: list[list[int]]) -> bool:  # the padded prefix + the longest continuation row
        longest_prefix = max(len(rows[g[0]][0]) - 1 for g in groups)
        longest_row = max(len(rows[i][1]) for g in groups for i in g)
        return sum(map(len, groups)) <= batch_size and longest_prefix + longest_row <= limit

    for part in parts + [None]:
        if batch and (part is None or not fits(batch + [part])):
            members = [i for group in batch for i in group]
            inputs = [rows[i][0][-1:] + rows[i][1][:-1] for i in members]
            owners = [g for g, group in enumerate(batch) for _ in group]
            prefixes = [rows[group[0]][0][:-1] for group in batch]
            scored = _score_batch(model, inputs, [rows[i][1] for i in members], prefixes, owners)
            for i, result in zip(members, scored):
                results[i] = result
            bar.update(len(members))
            batch = []
        if part is not None:
            batch.append(part)
    bar.close()
    return results  # type: ignore[return-value]


def _score_batch(model, inputs: list[list[int]], continuations: list[list[int]],
                 prefixes: list[list[int]] | None = None, owners: list[int] | None = None) -> list[tuple[float, bool]]:
    """One forward over right-padded ``inputs``; with ``prefixes``, row b continues
    ``prefixes[owners[b]]``, which is read once per prefix into the KV cache first."""
    device = model.tok_emb.weight.device
    B, T = len(inputs), max(len(r) for r in inputs)
    ids = torch.zeros(B, T, dtype=torch.long)  # right padding: id 0 is never scored
    for b, row in enumerate(inputs):
        ids[b, :len(row)] = torch.tensor(row)
    ids = ids.to(device)
    cache = positions = None
    if prefixes:
        # Prefixes left-padded to one length P: padding keys are masked out and each row's
        # positions start at 0 at its first real token (as generate() pads prompts).
        G, P = len(prefixes), max(len(p) for p in prefixes)
        pad = torch.tensor([P - len(p) for p in prefixes], device=device)  # (G,)
        padded = bool((pad > 0).any())
        prefix_ids = torch.zeros(G, P, dtype=torch.long)
        for g, p in enumerate(prefixes):
            prefix_ids[g, P - len(p):] = torch.tensor(p)
        cols = torch.arange(P + T, device=device)
        key_mask = cols[None, :] >= pad[:, None]  # (G, P + T)
        all_positions = (cols[None, :] - pad[:, None]).clamp(min=0)  # (G, P + T)
        read = model.new_cache(G, P, ring=False)  # copied by column below
        read.key_mask = key_mask[:, :P] if padded else None
        model(prefix_ids.to(device), cache=read, positions=all_positions[:, :P] if padded else None,
              cache_only=True)  # nothing reads the prefix's outputs, only its keys and values
        index = torch.tensor(owners, device=device)  # (B,) the prefix of each row
        cache = model.new_cache(B, P + T, ring=False)
        for layer in range(len(cache.k)):  # every row starts from its prefix's keys and values
            cache.k[layer][:, :, :P] = read.k[layer][index]
            cache.v[layer][:, :, :P] = read.v[layer][index]
        cache.length = P
        if padded:
            cache.key_mask = key_mask[index]
            positions = all_positions[index, P:]
    hidden = model(ids, cache=cache, positions=positions, return_hidden=True)  # (B, T, d_model)

    # The continuation of row b is scored at its last len(cont) input positions.
    rows, cols, targets = [], [], []
    for b, (row, cont) in enumerate(zip(inputs, continuations)):
        n = len(row)
        rows += [b] * len(cont)
        cols += range(n - len(cont), n)
        targets += cont
    picked = hidden[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]  # (N, d_model)
    logprobs = model.lm_head(picked).float().log_softmax(-1)  # (N, vocab)
    targets_t = torch.tensor(targets, device=device)
    token_lp = logprobs.gather(1, targets_t[:, None])[:, 0]  # (N,)
    greedy = logprobs.argmax(-1) == targets_t
    token_lp, greedy = token_lp.tolist(), greedy.tolist()
    out, k = [], 0
    for cont in continuations:
        out.append((float(sum(token_lp[k:k + len(cont)])), all(greedy[k:k + len(cont)])))
        k += len(cont)
    return out
