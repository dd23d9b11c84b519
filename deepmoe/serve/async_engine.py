"""The bridge between asyncio request handlers and the engine, which is not thread-safe.

One background thread owns the `LLMEngine`. Handlers never touch it: submissions and aborts go into a
thread-safe inbox that the thread drains between steps (blocking on it when idle, so an idle server burns
no CPU), and results come back through `loop.call_soon_threadsafe` into each request's asyncio.Queue.

A step may add 0, 1 or several tokens to a sequence (speculative decoding), so streamed text is computed
from the text so far (all completion ids decoded, minus a trailing incomplete UTF-8 character) minus what
was already sent. Any tail that could be the start of a stop string is held back until it is known not to
be one: no stop text is ever streamed, and the concatenated stream equals the non-streamed text.

Failures stay with their request: a sequence the engine finished with "error" (see LLMEngine.step), or an
exception while detokenising one request's output, ends that request (a 500, or an error event mid-stream)
and no other. The waiting queue is bounded: a request that would take it past `max_waiting_seqs` sequences
is refused with a 503 and `Retry-After`, before it costs anything.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from ..engine.detokenizer import decode_stable, streamable
from ..engine.llm import LLMEngine
from ..engine.sequence import SamplingParams, Sequence
from .metrics import ServerMetrics
from .protocol import APIError

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1  # a full queue drains at the engine's pace: a client may try again after this many seconds


@dataclass
class TokenLogprob:
    token_id: int
    offset: int  # where the token's text starts in the completion text
    logprobs: dict[int, float]  # the chosen token first, then the top alternatives


@dataclass
class Delta:
    """New output of one choice since the last delta: text to append, logprobs of the tokens it covers."""
    index: int
    text: str
    logprobs: list[TokenLogprob]
    finish_reason: str | None = None
    num_tokens: int = 0  # completion tokens, set once finished


class _SequenceFailed(Exception):
    """A sequence the engine finished with "error"; the message is the engine's reason."""


@dataclass
class _Choice:
    """One sequence of a request, as the engine thread tracks it."""
    seq: Sequence
    index: int  # the OpenAI choice index: prompt number × n + sample number
    sample: int  # the sample number, which the engine adds to the seed
    sent: str = ""
    num_tokens: int = 0
    starts: list[int] = field(default_factory=list)  # text offset of each completion token
    num_logprobs_sent: int = 0
    done: bool = False


@dataclass
class _Request:
    id: str
    prompts: list[list[int]]
    params: SamplingParams
    stream: bool
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    arrival: float = field(default_factory=time.perf_counter)
    choices: list[_Choice] = field(default_factory=list)

    def post(self, kind: str, payload=None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, payload))
        except RuntimeError:  # the event loop is closed: the server is gone, nobody is listening
            pass


class Stream:
    """A submitted request, seen from asyncio: iterate for lists of deltas; abort() when the client leaves."""

    def __init__(self, request: _Request, inbox: queue.Queue):
        self._req, self._inbox = request, inbox
        self.finished = self.aborted = False

    def __aiter__(self):
        return self

    async def __anext__(self) -> list[Delta]:
        if self.finished:
            raise StopAsyncIteration
        kind, payload = await self._req.queue.get()
        if kind == "end":
            self.finished = True
            raise StopAsyncIteration
        if kind == "error":
            self.finished = True
            raise payload
        return payload

    def abort(self) -> None:
        """Free the request's engine resources (a no-op once finished) and end iteration."""
        if not self.finished:
            self.finished = self.aborted = True
            self._inbox.put(("abort", self._req))
            self._req.queue.put_nowait(("end", None))  # wake a reader blocked on the queue


class AsyncEngine:
    def __init__(self, engine: LLMEngine, metrics: ServerMetrics, max_waiting_seqs: int):
        self.engine, self.metrics, self.max_waiting_seqs = engine, metrics, max_waiting_seqs
        self.tokenizer = engine.tokenizer
        self._inbox: queue.Queue = queue.Queue()
        self._live: dict[str, _Request] = {}
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None

    # ---- asyncio side ----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="deepmoe-engine", daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        if self._thread is not None:
            self._inbox.put(("stop", None))
            self._thread.join()
            self._thread = None

    def cut(self, message: str) -> None:
        """End every request in flight with a 503 saying `message` (thread-safe); the engine keeps running."""
        self._inbox.put(("cut", message))

    async def submit(self, prompts: list[list[int]], params: SamplingParams, stream: bool) -> Stream:
        """Queue a request (each prompt × params.n choices); returns once the engine accepted it. Raises
        APIError(400) if the engine rejects it (a prompt too long for the context or the cache)."""
        if self._thread is None:
            raise APIError(503, "the engine is not running")
        req = _Request(str(next(self._ids)), prompts, params, stream, asyncio.get_running_loop(), asyncio.Queue())
        handle = Stream(req, self._inbox)
        self._inbox.put(("add", req))
        try:
            kind, payload = await req.queue.get()
        except asyncio.CancelledError:  # the client left before the engine even saw the request
            handle.abort()
            raise
        if kind == "error":
            raise payload
        return handle

    # ---- engine thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        sched = self.engine.scheduler
        while True:
            commands = [self._inbox.get()] if not sched.has_unfinished() else []
            while True:
                try:
                    commands.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            if any(kind == "stop" for kind, _ in commands):
                self._fail_all(503, "the server is shutting down")
                for kind, req in commands:
                    if kind == "add":
                        req.post("error", APIError(503, "the server is shutting down"))
                return
            try:
                for kind, payload in commands:
                    if kind == "add":
                        self._add(payload)
                    elif kind == "abort":
                        self._abort(payload)
                    elif kind == "cut":  # the shutdown's grace period is over
                        self._fail_all(503, payload)
                if sched.has_unfinished():
                    self.engine.step()
                    self._publish()
            except Exception as e:  # the engine's state is unknown: end every request in it, keep serving
                log.exception("engine step failed")
                self._fail_all(500, f"the engine failed: {type(e).__name__}: {e}")
            self.metrics.observe_engine(self.engine)

    def _add(self, req: _Request) -> None:
        n, waiting = req.params.n, len(self.engine.scheduler.waiting)
        if waiting + len(req.prompts) * n > self.max_waiting_seqs:
            req.post("error", APIError(503, f"the server is busy: {waiting} sequences are waiting for the engine "
                                            f"and this request adds {len(req.prompts) * n}, over the queue's limit of "
                                            f"{self.max_waiting_seqs}; retry later",
                                       headers={"Retry-After": str(RETRY_AFTER_S)}))
            return
        try:
            for i, ids in enumerate(req.prompts):
                for k in range(n):
                    req.choices.append(_Choice(self.engine.add(ids, req.params, req.id, k), i * n + k, k))
        except Exception as e:  # a ValueError is the engine refusing the request; anything else is a bug
            for c in req.choices:
                self.engine.abort(c.seq)
            if not isinstance(e, ValueError):
                log.exception("engine.add failed")
            req.post("error", APIError(400 if isinstance(e, ValueError) else 500, str(e)))
            return
        self._live[req.id] = req
        self.metrics.on_request(sum(len(p) for p in req.prompts))
        req.post("ok")

    def _abort(self, req: _Request) -> None:
        if self._live.pop(req.id, None) is None:
            return  # already finished or failed
        for c in req.choices:
            if not c.done:
                self.engine.abort(c.seq)
                self.metrics.on_finish("abort", time.perf_counter() - req.arrival)

    def _fail_all(self, status: int, message: str) -> None:
        for req in list(self._live.values()):
            self._fail(req, status, message)

    def _fail(self, req: _Request, status: int, message: str) -> None:
        """End req with an error: its unfinished sequences are aborted (their blocks freed) and it gets `message`."""
        for c in req.choices:
            if not c.done:
                try:
                    self.engine.abort(c.seq)  # a sequence the engine already finished (an error) is only forgotten
                except Exception:  # keep failing the others; the blocks are what matters
                    log.exception("abort failed for %r", c.seq)
                self.metrics.on_finish("error", time.perf_counter() - req.arrival)
        self._live.pop(req.id, None)
        req.post("error", APIError(status, message))

    def _publish(self) -> None:
        for req in list(self._live.values()):
            try:
                deltas = [d for c in req.choices if not c.done and (d := self._advance(req, c)) is not None]
            except Exception as e:  # this request's own failure (the engine's, or detokenising it): it alone ends
                if not isinstance(e, _SequenceFailed):
                    log.exception("request %s failed", req.id)
                self._fail(req, 500, f"generating this request failed: {e}")
                continue
            if deltas:
                req.post("deltas", deltas)
            if all(c.done for c in req.choices):
                del self._live[req.id]
                req.post("end")

    def _advance(self, req: _Request, c: _Choice) -> Delta | None:
        seq, now = c.seq, time.perf_counter()
        n = seq.num_completion_tokens
        if n > c.num_tokens:
            if c.num_tokens == 0:
                self.metrics.on_first_token(now - req.arrival)
            self.metrics.on_tokens(n - c.num_tokens)
        grew, c.num_tokens = n > c.num_tokens, n
        want_logprobs = req.params.logprobs is not None
        if seq.finish_reason == "error":  # the engine ended it alone (and logged why)
            raise _SequenceFailed(seq.error)
        if seq.is_finished:
            out = self.engine.output(seq, c.sample)
            c.done = True
            self.metrics.on_finish(out.finish_reason, now - req.arrival)
            entries = []
            if want_logprobs:  # every token, unless a stop string cut the text: then those before the cut
                cut = len(out.text) < len(decode_stable(self.tokenizer, out.token_ids))
                entries = self._logprobs(c, out.token_ids, out.logprobs, len(out.text) if cut else None)
            # c.sent is a prefix of out.text: streaming held back anything a stop string could cut
            return Delta(c.index, out.text[len(c.sent):], entries, out.finish_reason, len(out.token_ids))
        if not (req.stream and grew):
            return None
        text = streamable(self.engine.text(seq), [s for s in req.params.stop if s])
        if len(text) <= len(c.sent):
            return None
        delta, c.sent = text[len(c.sent):], text
        entries = []
        if want_logprobs:
            ids = seq.completion_token_ids
            entries = self._logprobs(c, ids, self.engine.token_logprobs(seq), len(c.sent))
        return Delta(c.index, delta, entries)

    def _logprobs(self, c: _Choice, ids: list[int], logprobs: list[dict[int, float]], upto: int | None) -> list:
        """The not yet sent logprob entries of the tokens whose text starts before `upto` (None: all): a token
        goes out with the chunk that sends the start of its text, and tokens past a stop string's cut never do."""
        while len(c.starts) < len(ids):  # each token's start offset: the length of the text before it
            c.starts.append(len(decode_stable(self.tokenizer, ids[:len(c.starts)])))
        new = []
        for i in range(c.num_logprobs_sent, min(len(ids), len(logprobs))):
            if upto is not None and c.starts[i] >= upto:
                break
            new.append(TokenLogprob(ids[i], c.starts[i], logprobs[i]))
        c.num_logprobs_sent += len(new)
        return new
