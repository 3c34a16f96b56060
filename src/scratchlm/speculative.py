"""Speculative decoding: a small draft model proposes k tokens, the target checks them in one pass.

Decoding is memory-bound: one target forward over k + 1 tokens reads the weights once, about
what one token costs. So a cheap draft guesses d_1..d_k one by one, the target scores
[last, d_1..d_k] together, and the rule of Leviathan et al. (2023) / Chen et al. (2023) (the
one gpt-fast and Hugging Face assisted generation use) keeps the longest acceptable prefix:

    accept d_i with probability min(1, p_i(d_i) / q_i(d_i))       p: target, q: draft
    at the first rejection, draw from norm(max(p_i - q_i, 0)) and stop
    if all k are accepted, draw one more token from p_{k+1} (a free bonus)

Every emitted token is then distributed exactly as the target's own sampling would give it
(accepted: q * min(1, p/q) = min(p, q); rejected: the residual adds p - min(p, q)), whatever
the draft. Greedy (temperature 0) is the special case "accept while the draft's token is the
target's argmax": the output is token for token the target's alone. The draft only changes
the speed: each round costs k draft steps and one target pass, and yields 1 to k + 1 tokens.

Both models keep a KV cache. A rejected suffix is dropped by moving ``cache.length`` back:
the cache is written in place, so the stale positions are simply overwritten later.

>>> import torch
>>> from scratchlm import ModelConfig, Transformer
>>> torch.manual_seed(0) and None
>>> target = Transformer(ModelConfig.preset("llama-tiny")).eval()
>>> draft = Transformer(ModelConfig.preset("llama-tiny", n_layers=1)).eval()
>>> out = speculative_generate(target, draft, [1, 2, 3], max_new_tokens=12, k=4)
>>> from scratchlm.generate import generate
>>> out.token_ids == generate(target, None, [[1, 2, 3]], max_new_tokens=12)[0].token_ids
True
>>> 0.0 <= out.acceptance_rate <= 1.0
True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .decode_weights import greedy_ids
from .errors import ScratchLMError
from .generate import SamplingOptions, filter_logits
from .sampling import draw


@dataclass
class SpeculativeResult:
    token_ids: list[int]  # the new tokens (max_new_tokens of them)
    proposed: int  # draft tokens proposed over all rounds
    accepted: int  # of those, accepted by the target
    rounds: int  # target forward passes after the prefill

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_round(self) -> float:
        return len(self.token_ids) / self.rounds if self.rounds else 0.0


def _probs(logits: torch.Tensor, options: SamplingOptions) -> torch.Tensor:
    """(T, V) logits -> (T, V) the distribution sampling draws from (filters applied)."""
    return filter_logits(logits.float(), options).softmax(dim=-1)


class _Cached:
    """A model with its KV cache, fed the sequence from wherever its cache stops."""

    def __init__(self, model, max_length: int, slack: int):
        self.model = model
        # slack: a local layer's ring keeps that many columns past its window, for the rollback.
        self.cache = model.new_cache(1, max_length, slack=slack)

    def logits(self, seq: list[int], extra: list[int] = ()) -> torch.Tensor:
        """Feed seq[cache.length:] + extra; logits (T, V) of the tokens fed."""
        device = self.model.tok_emb.weight.device
        ids = torch.tensor([seq[self.cache.length:] + list(extra)], device=device)
        return self.model(ids, cache=self.cache)[0]

    def argmax_last(self, seq: list[int], extra: list[int], n: int) -> list[int]:
        """Feed seq[cache.length:] + extra; the argmax of the last n tokens' logits, through the
        head's screen where it has one (decode_weights.greedy_ids: the same ids, an int8 read)."""
        device = self.model.tok_emb.weight.device
        ids = torch.tensor([seq[self.cache.length:] + list(extra)], device=device)
        hidden = self.model(ids, cache=self.cache, return_hidden=True)[0, -n:]  # (n, d_model)
        best = greedy_ids(self.model.lm_head, hidden)
        return (best if best is not None else self.model.lm_head(hidden).argmax(dim=-1)).tolist()

    def next_logits(self, seq: list[int]) -> torch.Tensor:
        """Logits (V,) after seq. The draft's cache lacks one token, or two after a round whose
        drafts were all kept: fed together, one pass (a fused model's run_blocks takes a few
        tokens of one row in one call, decode_block.DecodeBlocks, at about one step's cost)."""
        return self.logits(seq)[-1]


@torch.inference_mode()
def speculative_generate(target, draft, prompt: list[int], *, max_new_tokens: int = 64, k: int = 4,
                         temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                         generator: torch.Generator | None = None) -> SpeculativeResult:
    """Generate ``max_new_tokens`` after ``prompt`` (token ids, batch 1) from ``target``,
    with ``draft`` proposing ``k`` tokens per round. Both must share the vocabulary."""
    if target.config.vocab_size != draft.config.vocab_size:
        raise ScratchLMError(f"the draft's vocabulary ({draft.config.vocab_size}) is not the target's "
                             f"({target.config.vocab_size}): they must share the tokenizer")
    if not isinstance(k, int) or k < 1:
        raise ScratchLMError(f"k (draft tokens per round) must be a positive integer, got {k!r}")
    if not prompt:
        raise ScratchLMError("the prompt is empty")
    options = SamplingOptions(temperature, top_k, top_p)
    greedy = options.greedy
    max_length = len(prompt) + max_new_tokens + k + 1
    for name, model in (("target", target), ("draft", draft)):
        if max_length > model.config.context_length:
            raise ScratchLMError(f"prompt + max_new_tokens + k + 1 = {max_length} tokens exceed the {name}'s "
                                 f"context length {model.config.context_length}")
    big, small = _Cached(target, max_length, k + 1), _Cached(draft, max_length, k + 1)
    seq = list(prompt)
    n_prompt = len(seq)
    # Invariant between rounds: both caches hold at most seq[:-1]; each model's next forward
    # starts with whatever its cache lacks, so the last token is always fed.
    if len(seq) > 1:
        big.logits(seq[:-1])
        small.logits(seq[:-1])
    proposed = accepted = rounds = 0

    def draw_one(p: torch.Tensor) -> int:  # p (V,)
        return int(draw(p[None], generator)[0])

    while len(seq) - n_prompt < max_new_tokens:
        n = len(seq)
        want = min(k, max_new_tokens - (n - n_prompt))  # no point drafting past the end
        drafted, q = [], []
        logits = small.next_logits(seq)
        for i in range(want):
            if greedy:
                token = int(logits.argmax())
            else:
                q.append(_probs(logits[None], options)[0])
                token = draw_one(q[-1])
            drafted.append(token)
            if i + 1 < want:
                logits = small.next_logits(seq + drafted)
        # One target pass over [the tokens its cache lacks, d_1..d_want]: the last want + 1
        # rows score d_1..d_want and the bonus position.
        rounds += 1
        proposed += want
        new = []
        if greedy:
            best = big.argmax_last(seq, drafted, want + 1)
            for i, token in enumerate(drafted):
                if token != best[i]:
                    break
                new.append(token)
            new.append(best[len(new)])  # the correction, or the bonus if all were accepted
        else:
            p = _probs(big.logits(seq, drafted)[-(want + 1):], options)  # (want + 1, V)
            for i, token in enumerate(drafted):
                ratio = p[i, token] / q[i][token]
                if torch.rand((), generator=generator) < ratio:
                    new.append(token)
                    continue
                residual = (p[i] - q[i]).clamp(min=0)  # where the target wants more than the draft gave
                new.append(draw_one(residual) if residual.sum() > 0 else draw_one(p[i]))
                break
            else:
                new.append(draw_one(p[want]))
        accepted += len(new) - 1  # the accepted drafts, then one target token
        seq += new
        # Drop what the caches hold beyond the kept tokens (all of seq but its last).
        big.cache.length = min(big.cache.length, len(seq) - 1)
        small.cache.length = min(small.cache.length, len(seq) - 1)
    out = seq[n_prompt:n_prompt + max_new_tokens]
    return SpeculativeResult(out, proposed, accepted, rounds)
