"""Sampling and the decode loop: a prompt becomes a continuation, one token at a time.

    prompts --encode, left-pad--> ids (B, T)
    prefill: one forward over all T positions fills the KV cache -> logits of the last (B, V)
    repeat:  logits -> repetition penalty -> / temperature -> top-k -> top-p -> min-p
                    -> softmax -> sample   (temperature 0: argmax, "greedy")
             next ids (B,) -> one cached forward step -> logits (B, V)
    until every row met a stop (EOS, a stop id, a stop string) or max_new_tokens.

Everything goes through one generator of events (``_events``): ``generate`` collects them
into one ``Completion`` per prompt, ``stream`` hands them out as ``Delta``s.

>>> import torch
>>> from scratchlm import ModelConfig, Transformer
>>> _ = torch.manual_seed(0)
>>> model = Transformer(ModelConfig.preset("gpt-tiny")).eval()
>>> [c] = generate(model, None, [[1, 2, 3]], max_new_tokens=5)
>>> len(c.token_ids), c.finish_reason, c.prompt_tokens
(5, 'length', 3)
>>> generate(model, None, [[1, 2, 3]], max_new_tokens=5)[0].token_ids == c.token_ids  # greedy
True
"""

from __future__ import annotations

import codecs
import sys
import warnings
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch

NEG_INF = float("-inf")


# ----------------------------------------------------------------------------------------
# What generate() and stream() return
# ----------------------------------------------------------------------------------------
@dataclass
class Completion:
    """The continuation of one prompt.

    token_ids holds the generated ids without the stop id that ended the row (if any);
    completion_tokens counts every token the model produced, that stop id included.
    """

    text: str  # the continuation only (a stop string is cut off, the prompt is not repeated)
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS / stop id / stop string) or "length" (max_new_tokens)
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Delta:
    """One streaming step: the text that became decodable with this token.

    ``text`` may be "" while a UTF-8 character is still incomplete or while the text could be
    the start of a stop string. The last Delta has a finish_reason; when the row ended on a
    stop id its token_id is None (the stop id is not part of the output). Joining every
    Delta's text gives the Completion's text.
    """

    text: str
    token_id: Optional[int]
    finish_reason: Optional[str] = None


# ----------------------------------------------------------------------------------------
# Sampling: each filter maps logits (..., V) to logits with the dropped tokens at -inf
# ----------------------------------------------------------------------------------------
@dataclass
class SamplingOptions:
    """How the next token is chosen from the logits. Validated on construction.

    >>> SamplingOptions(temperature=0.7, top_p=0.9).greedy
    False
    >>> SamplingOptions(top_p=1.5)
    Traceback (most recent call last):
    ...
    ValueError: top_p must be in (0, 1], got 1.5
    """

    temperature: float = 0.0  # 0: greedy (argmax); 1: the model's own distribution
    top_k: Optional[int] = None  # keep the k most likely tokens (None or 0: all)
    top_p: Optional[float] = None  # keep the smallest set holding probability >= top_p
    min_p: Optional[float] = None  # keep tokens with prob >= min_p * the top token's prob
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in prompt or output

    def __post_init__(self):
        t, k, p, m, r = self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty
        if not isinstance(t, (int, float)) or t != t or t < 0:
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {t}")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
            raise ValueError(f"top_k must be a positive integer (or 0/None for no limit), got {k}")
        if p is not None and not (0.0 < p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {p}")
        if m is not None and not (0.0 <= m <= 1.0):
            raise ValueError(f"min_p must be in [0, 1], got {m}")
        if not r > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {r}")

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
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of all more likely tokens
    drop_sorted = mass_before >= p  # the set was already complete before this token
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, NEG_INF)


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


def filter_logits(logits: torch.Tensor, options: SamplingOptions) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p, in that order. logits (B, V) float32."""
    logits = logits / options.temperature
    if options.top_k:
        logits = top_k_filter(logits, options.top_k)
    if options.top_p is not None:
        logits = top_p_filter(logits, options.top_p)
    if options.min_p:
        logits = min_p_filter(logits, options.min_p)
    return logits


def sample_next(logits: torch.Tensor, options: SamplingOptions, generator: Optional[torch.Generator] = None,
                seen: Optional[torch.Tensor] = None) -> torch.Tensor:
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
    choice = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
    if candidates is not None:
        choice = candidates.gather(-1, choice)
    return choice.squeeze(-1)


# ----------------------------------------------------------------------------------------
# Text as it arrives: UTF-8-safe, stop strings cut, possible stop prefixes held back
# ----------------------------------------------------------------------------------------
class TextAssembler:
    """Turns token ids into text one token at a time.

    A multi-byte character may be split across tokens, so bytes go through an incremental
    UTF-8 decoder that waits for the rest. Text that might be the beginning of a stop string
    is held back until it is clear it is not.
    """

    def __init__(self, tokenizer, stop_strings: Sequence[str]):
        self.tokenizer = tokenizer
        self.stops = [s for s in stop_strings if s]
        self.longest_stop = max((len(s) for s in self.stops), default=0)
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""  # everything decoded so far (cut at a stop string)
        self.sent = 0  # how many characters of text were handed out

    def _bytes(self, token_id: int) -> bytes:
        if hasattr(self.tokenizer, "decode_bytes"):
            return self.tokenizer.decode_bytes([token_id])
        return self.tokenizer.decode([token_id]).encode("utf-8")

    def add(self, token_id: int) -> tuple[str, bool]:
        """Add one token; return (text now safe to hand out, whether a stop string ended it)."""
        if self.tokenizer is None:
            return "", False
        old_length = len(self.text)
        self.text += self.utf8.decode(self._bytes(token_id))
        if self.stops:
            # A stop string completed by this token ends at or after old_length.
            start = max(0, old_length - self.longest_stop + 1)
            hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                return self._take(len(self.text)), True
        return self._take(len(self.text) - self._held_back()), False

    def _held_back(self) -> int:
        """Length of the longest end of the text that is the start of some stop string."""
        for n in range(min(self.longest_stop - 1, len(self.text)), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0

    def _take(self, end: int) -> str:
        end = max(end, self.sent)
        piece, self.sent = self.text[self.sent:end], end
        return piece

    def flush(self) -> str:
        """The row is over: whatever was held back is plain text after all."""
        if self.tokenizer is None:
            return ""
        self.text += self.utf8.decode(b"", final=True)
        return self._take(len(self.text))


# ----------------------------------------------------------------------------------------
# The decode loop
# ----------------------------------------------------------------------------------------
class _Decoder:
    """Runs the model over a left-padded batch: one prefill, then one cached step per token.

    Left padding lines the last prompt tokens up in one column, so every row's next token
    is read from position -1. Padding keys are masked out (cache.key_mask) and each row's
    positions start at 0 at its first real token, so a padded row computes what it would
    alone.
    """

    def __init__(self, model, rows: list[list[int]], max_new_tokens: int, options: SamplingOptions,
                 generator: Optional[torch.Generator], use_cache: bool):
        self.model, self.options, self.generator, self.use_cache = model, options, generator, use_cache
        device = model.tok_emb.weight.device
        B, T = len(rows), max(len(r) for r in rows)
        self.total = T + max_new_tokens  # longest sequence this batch can reach
        pad = torch.tensor([T - len(r) for r in rows], device=device)  # (B,)
        self.padded = bool((pad > 0).any())
        # ids (B, total): prompts right-aligned in the first T columns, outputs appended after.
        self.ids = torch.zeros(B, self.total, dtype=torch.long, device=device)
        for i, r in enumerate(rows):
            self.ids[i, T - len(r):T] = torch.tensor(r, dtype=torch.long)
        cols = torch.arange(self.total, device=device)
        self.key_mask = cols[None, :] >= pad[:, None]  # (B, total) True at real tokens
        self.positions = (cols[None, :] - pad[:, None]).clamp(min=0)  # (B, total) per-row positions
        self.length = T  # columns filled so far
        self.seen = None
        if options.repetition_penalty != 1.0:  # (B, V): tokens of prompt and output so far
            self.seen = torch.zeros(B, model.config.vocab_size, dtype=torch.bool, device=device)
            self.seen.scatter_(1, self.ids[:, :T], self.key_mask[:, :T])
        self.cache = None
        if use_cache:
            self.cache = model.new_cache(B, self.total)
            if self.padded:
                self.cache.key_mask = self.key_mask

    @torch.inference_mode()
    def first(self) -> torch.Tensor:
        """Prefill: read the prompts, return the first sampled ids (B,)."""
        return self._sample(self._forward(0, self.length))

    @torch.inference_mode()
    def next(self, previous: torch.Tensor) -> torch.Tensor:
        """Append the previous ids (B,), run one step, return the next ids (B,)."""
        self.ids[:, self.length] = previous
        self.length += 1
        if self.seen is not None:
            self.seen.scatter_(1, previous[:, None], True)
        start = self.length - 1 if self.use_cache else 0
        return self._sample(self._forward(start, self.length))

    def _forward(self, start: int, end: int) -> torch.Tensor:
        """Logits (B, V) of the last position, having fed columns [start, end)."""
        model, cache = self.model, self.cache
        positions = self.positions[:, start:end] if self.padded else None
        if not self.use_cache and self.padded:  # no cache, but the padding mask lives on a cache
            cache = model.new_cache(self.ids.shape[0], end)
            cache.key_mask = self.key_mask[:, :end]
        was_training = model.training
        if was_training:
            model.eval()
        try:
            hidden = model(self.ids[:, start:end], cache=cache, positions=positions, return_hidden=True)
        finally:
            if was_training:
                model.train()
        return model.lm_head(hidden[:, -1])  # only the last position's logits are needed

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        if self.seen is not None:
            return sample_next(logits, self.options, self.generator, self.seen)
        return sample_next(logits, self.options, self.generator)


def _encode_prompts(tokenizer, prompts) -> list[list[int]]:
    """str | list[str] | list[int] | list[list[int]] -> a list of id lists."""
    if isinstance(prompts, str):
        prompts = [prompts]
    elif isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist() if prompts.dim() == 2 else [prompts.tolist()]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    if all(isinstance(p, int) and not isinstance(p, bool) for p in prompts):
        prompts = [prompts]  # one prompt given as a flat list of ids
    rows = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if not p:
                raise ValueError(f"prompt {i} is empty: give at least one character or token")
            if tokenizer is None:
                raise ValueError("text prompts need a tokenizer (this model has none): pass token ids")
            ids = list(tokenizer.encode(p))  # special-token strings become their ids
        else:
            ids = [int(t) for t in p]
        if not ids:
            raise ValueError(f"prompt {i} is empty: give at least one token")
        rows.append(ids)
    return rows


def _check_length(rows: list[list[int]], max_new_tokens: int, context: int, overflow: str) -> list[list[int]]:
    if max_new_tokens >= context:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the "
                         f"context of {context} tokens")
    room = context - max_new_tokens  # the longest prompt that still fits
    longest = max(len(r) for r in rows)
    if longest <= room:
        return rows
    if overflow == "error":
        raise ValueError(f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the "
                         f"context length {context}: shorten the prompt or max_new_tokens "
                         f"(or cut the prompt from the left with overflow='truncate')")
    warnings.warn(f"prompt of {longest} tokens cut from the left to {room} so that "
                  f"max_new_tokens={max_new_tokens} fits the context of {context}", stacklevel=3)
    return [r[-room:] for r in rows]


def _events(model, tokenizer, prompts, *, max_new_tokens=64, temperature=0.0, top_k=None, top_p=None,
            min_p=None, repetition_penalty=1.0, seed=None, stop_token_ids=None, stop=None, use_cache=True,
            ignore_eos=False, generator=None, overflow="error"):
    """The one decode loop. First yields the prompt lengths (list[int]), then (row, Delta)
    events, each row's last one carrying its finish_reason."""
    options = SamplingOptions(temperature, top_k, top_p, min_p, repetition_penalty)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens}")
    if overflow not in ("error", "truncate"):
        raise ValueError(f"overflow must be 'error' or 'truncate', got {overflow!r}")
    if isinstance(stop, str):
        stop = [stop]
    rows = _check_length(_encode_prompts(tokenizer, prompts), max_new_tokens,
                         model.config.context_length, overflow)
    stop_ids = set(int(t) for t in (stop_token_ids or []))
    eot = getattr(tokenizer, "eot_id", None) if tokenizer is not None else None
    if eot is not None and not ignore_eos:
        stop_ids.add(int(eot))
    if generator is None and seed is not None:
        generator = torch.Generator(device=model.tok_emb.weight.device).manual_seed(int(seed))
    yield [len(r) for r in rows]
    if max_new_tokens == 0:
        for i in range(len(rows)):
            yield i, Delta("", None, "length")
        return

    texts = [TextAssembler(tokenizer, stop or []) for _ in rows]
    done = [False] * len(rows)
    decoder = _Decoder(model, rows, max_new_tokens, options, generator, use_cache)
    ids = decoder.first()
    for step in range(max_new_tokens):
        for i, token in enumerate(ids.tolist()):  # one sync per step for the whole batch
            if done[i]:
                continue
            if token in stop_ids:
                done[i] = True
                yield i, Delta(texts[i].flush(), None, "stop")
                continue
            piece, hit_stop = texts[i].add(token)
            if hit_stop or step == max_new_tokens - 1:
                done[i] = True
                yield i, Delta(piece + ("" if hit_stop else texts[i].flush()), token,
                               "stop" if hit_stop else "length")
            else:
                yield i, Delta(piece, token)
        if all(done):
            return
        ids = decoder.next(ids)


def generate(model, tokenizer, prompts, *, max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, min_p: Optional[float] = None,
             repetition_penalty: float = 1.0, seed: Optional[int] = None,
             stop_token_ids: Optional[Sequence[int]] = None, stop: Optional[Sequence[str]] = None,
             use_cache: bool = True, ignore_eos: bool = False, generator: Optional[torch.Generator] = None,
             overflow: str = "error") -> list[Completion]:
    """Continue each prompt; one Completion per prompt, always a list.

    prompts: a string, a list of strings, or token ids (a list of ints, or a list of lists;
        then the tokenizer may be None and the text fields are "").
    temperature: 0 picks the most likely token (greedy); above 0 samples from
        softmax(logits / temperature) after top_k / top_p / min_p filtering.
    seed: makes sampling repeatable (or pass your own torch.Generator as ``generator``).
    stop_token_ids, stop: ids and strings that end a row; the tokenizer's EOT id always
        does unless ignore_eos. A stop string is cut from the text.
    use_cache: False recomputes the whole sequence each step (slow; for comparison).
    overflow: when prompt + max_new_tokens exceeds the context: "error" (default) raises
        ValueError, "truncate" cuts the prompt from the left and warns.
    """
    events = _events(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                     top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
                     seed=seed, stop_token_ids=stop_token_ids, stop=stop, use_cache=use_cache,
                     ignore_eos=ignore_eos, generator=generator, overflow=overflow)
    prompt_lengths = next(events)
    texts = [[] for _ in prompt_lengths]
    ids: list[list[int]] = [[] for _ in prompt_lengths]
    produced = [0] * len(prompt_lengths)
    reasons = ["length"] * len(prompt_lengths)
    for i, delta in events:
        texts[i].append(delta.text)
        if delta.token_id is not None:
            ids[i].append(delta.token_id)
        if delta.token_id is not None or delta.finish_reason == "stop":
            produced[i] += 1
        if delta.finish_reason:
            reasons[i] = delta.finish_reason
    if max_new_tokens == 0:
        produced = [0] * len(prompt_lengths)
    return [Completion("".join(t), i, r, p, n)
            for t, i, r, p, n in zip(texts, ids, reasons, prompt_lengths, produced)]


def stream(model, tokenizer, prompt, **options) -> Iterator[Delta]:
    """Yield a Delta per generated token for one prompt; takes generate()'s options.

    >>> import torch
    >>> from scratchlm import ModelConfig, Transformer
    >>> model = Transformer(ModelConfig.preset("gpt-tiny")).eval()
    >>> deltas = list(stream(model, None, [5, 6], max_new_tokens=3))
    >>> [d.finish_reason for d in deltas]
    [None, None, 'length']
    """
    if not isinstance(prompt, str) and not all(isinstance(t, int) for t in prompt):
        raise ValueError("stream() takes one prompt (a string or a list of token ids)")
    events = _events(model, tokenizer, prompt, **options)
    next(events)  # validates the options and the prompt now, not at the first next()
    return (delta for _, delta in events)


# ----------------------------------------------------------------------------------------
# Command line: scratchlm generate / chat
# ----------------------------------------------------------------------------------------
def _add_sampling_options(p) -> None:
    p.add_argument("model", help="model directory, Hugging Face directory or id, or a preset (random weights)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="most tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; >0: sample")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample in the smallest set with this mass, in (0, 1]")
    p.add_argument("--min-p", type=float, default=None, help="drop tokens below min_p x the top probability")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help=">1 discourages repeats (default 1)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (repeatable output)")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop when this text appears (repeatable); it is not printed")
    p.add_argument("--no-cache", action="store_true", help="recompute every position each step (slow)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="run in this dtype (default: the checkpoint's)")
    p.add_argument("--weights", choices=["fp32", "bf16", "int8", "int8-dynamic"], default=None,
                   help="weight layout for decoding (see decode_weights.py); default: fp32 models get the "
                        "faster transposed fp32 layout, others stay as loaded")
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


def _options(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                use_cache=not args.no_cache, overflow="truncate" if args.truncate else "error")


def _load(args):
    from .decode_weights import prepare_for_decode

    dtype = getattr(torch, args.dtype) if args.dtype else None
    model, tokenizer = load_any(args.model, dtype=dtype)
    weights = args.weights or ("fp32" if model.tok_emb.weight.dtype == torch.float32 else None)
    if weights:
        prepare_for_decode(model, weights)
    return model, tokenizer


def _generate_command(args) -> int:
    from pathlib import Path

    from .chat import chat_stops, read_prompt_format, render_chat
    from .cli import UsageError

    options = _options(args)
    SamplingOptions(args.temperature, args.top_k, args.top_p, args.min_p, args.repetition_penalty)  # fail fast
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
    from .chat import chat_stops, render_chat, resolve_template
    from .cli import UsageError

    options = _options(args)
    SamplingOptions(args.temperature, args.top_k, args.top_p, args.min_p, args.repetition_penalty)
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


def load_any(model_ref, **options):
    """(model, tokenizer or None) from a model directory, a Hugging Face directory or id, or a
    preset; see scratchlm.load.load_any."""
    from .load import load_any as _load_any

    return _load_any(model_ref, **options)
