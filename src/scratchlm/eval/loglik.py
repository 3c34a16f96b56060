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
- requests that share a context (the choices of one question) read it once
  (shared_prompt.py): one packed row holds the context and then every choice, an attention
  mask letting each choice see the context and itself only, positions counting on from
  the context for each choice. No padding between a question's choices, no copies of the
  context's keys and values: 1.46x the items/s of running the context into a KV cache
  that every choice continues (benchmarks/eval.py's items, 32 requests a batch).

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
from ..shared_prompt import can_share, continuation_hidden

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
    share_prefix: requests with the same context read it once (one packed row, shared_prompt.py).

    Equal requests (a question whose choices repeat one ending) are scored once, so they get
    the same number, as they do in lm-eval: two copies at different places in a packed row
    would differ in float32 rounding and could break a tie the other way.
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

    first: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}  # a request -> its first index
    copy_of = [first.setdefault((tuple(c), tuple(x)), i) for i, (c, x) in enumerate(rows)]
    results: list[tuple[float, bool] | None] = [None] * len(rows)
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, (context, _) in enumerate(rows):
        if copy_of[i] == i:
            groups[tuple(context)].append(i)
    shared = [ids for ids in groups.values() if share_prefix and len(ids) > 1]
    alone = sorted((i for ids in groups.values() if not (share_prefix and len(ids) > 1) for i in ids),
                   key=lambda i: -(len(rows[i][0]) + len(rows[i][1])))

    from tqdm.auto import tqdm

    bar = tqdm(total=len(first), desc="scoring", unit="req", disable=not progress, leave=False)
    for start in range(0, len(alone), batch_size):
        chunk = alone[start:start + batch_size]
        for i, result in zip(chunk, _score_rows(model, [rows[i] for i in chunk], shared=False)):
            results[i] = result
        bar.update(len(chunk))
    # Requests with one context (the choices of a question) read it once (shared_prompt.py):
    # packed, one row per context holds it and each continuation after it. Groups are sorted
    # by that row's length, longest first, so that a batch's rows pad little; a batch takes
    # whole groups, up to batch_size requests (a group larger than that is split).
    shared.sort(key=lambda members: -(len(rows[members[0]][0]) + sum(len(rows[i][1]) for i in members)))
    parts = [members[i:i + batch_size] for members in shared for i in range(0, len(members), batch_size)]
    batch: list[int] = []
    for part in parts + [None]:
        if batch and (part is None or len(batch) + len(part) > batch_size):
            for i, result in zip(batch, _score_rows(model, [rows[i] for i in batch], shared=True)):
                results[i] = result
            bar.update(len(batch))
            batch = []
        if part is not None:
            batch += part
    bar.close()
    return [results[i] for i in copy_of]  # type: ignore[misc]


def _score_rows(model, requests: list[Request], shared: bool) -> list[tuple[float, bool]]:
    """One forward over the right-padded rows context + continuation (their last token is
    never read); with ``shared``, rows with one context read it once (shared_prompt.py)."""
    device = model.tok_emb.weight.device
    full = [context + continuation for context, continuation in requests]
    B, L = len(full), max(map(len, full))
    ids = torch.zeros(B, L, dtype=torch.long)  # right padding: id 0 is never scored
    for b, row in enumerate(full):
        ids[b, :len(row)] = torch.tensor(row)
    starts = [len(context) for context, _ in requests]
    ends = [len(row) for row in full]
    if shared and can_share(model, ids, starts, ends):
        picked, _ = continuation_hidden(model, ids.to(device), starts, ends)  # (N, d_model), row by row
    else:  # a causal model never looks right, so padding after a row changes nothing: no mask
        hidden = model(ids[:, :-1].to(device), return_hidden=True)  # (B, L - 1, d_model)
        # The continuation of row b is predicted at columns start - 1 .. end - 2.
        rows = torch.tensor([b for b, (s, e) in enumerate(zip(starts, ends)) for _ in range(s, e)])
        cols = torch.tensor([c for s, e in zip(starts, ends) for c in range(s - 1, e - 1)])
        picked = hidden[rows.to(device), cols.to(device)]  # (N, d_model)
    logprobs = model.lm_head(picked).float().log_softmax(-1)  # (N, vocab)
    targets = torch.tensor([t for context, continuation in requests for t in continuation], device=device)
    token_lp = logprobs.gather(1, targets[:, None])[:, 0].tolist()  # (N,)
    greedy = (logprobs.argmax(-1) == targets).tolist()
    out, k = [], 0
    for _, continuation in requests:
        n = len(continuation)
        out.append((float(sum(token_lp[k:k + n])), all(greedy[k:k + n])))
        k += n
    return out
