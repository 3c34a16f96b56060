"""The model worker: one thread runs the model for every request, batching them step by step.

Generation on a CPU is compute-bound, and PyTorch already spreads one forward pass over
the cores, so two threads running the model at once would only fight. Instead the HTTP
handlers put requests in a queue and one worker thread serves them all:

    HTTP handlers --submit()--> waiting queue --admit (FIFO, up to max_batch)--> running batch
                                                                                     |
    each step: prefill the newly admitted rows (together), then ONE forward pass of
    one token for every running row; sample each row's next token with its own options;
    send each row its new text; drop rows that finished, failed or were cancelled.
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

One bad row never fails its neighbours: each row's own work (its options, sampling,
decoding its token) runs on its own, and when a batched forward pass fails (a prompt that
breaks the model, out of memory) each of its rows runs again alone, so only the rows that
fail alone end with an error. How the rows share one KV cache is batch.py's docstring.

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

from ..decode_weights import greedy_ids, sampled_top_k_ids
from ..errors import ScratchLMError
from ..generate import StopRule, left_pad
from ..model import KVCache, check_token_ids
from ..sampling import SamplingOptions, sample_next
from .batch import RunningBatch

if TYPE_CHECKING:
    from ..model import Transformer
    from ..tokenizer.base import Tokenizer

log = logging.getLogger("scratchlm.serve")


FAILED = object()  # what Engine._row returns when a row's work raised (the row has ended)


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
                try:
                    if admitted:
                        self._start(admitted)
                    if self.batch.rows:
                        self._step()
                except Exception as e:  # noqa: BLE001 - a bug outside any one row: end the rows in
                    # flight, start again from an empty batch, and keep serving the queue
                    log.exception("the decode loop failed")
                    for seq in list(self.batch.rows) + admitted:
                        self._fail(seq, f"generation failed: {type(e).__name__}: {e}")
                    self.batch = RunningBatch(self.model, self.max_batch)
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

    def _row(self, seq: Sequence, fn, *args):
        """Run one row's own work (its options, its prefill alone, sampling and decoding its
        token); if that fails, only this row ends with an error and FAILED is returned: the
        rows beside it in the batch carry on."""
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - reported to the client, logged here
            self._fail_with(seq, e)
            return FAILED

    def _fail_with(self, seq: Sequence, e: Exception) -> None:
        log.error("generation failed for one sequence", exc_info=e)
        self.batch.remove([seq])
        self._fail(seq, f"generation failed: {type(e).__name__}: {e}")

    def _fail(self, seq: Sequence, message: str) -> None:
        if not seq.done.is_set():
            seq.emit(Event("", len(seq.generated), None, error=message))
            seq.done.set()

    def _start(self, sequences: list[Sequence]) -> None:
        """Prefill newly admitted sequences together, sample each one's first token, and let
        them join the running batch.

        Each row is isolated: its options are set up, its token sampled and decoded, on its
        own, so one bad row fails alone. If the batched prefill itself fails, each prompt is
        prefilled again alone, and only the ones that fail alone fail.
        """
        for seq in [s for s in sequences if s.cancelled]:
            seq.done.set()
        ready = [s for s in sequences if not s.cancelled and self._row(s, self._prepare, s) is not FAILED]
        if not ready:
            return
        try:
            logits, cache = self._prefill(ready)
        except Exception as e:  # noqa: BLE001 - find the prompt that broke it: the others still start
            if len(ready) == 1:
                self._fail_with(ready[0], e)
                return
            log.warning("a batched prefill failed (%s): prefilling its %d prompts one by one", e, len(ready))
            for seq in ready:
                alone = self._row(seq, self._prefill, [seq])
                if alone is not FAILED:
                    self._join(seq, *alone, 0)
            return
        for row, seq in enumerate(ready):
            self._join(seq, logits, cache, row)

    def _prepare(self, seq: Sequence) -> None:
        """One row's generator, stop rule and repetition-penalty mask."""
        p, model = seq.params, self.model
        device = model.tok_emb.weight.device
        if p.seed is not None:
            seq._generator = torch.Generator(device=device).manual_seed(int(p.seed))
        # A row also ends when the context is full: at most context - P tokens after a P-token prompt.
        seq._rule = StopRule(self.tokenizer, min(p.max_tokens, model.config.context_length - len(seq.prompt_ids)),
                             stop_token_ids=p.stop_token_ids, stop=p.stop)
        if p.repetition_penalty != 1.0:
            seq._seen = torch.zeros(1, model.config.vocab_size, dtype=torch.bool, device=device)
            seq._seen[0, seq.prompt_ids] = True

    def _prefill(self, sequences: list[Sequence]) -> tuple[torch.Tensor, KVCache]:
        """One forward pass over the prompts, left-padded to one length T by generate()'s
        left_pad (padding keys are masked out and each row's positions start at 0 at its
        first real token). Returns the last position's logits (B, V) and the cache."""
        model = self.model
        batch = left_pad([s.prompt_ids for s in sequences], device=model.tok_emb.weight.device)  # ids (B, T)
        cache = model.new_cache(len(sequences), batch.prompt_length, ring=False)  # copied by column
        positions = None
        if batch.padded:
            cache.key_mask, positions = batch.key_mask, batch.positions
        hidden = model(batch.ids, cache=cache, positions=positions, return_hidden=True)
        return model.lm_head(hidden[:, -1]), cache  # (B, V): only the last position matters

    def _join(self, seq: Sequence, logits: torch.Tensor, cache: KVCache, row: int) -> None:
        """Sample row ``row``'s first token from the prefill; unless that ended it, the row
        joins the running batch."""
        def first_token():
            if self._accept(seq, self._sample(seq, logits[row:row + 1])):
                self.batch.add(seq, cache, row)

        self._row(seq, first_token)

    def _step(self) -> None:
        """One decode step for every running row.

        The forward pass is batched; if it fails, each row runs the same step alone, so only
        a row that fails alone ends. Then each row samples and decodes its token on its own.
        """
        batch = self.batch
        cancelled = [s for s in batch.rows if s.cancelled]
        batch.remove(cancelled)
        for seq in cancelled:
            seq.done.set()
        if not batch.rows:
            return
        rows = list(batch.rows)
        try:
            batch.make_room()
        except Exception as e:  # noqa: BLE001 - no column for anyone (out of memory): all end
            for seq in rows:
                self._fail_with(seq, e)
            return
        try:
            per_row, greedy = self._head(rows, batch.forward(slice(0, len(rows)), return_hidden=True))
        except Exception as e:  # noqa: BLE001 - find the row that broke it
            log.warning("a batched decode step failed (%s): running its %d rows one by one", e, len(rows))
            per_row, broken = [], []
            for i, seq in enumerate(rows):
                try:
                    per_row.append(batch.forward(slice(i, i + 1)))
                except Exception as row_error:  # noqa: BLE001 - this row alone breaks the model
                    per_row.append(FAILED)
                    broken.append((seq, row_error))
            greedy = [None] * len(rows)
            batch.advance()
            for seq, row_error in broken:  # out of the batch only now: rows keep their places above
                self._fail_with(seq, row_error)
        else:
            batch.advance()
        self.steps += 1
        finished = []
        for seq, row_logits, token in zip(rows, per_row, greedy, strict=True):
            if row_logits is FAILED:
                continue  # ended above, and out of the batch
            if self._row(seq, self._next, seq, row_logits, token) in (False, FAILED):
                finished.append(seq)
        batch.remove(finished)

    def _head(self, rows: list[Sequence], hidden: torch.Tensor) -> tuple[list, list[int]]:
        """Each row's logits (1, V) and the batch's argmax, from the final hidden states (B, d).
        When every row is plainly greedy, the head's screen (decode_weights.greedy_ids) gives the
        argmax from its int8 copy and no logits are made (each row's are None, its token chosen);
        a lone row sampling with top-k draws from the screen's k largest logits likewise
        (decode_weights.sampled_top_k_ids), as generate() does."""
        head = self.model.lm_head
        if all(s._options.greedy and s._seen is None for s in rows):
            ids = greedy_ids(head, hidden)
            if ids is not None:
                return [None] * len(rows), ids.tolist()
        elif len(rows) == 1 and rows[0]._options.top_k and rows[0]._seen is None:
            ids = sampled_top_k_ids(head, hidden, rows[0]._options, rows[0]._generator)
            if ids is not None:
                return [None], ids.tolist()
        logits = head(hidden)  # (B, V)
        return [logits[i:i + 1] for i in range(len(rows))], logits.float().argmax(dim=-1).tolist()  # one sync

    def _next(self, seq: Sequence, logits: torch.Tensor | None, greedy: int | None) -> bool:
        return self._accept(seq, self._sample(seq, logits, greedy))

    def _sample(self, seq: Sequence, logits: torch.Tensor, greedy: int | None = None) -> int:
        """One row's next token from its logits (1, V) with its own options and generator.
        Greedy rows (the common case) take ``greedy``, the batch's argmax, when given; a row
        without logits takes ``greedy`` as the token the head's screen chose for it."""
        if logits is None:
            return greedy
        if seq._options.greedy and seq._seen is None:
            return greedy if greedy is not None else int(logits.float().argmax())
        return int(sample_next(logits, seq._options, seq._generator, seq._seen)[0])

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
