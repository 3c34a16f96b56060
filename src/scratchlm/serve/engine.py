"""The model worker: one thread runs the model for every request, batching them step by step.

Generation on a CPU is compute-bound, and PyTorch already spreads one forward pass over
the cores, so two threads running the model at once would only fight. Instead the HTTP
handlers put requests in a queue and one worker thread serves them all:

    HTTP handlers --submit()--> waiting queue --admit (FIFO, up to max_batch)--> running batch
                                                                                     |
    each step: prefill the newly admitted rows (together), then ONE forward pass of
    one token for every running row; sample each row's next token with its own options;
    send each row its new text; drop rows that finished or were cancelled.
                                                                                     |
    HTTP handlers <--events (thread-safe callbacks)--------------------------------- +

This is *continuous batching*: a request joins the running batch at the next step after
it arrives and leaves as soon as it is done, instead of waiting for a whole batch to
finish. A decode step of B rows costs little more than a step of one row while the model
is small enough that per-step overhead dominates (benchmarks/serve_load.py measures it:
see docs/serving.md), so batching multiplies throughput; ``max_batch=1`` gives plain
first-in-first-out serving.

The rows end by generate()'s rule (``StopRule``: a stop id, a stop string, max_tokens,
or here also the end of the context) and newly admitted prompts are padded by its
``left_pad``, so the server answers what ``generate`` would.

How rows of different lengths share one KV cache: every row's keys sit *right-aligned*
in the cache, ending at the column the next step writes (``cache.length``). A row with u
tokens so far owns columns [length - u, length); ``cache.key_mask`` hides the columns to
the left of it, and each row passes its own position ids, so a row computes what it
would compute alone. When a row joins, its prompt's keys (from its own prefill) are
copied in; when the cache's columns run out, it grows, or at the context length all rows
slide left together over the columns none of them uses any more.

>>> import torch
>>> from scratchlm import ModelConfig, Transformer
>>> _ = torch.manual_seed(0)
>>> model = Transformer(ModelConfig.preset("gpt-tiny")).eval()
>>> engine = Engine(model, tokenizer=None, max_batch=4).start()
>>> events = []
>>> seq = Sequence([1, 2, 3], SamplingParams(max_tokens=5), events.append)
>>> engine.submit([seq]); seq.done.wait(10)
True
>>> events[-1].finish_reason, events[-1].completion_tokens
('length', 5)
>>> engine.close()
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..errors import ScratchLMError
from ..generate import StopRule, left_pad
from ..model import KVCache, check_token_ids
from ..sampling import SamplingOptions, sample_next

if TYPE_CHECKING:
    from ..model import Transformer
    from ..tokenizer.base import Tokenizer

log = logging.getLogger("scratchlm.serve")


class QueueFull(Exception):
    """More requests are waiting than the server accepts (answered with HTTP 429)."""


@dataclass
class SamplingParams:
    """What one choice of one request asks for. Checked by the HTTP layer beforehand."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # strings that end the text (and are cut)
    stop_token_ids: list[int] = field(default_factory=list)  # ids that end it (EOT is added)

    def options(self) -> SamplingOptions:
        return SamplingOptions(self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty)


@dataclass
class Event:
    """What the worker tells a sequence's owner: new text, and at the end why it stopped.

    An ``error`` event ends the sequence too (finish_reason is None then).
    """

    text: str
    completion_tokens: int  # tokens produced so far (a final stop id included, as generate() counts)
    finish_reason: str | None = None
    error: str | None = None


class Sequence:
    """One choice being generated: its prompt, its tokens so far, where its events go.

    ``emit`` is called from the worker thread; the HTTP layer passes a function that hands
    the event over to its event loop. ``cancel()`` may be called from any thread: the worker
    drops the row before its next step.
    """

    def __init__(self, prompt_ids: list[int], params: SamplingParams, emit: Callable[[Event], None]):
        if not prompt_ids:
            raise ScratchLMError("a prompt needs at least one token")
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.emit = emit
        self.generated: list[int] = []  # sampled ids, in order (a final stop id included)
        self.cancelled = False
        self.done = threading.Event()  # set once the last event was emitted (or on cancel)
        self._options = params.options()
        self._generator: torch.Generator | None = None
        self._rule: StopRule | None = None  # when the row ends (set when it starts)
        self._seen: torch.Tensor | None = None  # (1, V) for the repetition penalty

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def cached_tokens(self) -> int:
        """How many of this row's tokens are in the KV cache: the prompt and every sampled
        token but the last (which is the input of the next step)."""
        return len(self.prompt_ids) + max(len(self.generated) - 1, 0)


class Engine:
    """The queue and the worker thread. ``submit`` from any thread; events come back through
    each Sequence's ``emit``.

    max_batch: rows decoded together (1 = one at a time, first come first served).
    max_queue: sequences allowed to wait for a row; ``submit`` raises QueueFull past it.
    """

    def __init__(self, model: Transformer, tokenizer: Tokenizer | None, *, max_batch: int = 16,
                 max_queue: int = 64):
        if max_batch < 1 or max_queue < 1:
            raise ScratchLMError("max_batch and max_queue must be at least 1")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self._waiting: deque[Sequence] = deque()
        self._wakeup = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="scratchlm-model", daemon=True)
        self.batch = RunningBatch(model, max_batch)
        self.steps = 0  # decode steps run (for /health and tests)
        self._warm_up()

    def _warm_up(self) -> None:
        """One tiny forward pass now, on the creating thread.

        It moves the one-time costs (kernel selection, allocator growth, thread-pool start)
        out of the first request's time to first token. It also sidesteps a measured
        slowdown: when only the worker thread ever ran PyTorch, decoding on a busy 2-core
        machine was 10-20x slower (OpenMP helper threads spinning while the worker needed
        the core); with a thread pool started on this thread too, OpenMP spins less.
        """
        device = self.model.tok_emb.weight.device
        with torch.inference_mode():
            self.model(torch.zeros(1, 1, dtype=torch.long, device=device))

    # ---- the HTTP side -------------------------------------------------------------------
    def start(self) -> Engine:
        self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        with self._wakeup:
            self._closed = True
            self._wakeup.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, sequences: list[Sequence]) -> None:
        """Queue all of ``sequences`` (one request's choices), or none of them.

        A prompt id outside the vocabulary is a ScratchLMError here, not a failed step later.
        """
        for seq in sequences:
            check_token_ids(seq.prompt_ids, self.model.config.vocab_size)
        with self._wakeup:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) + len(sequences) > self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (limit {self.max_queue})")
            self._waiting.extend(sequences)
            self._wakeup.notify()

    def cancel(self, sequences: list[Sequence]) -> None:
        """Stop generating for ``sequences`` (from any thread): dropped before the next step."""
        for seq in sequences:
            seq.cancel()
        with self._wakeup:
            self._wakeup.notify()

    @property
    def queued(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        """Rows in the running batch right now."""
        return len(self.batch.rows)

    # ---- the worker thread ---------------------------------------------------------------
    def _work(self) -> None:
        with torch.inference_mode():
            while True:
                admitted = self._wait_for_work()
                if admitted is None:
                    break
                if admitted and not self._guard(admitted, self._start, admitted, quiet=len(admitted) > 1):
                    for seq in admitted:  # find the one that failed: the others still start
                        if seq.generated:  # it already sent its first token: it cannot restart
                            self._fail(seq, "generation failed while starting")
                        else:
                            self._guard([seq], self._start, [seq])
                if self.batch.rows:
                    self._guard(list(self.batch.rows), self._step)
        for seq in list(self.batch.rows) + list(self._waiting):  # shutting down: end everyone
            self._fail(seq, "the server is shutting down")

    def _wait_for_work(self) -> list[Sequence] | None:
        """Block until there is something to do; take waiting sequences (FIFO) into free rows."""
        with self._wakeup:
            while True:
                for seq in [s for s in self._waiting if s.cancelled]:
                    self._waiting.remove(seq)
                    seq.done.set()
                if self._closed:
                    return None
                if self._waiting or self.batch.rows:
                    break
                self._wakeup.wait()
            free = self.max_batch - len(self.batch.rows)
            return [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]

    def _guard(self, sequences: list[Sequence], fn, *args, quiet: bool = False) -> bool:
        """Run one unit of work; if it fails, end the sequences involved with an error instead
        of killing the worker (the server keeps serving everyone else). ``quiet``: on failure
        only undo, and let the caller retry the sequences one by one."""
        try:
            fn(*args)
            return True
        except Exception as e:  # noqa: BLE001 - reported to the client, logged here
            self.batch.remove([s for s in sequences if s in self.batch.rows])
            if quiet:
                return False
            log.exception("generation failed")
            for seq in sequences:
                self._fail(seq, f"generation failed: {type(e).__name__}: {e}")
            return False

    def _fail(self, seq: Sequence, message: str) -> None:
        if not seq.done.is_set():
            seq.emit(Event("", len(seq.generated), None, error=message))
            seq.done.set()

    def _start(self, sequences: list[Sequence]) -> None:
        """Prefill newly admitted sequences together, sample each one's first token, and let
        them join the running batch.

        The prompts are left-padded to one length T by generate()'s left_pad: padding keys
        are masked out and each row's positions start at 0 at its first real token.
        """
        for seq in [s for s in sequences if s.cancelled]:
            seq.done.set()
        sequences = [s for s in sequences if not s.cancelled]
        if not sequences:
            return
        model = self.model
        device = model.tok_emb.weight.device
        context = model.config.context_length
        for seq in sequences:
            p = seq.params
            if p.seed is not None:
                seq._generator = torch.Generator(device=device).manual_seed(int(p.seed))
            # A row also ends when the context is full: at most context - P tokens after a P-token prompt.
            seq._rule = StopRule(self.tokenizer, min(p.max_tokens, context - len(seq.prompt_ids)),
                                 stop_token_ids=p.stop_token_ids, stop=p.stop)
            if p.repetition_penalty != 1.0:
                seq._seen = torch.zeros(1, model.config.vocab_size, dtype=torch.bool, device=device)
                seq._seen[0, seq.prompt_ids] = True
        batch = left_pad([s.prompt_ids for s in sequences], device=device)  # ids (B, T)
        cache = model.new_cache(len(sequences), batch.prompt_length, ring=False)  # copied by column
        positions = None
        if batch.padded:
            cache.key_mask, positions = batch.key_mask, batch.positions
        hidden = model(batch.ids, cache=cache, positions=positions, return_hidden=True)
        logits = model.lm_head(hidden[:, -1])  # (B, V): only the last position matters
        for row, (seq, token) in enumerate(zip(sequences, self._sample(sequences, logits), strict=True)):
            if self._accept(seq, token):
                self.batch.add(seq, cache, row)

    def _step(self) -> None:
        """One decode step for every running row."""
        batch = self.batch
        cancelled = [s for s in batch.rows if s.cancelled]
        batch.remove(cancelled)
        for seq in cancelled:
            seq.done.set()
        if not batch.rows:
            return
        logits = batch.step()  # (B, V)
        self.steps += 1
        tokens = self._sample(batch.rows, logits)
        finished = [seq for seq, token in zip(list(batch.rows), tokens, strict=True) if not self._accept(seq, token)]
        batch.remove(finished)

    def _sample(self, rows: list[Sequence], logits: torch.Tensor) -> list[int]:
        """Each row's next token with its own options. Greedy rows (the common case) are
        decided together with one argmax; sampled rows each draw from their own generator."""
        tokens = logits.float().argmax(dim=-1).tolist()
        for i, seq in enumerate(rows):
            if not seq._options.greedy or seq._seen is not None:
                tokens[i] = int(sample_next(logits[i:i + 1], seq._options, seq._generator, seq._seen)[0])
        return tokens

    def _accept(self, seq: Sequence, token: int) -> bool:
        """Record a sampled token, send the text it completes; False when the row is done.

        The row's StopRule decides (generate()'s rule): a stop id (EOT or a requested one)
        ends the row and is not part of the text; a stop string ends it and is cut off;
        otherwise the row ends at max_tokens or when the context is full.
        """
        seq.generated.append(token)
        if seq._seen is not None:
            seq._seen[0, token] = True
        text, reason = seq._rule.add(token)
        if reason is not None:
            return self._finish(seq, text, reason)
        if text:
            seq.emit(Event(text, len(seq.generated)))
        return True

    def _finish(self, seq: Sequence, text: str, reason: str) -> bool:
        seq.emit(Event(text, len(seq.generated), reason))
        seq.done.set()
        return False


class RunningBatch:
    """The KV cache of every row in flight, side by side and right-aligned (see the module
    docstring). Row i of the cache belongs to ``rows[i]``.

    ``cache`` holds ``allocated`` rows and ``columns`` positions, both grown by doubling
    (up to max_batch and the context length) and never shrunk, so a model with a 128k
    context does not reserve 128k positions per row for short chats. Its ``key_mask``
    (allocated, columns) is True at each row's keys. The model sees ``cache.view`` of the
    first B rows, so its writes land in the buffers. A row that leaves is replaced by the
    last row (one row copied): the rows in use are always the first B and nothing else moves.
    """

    def __init__(self, model: Transformer, max_batch: int, columns: int = 256):
        self.model, self.max_batch = model, max_batch
        self.context = model.config.context_length
        self.initial_columns = min(columns, self.context)
        self.rows: list[Sequence] = []
        self.length = 0  # the column the next step writes; every row's keys end just before it
        self.allocated, self.columns = 0, 0
        self.cache: KVCache | None = None  # the buffers, made by the first _reserve

    def add(self, seq: Sequence, prefill: KVCache, row: int = 0) -> None:
        """Append a row whose prompt is row ``row`` of ``prefill`` (a cache of left-padded
        prompts: this one's P positions are its last P columns)."""
        P, B, T = len(seq.prompt_ids), len(self.rows), prefill.length
        self._reserve(B + 1, max(P, self.length))
        if not self.rows:
            self.length = P
        elif self.length < P:  # not enough columns to the left of the others: shift them right
            self._shift(P - self.length)
        end, cache = self.length, self.cache
        for layer in range(len(prefill.k)):
            cache.k[layer][B, :, end - P:end] = prefill.k[layer][row, :, T - P:T]
            cache.v[layer][B, :, end - P:end] = prefill.v[layer][row, :, T - P:T]
        cache.key_mask[B] = False
        cache.key_mask[B, end - P:end] = True
        self.rows.append(seq)

    def remove(self, leaving: list[Sequence]) -> None:
        for seq in leaving:
            if seq not in self.rows:
                continue
            i, last = self.rows.index(seq), len(self.rows) - 1
            if i != last:  # move the last row into the hole
                for t in self.cache.k + self.cache.v + [self.cache.key_mask]:
                    t[i] = t[last]
                self.rows[i] = self.rows[last]
            self.rows.pop()
        if not self.rows:
            self.length = 0

    def step(self) -> torch.Tensor:
        """Feed every row its last sampled token; return the next logits (B, V)."""
        if self.length == self.columns:  # no column left for this step
            unused = self.length - max(s.cached_tokens for s in self.rows)  # on the left, by every row
            if self.columns < self.context and unused < self.columns // 4:
                self._reserve(len(self.rows), self.columns + 1)  # room is cheap: grow
            else:
                self._shift(-unused)  # at the context limit (or plenty unused): slide left
        B, device = len(self.rows), self.cache.key_mask.device
        ids = torch.tensor([[s.generated[-1]] for s in self.rows], dtype=torch.long, device=device)
        positions = torch.tensor([[s.cached_tokens] for s in self.rows], dtype=torch.long, device=device)
        self.cache.key_mask[:B, self.length] = True  # the column this step writes
        view = self.cache.view(slice(0, B), length=self.length)  # the first B rows, written in place
        hidden = self.model(ids, cache=view, positions=positions, return_hidden=True)
        self.length = view.length
        return self.model.lm_head(hidden[:, -1])

    # ---- buffers ---------------------------------------------------------------------------
    def _reserve(self, rows: int, columns: int) -> None:
        """Make room for at least ``rows`` rows and ``columns`` columns (doubling what is there)."""
        if rows <= self.allocated and columns <= self.columns:
            return
        new_rows = self.allocated if rows <= self.allocated else min(self.max_batch, max(rows, 2 * self.allocated))
        new_columns = self.columns if columns <= self.columns else min(
            self.context, max(columns, 2 * self.columns, self.initial_columns))
        fresh = self.model.new_cache(new_rows, new_columns, ring=False)  # zeros in the model's dtype and device
        fresh.key_mask = torch.zeros(new_rows, new_columns, dtype=torch.bool, device=fresh.k[0].device)
        if self.cache is not None:  # keys stay in the same rows and columns: the first r, c
            r, c = self.allocated, self.columns
            for old, new in zip(self.cache.k + self.cache.v, fresh.k + fresh.v, strict=True):
                new[:r, :, :c] = old  # (rows, n_kv_heads, columns, head_dim)
            fresh.key_mask[:r, :c] = self.cache.key_mask
        self.cache = fresh
        self.allocated, self.columns = new_rows, new_columns

    def _shift(self, by: int) -> None:
        """Move every row's columns ``by`` to the right (by > 0) or left (by < 0)."""
        B, L = len(self.rows), self.length
        lo = max(0, -by)  # columns [lo, L) survive a left shift; all of them a right one
        for t in self.cache.k + self.cache.v:
            t[:B, :, lo + by:L + by] = t[:B, :, lo:L].clone()
        mask = self.cache.key_mask
        moved = mask[:B, lo:L].clone()
        mask[:B] = False
        mask[:B, lo + by:L + by] = moved
        self.length = L + by
