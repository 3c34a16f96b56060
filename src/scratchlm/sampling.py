"""Choosing the next token from the logits: greedy, temperature, top-k, top-p, min-p,
the repetition penalty, and no repeated n-grams. Each filter maps logits (..., V) to logits with the dropped tokens
at -inf; ``sample_next`` applies them in order and draws one token per row.

    logits (B, V) -> repetition penalty -> / temperature -> top-k -> top-p -> min-p
                  -> softmax -> sample          (temperature 0: argmax, "greedy")

``NGramBlocker`` is the decode loop's other guard against loops (no_repeat_ngram): it
forbids, before any of the above, the tokens that would write an n-gram a second time.

>>> import torch
>>> logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
>>> sample_next(logits, SamplingOptions()).tolist()  # greedy: the most likely token
[1]
>>> g = torch.Generator().manual_seed(0)
>>> sample_next(logits, SamplingOptions(temperature=1.0, top_k=1), g).tolist()  # one candidate left
[1]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import ScratchLMError

NEG_INF = float("-inf")
NUCLEUS_FIRST = 256  # top_p_filter: candidates sorted first, before the whole row
MIN_TEMPERATURE = 1e-6  # logits (|x| < 1e30) / 1e-6 stay finite in float32


@dataclass
class SamplingOptions:
    """How the next token is chosen from the logits. Validated on construction.

    >>> SamplingOptions(temperature=0.7, top_p=0.9).greedy
    False
    >>> SamplingOptions(top_p=1.5)
    Traceback (most recent call last):
    ...
    scratchlm.errors.ScratchLMError: top_p must be in (0, 1], got 1.5
    """

    temperature: float = 0.0  # 0: greedy (argmax); 1: the model's own distribution
    top_k: int | None = None  # keep the k most likely tokens (None or 0: all)
    top_p: float | None = None  # keep the smallest set holding probability >= top_p
    min_p: float | None = None  # keep tokens with prob >= min_p * the top token's prob
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in prompt or output

    def __post_init__(self):
        t, k, p, m, r = self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty
        if not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ScratchLMError(f"temperature must be >= 0 (0 means greedy), got {t}")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
            raise ScratchLMError(f"top_k must be a positive integer (or 0/None for no limit), got {k}")
        if p is not None and not (0.0 < p <= 1.0):
            raise ScratchLMError(f"top_p must be in (0, 1], got {p}")
        if m is not None and not (0.0 <= m <= 1.0):
            raise ScratchLMError(f"min_p must be in [0, 1], got {m}")
        if not (isinstance(r, (int, float)) and math.isfinite(r) and r > 0):
            raise ScratchLMError(f"repetition_penalty must be a finite number > 0, got {r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k highest logits of each row (and any tied with the k-th), -inf elsewhere.

    torch.topk finds the k-th value without sorting the whole vocabulary.

    >>> top_k_filter(torch.tensor([1.0, 3.0, 2.0, 0.0]), 2)
    tensor([-inf, 3., 2., -inf])
    """
    if not k or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (..., 1): the k-th largest
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability adds
    up to at least p; -inf elsewhere. The most likely token is always kept.

    >>> probs = torch.tensor([0.1, 0.5, 0.15, 0.25])
    >>> top_p_filter(probs.log(), 0.7).exp()  # 0.5 + 0.25 = 0.75 >= 0.7
    tensor([0.0000, 0.5000, 0.0000, 0.2500])
    """
    if p >= 1.0:
        return logits
    probs = logits.softmax(dim=-1)
    # The set is a prefix of the tokens sorted by probability. Where the NUCLEUS_FIRST most
    # likely tokens of every row already hold p, it lies among them and only they are sorted
    # (torch.topk): a full sort of 49,152 took 3.3 ms a row here, a fifth of a step.
    top, order = torch.topk(probs, min(NUCLEUS_FIRST, probs.shape[-1]), dim=-1)  # (..., k), descending
    running = top.cumsum(dim=-1)
    if not bool((running[..., -1] >= p).all()):  # a flat row: sort it all
        top, order = probs.sort(dim=-1, descending=True)
        running = top.cumsum(dim=-1)
    mass_before = running - top  # probability of all more likely tokens
    keep_sorted = mass_before < p  # the set was not yet complete before this token
    keep_sorted[..., 0] = True  # the most likely token stays, even when p underflows float32 to 0
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, order, keep_sorted)  # vocabulary order
    return logits.masked_fill(~keep, NEG_INF)


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens whose probability is at least min_p times the most likely token's.

    The cut scales with the model's confidence: a peaked distribution keeps few tokens,
    a flat one keeps many.

    >>> probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    >>> min_p_filter(probs.log(), 0.2).isfinite().tolist()  # threshold 0.2 * 0.5 = 0.1
    [True, True, True, False]
    """
    if not min_p:
        return logits
    probs = logits.softmax(dim=-1)
    threshold = min_p * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, NEG_INF)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make tokens already seen less likely (penalty > 1): positive logits are divided by
    the penalty, negative ones multiplied, so both move towards "less likely" (CTRL, 2019).

    logits (B, V) float; seen (B, V) bool, True for tokens in the prompt or output so far.

    >>> apply_repetition_penalty(torch.tensor([[2.0, -2.0, 2.0]]), torch.tensor([[True, True, False]]), 2.0)
    tensor([[ 1., -4.,  2.]])
    """
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


class NGramBlocker:
    """Forbids each row the tokens that would repeat an n-gram of its own output
    (``no_repeat_ngram_size`` in Hugging Face's generate, here over the output only, so an
    answer may still quote its prompt).

    Per row it keeps {the last n-1 tokens: the tokens that followed them}; after each new
    token, the tokens banned next are the followers of the row's current n-1 last tokens.
    Host-side and O(1) per token: a few ids per row, not a (B, V) scan.

    >>> b = NGramBlocker(n=3, rows=1)
    >>> for t in [5, 6, 7, 5, 6]:
    ...     b.add([t])
    >>> b.banned(0)          # "5 6" was followed by 7: writing 7 now would repeat "5 6 7"
    [7]
    >>> logits = b.apply(torch.zeros(1, 9))
    >>> logits[0, 7].item(), logits[0, 8].item()
    (-inf, 0.0)
    """

    def __init__(self, n: int, rows: int):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ScratchLMError(f"no_repeat_ngram must be an integer >= 1 (or 0/None: off), got {n}")
        self.n = n
        self.history: list[list[int]] = [[] for _ in range(rows)]
        self.followers: list[dict[tuple[int, ...], set[int]]] = [{} for _ in range(rows)]

    def add(self, tokens) -> None:
        """Append one new token per row (a list, or a (B,) tensor)."""
        tokens = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
        for row, token in enumerate(tokens):
            history = self.history[row]
            history.append(int(token))
            if len(history) >= self.n:
                key = tuple(history[len(history) - self.n:-1])
                self.followers[row].setdefault(key, set()).add(history[-1])

    def banned(self, row: int) -> list[int]:
        history = self.history[row]
        if self.n == 1:
            return sorted(set(history))
        if len(history) < self.n - 1:
            return []
        return sorted(self.followers[row].get(tuple(history[len(history) - self.n + 1:]), ()))

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (B, V) with every row's banned tokens at -inf (a new tensor)."""
        rows = [(row, token) for row in range(len(self.history)) for token in self.banned(row)]
        if not rows:
            return logits
        logits = logits.clone()
        index = torch.tensor(rows, device=logits.device)
        logits[index[:, 0], index[:, 1]] = NEG_INF
        return logits


def filter_logits(logits: torch.Tensor, options: SamplingOptions) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p, in that order. logits (B, V) float32.

    A temperature below MIN_TEMPERATURE divides by MIN_TEMPERATURE instead: 1e-45 is 0 in
    float32 (logits / 0 is inf or nan) and 1e-30 sends logits of 10 to inf, while at 1e-6
    the choice is already greedy but for near-exact ties, as a tiny temperature means."""
    logits = logits / max(options.temperature, MIN_TEMPERATURE)
    if options.top_k:
        logits = top_k_filter(logits, options.top_k)
    if options.top_p is not None:
        logits = top_p_filter(logits, options.top_p)
    if options.min_p:
        logits = min_p_filter(logits, options.min_p)
    return logits


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row of probs (B, V) (>= 0, each row's sum > 0, need not be 1): index i of
    row b with probability probs[b, i] / sum(probs[b]). -> (B,) int64.

    The inverse of the cumulative sum at one uniform number a row: the first i whose running
    sum exceeds u * total. A zero-probability index is never chosen (its running sum equals
    the one before it, which is found first). torch.multinomial draws the same distribution
    but spends ~1.2 ms a row of 49,152 (9 ms for 8 rows) on this project's CPU, against
    0.15 ms here (0.4 for 8): 5% of a sampled SmolLM2-135M step at batch 1, a fifth at batch 8.
    The sums are float64, so 49k float32 terms add up with no drift that shows.

    >>> g = torch.Generator().manual_seed(0)
    >>> draw(torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.0, 0.5]]), g).tolist()[0]
    1
    """
    running = torch.cumsum(probs, -1, dtype=torch.float64)  # (B, V)
    total = running[:, -1:].contiguous()  # (B, 1)
    if not bool(((total > 0) & torch.isfinite(total)).all()):
        raise ScratchLMError("cannot sample: the probabilities of a row are NaN, infinite or all zero "
                             "(are the model's logits NaN?)")
    u = torch.rand(probs.shape[0], 1, dtype=torch.float64, generator=generator, device=probs.device) * total
    choice = torch.searchsorted(running, u, right=True)  # (B, 1): first i with running[i] > u
    # u * total may round up to total, past every running sum: the last index with mass is the
    # first whose running sum reaches the total.
    return torch.minimum(choice, torch.searchsorted(running, total)).squeeze(-1)


def sample_next(logits: torch.Tensor, options: SamplingOptions, generator: torch.Generator | None = None,
                seen: torch.Tensor | None = None) -> torch.Tensor:
    """Choose one token per row. logits (B, V) -> ids (B,).

    With top_k set, the other filters and the draw work on the k candidates only (sorted
    by torch.topk), so no step touches the whole vocabulary more than once.
    """
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, options.repetition_penalty)
    if options.greedy:
        return logits.argmax(dim=-1)
    candidates = None
    if options.top_k and options.top_k < logits.shape[-1]:
        logits, candidates = torch.topk(logits, options.top_k, dim=-1)  # (B, k) each
    logits = filter_logits(logits, SamplingOptions(options.temperature, None, options.top_p, options.min_p))
    probs = logits.softmax(dim=-1)
    choice = draw(probs, generator)  # (B,)
    if candidates is not None:
        choice = candidates.gather(-1, choice[:, None]).squeeze(-1)
    return choice
