"""The decode loop: a prompt becomes a continuation, one token at a time.

    prompts --encode, check ids, left_pad--> ids (B, T), key mask, positions
    prefill: one forward over all T positions fills the KV cache -> logits of the last (B, V)
    repeat:  logits -> sample_next (sampling.py) -> next ids (B,)
             each row's StopRule: a stop id, a stop string, or max_new_tokens ends it
             next ids (B,) -> one cached forward step -> logits (B, V)
    until every row has ended.

Everything goes through one generator of events (``_events``): ``generate`` collects them
into one ``Completion`` per prompt, ``stream`` hands them out as ``Delta``s. The serving
engine (serve/engine.py) batches requests differently but shares ``left_pad``,
``StopRule`` and ``TextAssembler`` with this loop, so both end rows the same way.

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
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .compiled_decode import compile_decode_step
from .decode_weights import greedy_ids, sampled_top_k_ids
from .errors import ScratchLMError
from .model import check_token_ids
from .sampling import (  # noqa: F401 - sampling's names, re-exported for older imports
    NGramBlocker,
    SamplingOptions,
    apply_repetition_penalty,
    filter_logits,
    min_p_filter,
    sample_next,
    top_k_filter,
    top_p_filter,
)

if TYPE_CHECKING:
    from .model import Transformer
    from .tokenizer.base import Tokenizer

# What generate() accepts as prompts: one text, several, one list of ids, several, or a tensor.
Prompts = str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]] | torch.Tensor


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
    token_id: int | None
    finish_reason: str | None = None


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
        # Every proper start of a stop string: what the end of the text may be held back for.
        self.prefixes = {s[:n] for s in self.stops for n in range(1, len(s))}
        self.first_chars = {s[0] for s in self.stops if len(s) > 1}  # what a held-back end starts with
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""  # everything decoded so far (cut at a stop string)
        self.sent = 0  # how many characters of text were handed out
        self.token_bytes: dict[int, bytes] = {}  # this runs per token per row: each id decoded once

    def _bytes(self, token_id: int) -> bytes:
        piece = self.token_bytes.get(token_id)
        if piece is None:
            if hasattr(self.tokenizer, "decode_bytes"):
                piece = self.tokenizer.decode_bytes([token_id])
            else:
                piece = self.tokenizer.decode([token_id]).encode("utf-8")
            self.token_bytes[token_id] = piece
        return piece

    def add(self, token_id: int) -> tuple[str, bool]:
        """Add one token; return (text now safe to hand out, whether a stop string ended it)."""
        if self.tokenizer is None:
            return "", False
        old_length = len(self.text)
        self.text += self.utf8.decode(self._bytes(token_id))
        if self.stops:
            # A stop string completed by this token ends at or after old_length.
            start, hit = max(0, old_length - self.longest_stop + 1), -1
            for stop in self.stops:
                at = self.text.find(stop, start)
                if at >= 0 and (hit < 0 or at < hit):
                    hit = at
            if hit >= 0:
                self.text = self.text[:hit]
                return self._take(hit), True
        return self._take(len(self.text) - self._held_back()), False

    def _held_back(self) -> int:
        """Length of the longest end of the text that is the start of some stop string."""
        text, prefixes = self.text, self.prefixes  # one set lookup per length: this runs per token per row
        longest = min(self.longest_stop - 1, len(text))
        tail = text[len(text) - longest:]
        if not any(c in tail for c in self.first_chars):  # no stop string can start in the tail
            return 0
        for n in range(longest, 0, -1):
            if text[-n:] in prefixes:
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
# When a row ends: the one stop rule of generate() and the server
# ----------------------------------------------------------------------------------------
class StopRule:
    """Decides, token by token, when one row ends and what text it hands out.

    For each sampled token, in this order:
      1. a stop id (see stop_token_ids) ends the row, "stop"; the id is not part of the output;
      2. a stop string completed by the token ends it, "stop"; the string is cut from the text;
      3. the ``max_tokens``-th token (stop ids count) ends it, "length".
    The stop ids are ``stop_token_ids`` and the tokenizer's end-of-text id (unless
    ignore_eos). Otherwise the row goes on. ``add`` returns the text now safe to send (see TextAssembler)
    and the finish reason, or None.

    >>> class Chars:  # one character per id
    ...     eot_id = 0
    ...     def decode(self, ids): return "".join(chr(i) for i in ids)
    >>> rule = StopRule(Chars(), max_tokens=10, stop=["!"])
    >>> [rule.add(ord(c)) for c in "hi!"]
    [('h', None), ('i', None), ('', 'stop')]
    >>> rule = StopRule(Chars(), max_tokens=2)
    >>> rule.add(ord("a")), rule.add(0)  # the end-of-text id
    (('a', None), ('', 'stop'))
    """

    def __init__(self, tokenizer: Tokenizer | None, max_tokens: int, *, stop_token_ids: Sequence[int] = (),
                 stop: Sequence[str] = (), ignore_eos: bool = False):
        self.max_tokens = max_tokens
        self.stop_ids = {int(t) for t in stop_token_ids}
        eot = getattr(tokenizer, "eot_id", None) if tokenizer is not None else None
        if eot is not None and not ignore_eos:
            self.stop_ids.add(int(eot))
        self.text = TextAssembler(tokenizer, stop)
        self.produced = 0  # tokens sampled so far, a final stop id included

    def add(self, token: int) -> tuple[str, str | None]:
        """Take one sampled token: (text to send now, "stop" / "length" / None)."""
        self.produced += 1
        if token in self.stop_ids:
            return self.text.flush(), "stop"
        piece, hit_stop = self.text.add(token)
        if hit_stop:
            return piece, "stop"
        if self.produced >= self.max_tokens:
            return piece + self.text.flush(), "length"
        return piece, None


# ----------------------------------------------------------------------------------------
# A batch of prompts of different lengths
# ----------------------------------------------------------------------------------------
@dataclass
class PaddedBatch:
    """Prompts left-padded into one tensor; see left_pad."""

    ids: torch.Tensor  # (B, width) long: row i's prompt in columns [T - len_i, T), zeros elsewhere
    key_mask: torch.Tensor  # (B, width) bool: False at the padding on the left of each row
    positions: torch.Tensor  # (B, width) long: each row counts from 0 at its first real token
    prompt_length: int  # T, the longest prompt
    padded: bool  # some row is shorter than T (else key_mask and positions are not needed)


def left_pad(rows: Sequence[Sequence[int]], width: int | None = None,
             device: torch.device | str | None = None) -> PaddedBatch:
    """Line prompts up on the right so that every row's last token is in column T - 1.

    Left padding puts every row's next token in the same column, so one forward step serves
    the whole batch. The model must not see the padding: pass ``key_mask`` on the KV cache
    (padding keys are never attended) and ``positions`` (each row starts at position 0), and
    a padded row computes what it would alone. ``width`` (default T) leaves room for the
    tokens to come: columns T.. are zeros in ids, True in key_mask, and go on counting.

    >>> b = left_pad([[5, 6, 7], [8]], width=5)
    >>> b.ids.tolist(), b.padded
    ([[5, 6, 7, 0, 0], [0, 0, 8, 0, 0]], True)
    >>> b.key_mask.int().tolist(), b.positions.tolist()
    ([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], [[0, 1, 2, 3, 4], [0, 0, 0, 1, 2]])
    """
    T = max(len(r) for r in rows)
    width = T if width is None else width
    pad = torch.tensor([T - len(r) for r in rows])  # (B,)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):  # filled on the CPU, moved once
        ids[i, T - len(r):T] = torch.tensor(r, dtype=torch.long)
    columns = torch.arange(width)
    key_mask = columns[None, :] >= pad[:, None]  # (B, width)
    positions = (columns[None, :] - pad[:, None]).clamp(min=0)  # (B, width)
    return PaddedBatch(ids.to(device), key_mask.to(device), positions.to(device), T,
                       padded=any(len(r) < T for r in rows))


# ----------------------------------------------------------------------------------------
# The decode loop
# ----------------------------------------------------------------------------------------
class _Decoder:
    """Runs the model over a left-padded batch: one prefill, then one cached step per token."""

    def __init__(self, model: Transformer, rows: list[list[int]], max_new_tokens: int,
                 options: SamplingOptions, generator: torch.Generator | None, use_cache: bool,
                 compile: bool | str = False, no_repeat_ngram: int | None = None,
                 vocab_limit: int | None = None):
        self.model, self.options, self.generator, self.use_cache = model, options, generator, use_cache
        # A tokenizer with fewer ids than the model's vocabulary (rows padded to a round
        # number, or a mismatched tokenizer): only its ids are ever chosen.
        self.vocab_limit = vocab_limit if vocab_limit is not None and vocab_limit < model.config.vocab_size else None
        device = model.tok_emb.weight.device
        B = len(rows)
        T = max(len(r) for r in rows)
        # ids (B, total): prompts right-aligned in the first T columns, outputs appended after.
        batch = left_pad(rows, width=T + max_new_tokens, device=device)
        self.ids, self.key_mask, self.positions, self.padded = batch.ids, batch.key_mask, batch.positions, batch.padded
        self.length = T  # columns filled so far
        self.seen = None
        if options.repetition_penalty != 1.0:  # (B, V): tokens of prompt and output so far
            self.seen = torch.zeros(B, model.config.vocab_size, dtype=torch.bool, device=device)
            self.seen.scatter_(1, self.ids[:, :T], self.key_mask[:, :T])
        # no_repeat_ngram: the output's n-grams, kept on the host (one small sync per step).
        self.blocker = NGramBlocker(no_repeat_ngram, B) if no_repeat_ngram else None
        self.cache = None
        self.ring = not compile  # the compiled step indexes the buffers by column: no ring buffers there
        if use_cache:
            self.cache = model.new_cache(B, self.ids.shape[1], ring=self.ring)
            if self.padded:
                self.cache.key_mask = self.key_mask
        # Rows that repeat a prompt (n samples of one prompt, a GRPO group): the prefill reads each
        # distinct prompt once and copies its keys and values to the rows that repeat it.
        self.owner = None
        if use_cache:
            index: dict[tuple[int, ...], int] = {}
            owner = [index.setdefault(tuple(r), len(index)) for r in rows]
            if len(index) < B:
                firsts = {}
                for i, k in enumerate(owner):
                    firsts.setdefault(k, i)
                self.owner = torch.tensor(owner, device=device)
                self.distinct = torch.tensor(list(firsts.values()), device=device)  # each prompt's first row
        # Greedy or top-k sampling on plain logits (no penalty, no blocker): a head with a screen
        # (decode_weights.HeadScreen) gives the argmax, or the k largest logits, from an int8 copy of
        # itself and the exact logits of the few rows it leaves.
        self.screened = ((options.greedy or bool(options.top_k)) and self.seen is None and self.blocker is None
                         and getattr(model.lm_head, "screen", None) is not None)
        # compile: the one-token steps run through a compiled static-shape step (compiled_decode.py);
        # the prefill stays eager (its length changes from call to call).
        self.step = None
        if compile:
            self.step = compile_decode_step(model, "inductor" if compile is True else compile)
            self.column = torch.zeros(1, dtype=torch.long, device=device)  # the step's cache column

    @torch.inference_mode()
    def first(self) -> torch.Tensor:
        """Prefill: read the prompts, return the first sampled ids (B,)."""
        if self.owner is not None:
            return self._sample(self._shared_prefill())
        return self._pick(self._forward(0, self.length))

    def _shared_prefill(self) -> torch.Tensor:
        """The prefill's last-position logits (B, V), each distinct prompt computed once: its
        keys and values are copied into the cache rows of every row that repeats it."""
        model, rows, T = self.model, self.distinct, self.length
        cache = model.new_cache(len(rows), self.ids.shape[1], ring=self.ring)
        positions = None
        if self.padded:
            cache.key_mask = self.key_mask.index_select(0, rows)
            positions = self.positions[:, :T].index_select(0, rows)
        with _eval_mode(model):
            hidden = model(self.ids[:, :T].index_select(0, rows), cache=cache, positions=positions, return_hidden=True)
        for mine, theirs in zip(self.cache.k + self.cache.v, cache.k + cache.v):
            mine.copy_(theirs.index_select(0, self.owner))
        self.cache.length = cache.length
        return model.lm_head(hidden[:, -1]).index_select(0, self.owner)

    @torch.inference_mode()
    def next(self, previous: torch.Tensor) -> torch.Tensor:
        """Append the previous ids (B,), run one step, return the next ids (B,)."""
        self.ids[:, self.length] = previous
        self.length += 1
        if self.seen is not None:
            self.seen.scatter_(1, previous[:, None], True)
        if self.blocker is not None:
            self.blocker.add(previous)
        if self.step is not None:
            return self._sample(self._compiled_step(previous))
        start = self.length - 1 if self.use_cache else 0
        return self._pick(self._forward(start, self.length))

    def _forward(self, start: int, end: int) -> torch.Tensor:
        """Hidden states (B, d_model) of the last position, having fed columns [start, end)."""
        model, cache = self.model, self.cache
        positions = self.positions[:, start:end] if self.padded else None
        if not self.use_cache and self.padded:  # no cache, but the padding mask lives on a cache
            cache = model.new_cache(self.ids.shape[0], end)
            cache.key_mask = self.key_mask[:, :end]
        with _eval_mode(model):
            hidden = model(self.ids[:, start:end], cache=cache, positions=positions, return_hidden=True)
        return hidden[:, -1]  # only the last position's logits are needed

    def _compiled_step(self, previous: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) after feeding previous (B,) at column length - 1, through the compiled step."""
        cache = self.cache
        self.column.fill_(self.length - 1)  # in place: the step's inputs keep their identity and shape
        with _eval_mode(self.model):
            logits = self.step(previous[:, None], self.column, self.positions, self.key_mask, cache.k, cache.v)
        cache.length = self.length
        return logits

    def _pick(self, hidden: torch.Tensor) -> torch.Tensor:
        """The next ids (B,) from the last position's hidden states (B, d_model)."""
        if self.screened and self.options.greedy:
            ids = greedy_ids(self.model.lm_head, hidden, self.vocab_limit)
            if ids is not None:
                return ids
        elif self.screened and hidden.shape[0] == 1:
            # Top-k sampling draws from the k largest logits alone, as sample_next would. One row
            # only: the union of 8 rows' candidates (~100-250 each at k = 50 on SmolLM2's real
            # weights) mostly overflows, and the screen would be paid for nothing.
            ids = sampled_top_k_ids(self.model.lm_head, hidden, self.options, self.generator, self.vocab_limit)
            if ids is not None:
                return ids
        return self._sample(self.model.lm_head(hidden))

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        if self.blocker is not None:
            logits = self.blocker.apply(logits)
        if self.vocab_limit is not None:  # ids past the tokenizer's could never be decoded
            seen = None if self.seen is None else self.seen[:, :self.vocab_limit]
            return sample_next(logits[:, :self.vocab_limit], self.options, self.generator, seen)
        return sample_next(logits, self.options, self.generator, self.seen)


class _eval_mode:
    """Run a block with the model in eval mode (no dropout), restoring training mode after."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.was_training = model, model.training

    def __enter__(self):
        if self.was_training:
            self.model.eval()

    def __exit__(self, *exc):
        if self.was_training:
            self.model.train()


def encode_prompts(tokenizer: Tokenizer | None, prompts: Prompts, vocab_size: int) -> list[list[int]]:
    """str | list[str] | list[int] | list[list[int]] | tensor -> a list of id lists, each
    checked to lie in the model's vocabulary (forward does not check)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    elif isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist() if prompts.dim() == 2 else [prompts.tolist()]
    prompts = list(prompts)
    if not prompts:
        raise ScratchLMError("no prompts given")
    if all(isinstance(p, int) and not isinstance(p, bool) for p in prompts):
        prompts = [prompts]  # one prompt given as a flat list of ids
    rows = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if not p:
                raise ScratchLMError(f"prompt {i} is empty: give at least one character or token")
            if tokenizer is None:
                raise ScratchLMError("text prompts need a tokenizer (this model has none): pass token ids")
            ids = list(tokenizer.encode(p))  # special-token strings become their ids
        else:
            try:
                ids = [int(t) for t in p]
            except (TypeError, ValueError):
                raise ScratchLMError(f"prompt {i} is neither text nor a list of token ids") from None
        if not ids:
            raise ScratchLMError(f"prompt {i} is empty: give at least one token")
        try:
            check_token_ids(ids, vocab_size)
        except ScratchLMError as e:
            raise ScratchLMError(f"prompt {i}: {e}") from None
        rows.append(ids)
    return rows


def _check_length(rows: list[list[int]], max_new_tokens: int, context: int, overflow: str) -> list[list[int]]:
    if max_new_tokens >= context:
        raise ScratchLMError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the "
                             f"context of {context} tokens")
    room = context - max_new_tokens  # the longest prompt that still fits
    longest = max(len(r) for r in rows)
    if longest <= room:
        return rows
    if overflow == "error":
        raise ScratchLMError(f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the "
                             f"context length {context}: shorten the prompt or max_new_tokens "
                             f"(or cut the prompt from the left with overflow='truncate')")
    warnings.warn(f"prompt of {longest} tokens cut from the left to {room} so that "
                  f"max_new_tokens={max_new_tokens} fits the context of {context}", stacklevel=3)
    return [r[-room:] for r in rows]


def _events(model, tokenizer, prompts, *, max_new_tokens=64, temperature=0.0, top_k=None, top_p=None,
            min_p=None, repetition_penalty=1.0, seed=None, stop_token_ids=None, stop=None, use_cache=True,
            ignore_eos=False, generator=None, overflow="error", compile=False, no_repeat_ngram=None):
    """The one decode loop. First yields the prompt lengths (list[int]), then (row, Delta)
    events, each row's last one carrying its finish_reason."""
    options = SamplingOptions(temperature, top_k, top_p, min_p, repetition_penalty)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ScratchLMError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens}")
    if overflow not in ("error", "truncate"):
        raise ScratchLMError(f"overflow must be 'error' or 'truncate', got {overflow!r}")
    if compile is not False and not (compile is True or (isinstance(compile, str) and compile)):
        raise ScratchLMError(f"compile must be True, False or a torch.compile backend name, got {compile!r}")
    if no_repeat_ngram:
        NGramBlocker(no_repeat_ngram, 0)  # validates it
    if compile and not use_cache:
        raise ScratchLMError("compile needs the KV cache: the compiled step is the cached one-token step")
    if isinstance(stop, str):
        stop = [stop]
    config = model.config
    rows = _check_length(encode_prompts(tokenizer, prompts, config.vocab_size), max_new_tokens,
                         config.context_length, overflow)
    if generator is None and seed is not None:
        generator = torch.Generator(device=model.tok_emb.weight.device).manual_seed(int(seed))
    rules = [StopRule(tokenizer, max_new_tokens, stop_token_ids=stop_token_ids or (), stop=stop or (),
                      ignore_eos=ignore_eos) for _ in rows]
    yield [len(r) for r in rows]
    if max_new_tokens == 0:
        for i in range(len(rows)):
            yield i, Delta("", None, "length")
        return

    done = [False] * len(rows)
    decoder = _Decoder(model, rows, max_new_tokens, options, generator, use_cache, compile, no_repeat_ngram,
                       vocab_limit=getattr(tokenizer, "vocab_size", None))
    ids = decoder.first()
    while True:
        for i, token in enumerate(ids.tolist()):  # one sync per step for the whole batch
            if done[i]:
                continue
            text, reason = rules[i].add(token)
            done[i] = reason is not None
            yield i, Delta(text, None if token in rules[i].stop_ids else token, reason)
        if all(done):
            return
        ids = decoder.next(ids)


def generate(model: Transformer, tokenizer: Tokenizer | None, prompts: Prompts, *, max_new_tokens: int = 64,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             min_p: float | None = None, repetition_penalty: float = 1.0, seed: int | None = None,
             stop_token_ids: Sequence[int] | None = None, stop: str | Sequence[str] | None = None,
             use_cache: bool = True, ignore_eos: bool = False, generator: torch.Generator | None = None,
             overflow: str = "error", compile: bool | str = False,
             no_repeat_ngram: int | None = None) -> list[Completion]:
    """Continue each prompt; one Completion per prompt, always a list.

    prompts: a string, a list of strings, or token ids (a list of ints, or a list of lists;
        then the tokenizer may be None and the text fields are ""). Ids outside the model's
        vocabulary are a ScratchLMError.
    temperature: 0 picks the most likely token (greedy); above 0 samples from
        softmax(logits / temperature) after top_k / top_p / min_p filtering.
    seed: makes sampling repeatable (or pass your own torch.Generator as ``generator``).
    stop_token_ids, stop: ids and strings that end a row; the tokenizer's EOT id always
        does unless ignore_eos. A stop string is cut from the text (see StopRule).
    use_cache: False recomputes the whole sequence each step (slow; for comparison).
    no_repeat_ngram: n > 0 never lets a row write the same n tokens twice in its output
        (sampling.NGramBlocker); None or 0: off.
    overflow: when prompt + max_new_tokens exceeds the context: "error" (default) raises
        ScratchLMError, "truncate" cuts the prompt from the left and warns.
    compile: True runs each one-token step through torch.compile (inductor) with a static
        KV cache (compiled_decode.py); a string names another torch.compile backend. The
        first call compiles (slow); the same batch size and lengths reuse the graph.
    """
    events = _events(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                     top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
                     seed=seed, stop_token_ids=stop_token_ids, stop=stop, use_cache=use_cache,
                     ignore_eos=ignore_eos, generator=generator, overflow=overflow, compile=compile,
                     no_repeat_ngram=no_repeat_ngram)
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
            for t, i, r, p, n in zip(texts, ids, reasons, prompt_lengths, produced, strict=True)]


def stream(model: Transformer, tokenizer: Tokenizer | None, prompt: str | Sequence[int],
           **options) -> Iterator[Delta]:
    """Yield a Delta per generated token for one prompt; takes generate()'s options.

    >>> import torch
    >>> from scratchlm import ModelConfig, Transformer
    >>> model = Transformer(ModelConfig.preset("gpt-tiny")).eval()
    >>> deltas = list(stream(model, None, [5, 6], max_new_tokens=3))
    >>> [d.finish_reason for d in deltas]
    [None, None, 'length']
    """
    if not isinstance(prompt, str) and not all(isinstance(t, int) for t in prompt):
        raise ScratchLMError("stream() takes one prompt (a string or a list of token ids)")
    events = _events(model, tokenizer, prompt, **options)
    next(events)  # validates the options and the prompt now, not at the first next()
    return (delta for _, delta in events)
