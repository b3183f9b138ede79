"""The engine's request loop: one thread owns the engine and runs every request in one continuous batch.

Callers `submit()` a request and get a `RequestHandle`; the request's events arrive through the callback given
at submit time, on the engine thread, and every request ends with exactly one terminal event: a `Finished` or
an `EngineError` (an `InvalidRequest` for a bad request). Cancelling a handle stops a running request before its
next step (its KV blocks are freed at once) and drops a waiting one.

Continuous batching (engines with a paged KV cache, `engine.paged`): every step
  1. drops cancelled requests and admits waiting ones first come first served while the paged cache can
     promise them every block they may need (prompt + max_tokens); the first that does not fit waits, and
     all behind it (no overtaking); one that could never fit gets an InvalidRequest as soon as it is checked
     (new requests are checked and rendered in arrival order, PREPARE_PER_STEP a step);
  2. plans at most `engine.step_tokens` tokens: one decode token for every request past its prompt, then
     prefill chunks (cut at KV-block boundaries) of the requests still reading their prompts, in arrival order;
  3. runs them in one `engine.forward_batch`, draws every finished row's token on the device in one go, each
     with its request's own sampler (`sampler.sample_rows`: greedy, temperature, top-k, top-p, seed), and
     applies its Harmony parser, stop strings and max_tokens; finished requests leave the batch and free their
     blocks.
  4. When every running request has a pick in flight or is still reading its prompt, the next step (decode
     rows fed those picks on the GPU, then prompt chunks) is queued before the picks are read back (`_chain`):
     the host's work for a step (text, stops, block tables, launches) then runs while the GPU computes,
     instead of between steps. A step with a prompt chunk streams the text of the picks in hand before it
     starts: on an engine that computes as it is called (the CPU's) it holds the host, and a stream's longest
     wait would otherwise be that step plus the last.
The step-time bound: a step never runs more than `step_tokens` tokens, so a 30,000-token prompt is read
`step_tokens - decoding requests` tokens at a time while every other stream still gets a token each step.
Engines without a paged cache (the Triton-kernel FastTransformer, until its kernels read the paged layout)
are served one request at a time through `engine.generate`.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Union

from kubrick.engine.api import (
    CancelToken,
    EngineError,
    EngineLike,
    Event,
    Finished,
    InvalidRequest,
    Message,
    SamplingParams,
    Usage,
)
from kubrick.engine.step_trace import StepTrace

log = logging.getLogger(__name__)

Outcome = Union[Event, EngineError]
EventCallback = Callable[[Outcome], None]

SHUTTING_DOWN = "the server is shutting down; send the request again once it is back"
# New requests checked and rendered per step: 64 arriving at once took 30-86 ms of the engine thread in one
# step (BENCHMARKS.md, the step trace's admit events); 8 keep a step's share to a few ms.
PREPARE_PER_STEP = 8


def _failure(err: Exception) -> EngineError:
    """What a request is told when a bug outside its control ends it."""
    return EngineError(f"the engine failed on this request ({type(err).__name__}: {err})")


@dataclass
class RequestHandle:
    """One submitted request: its cancel token and the moments the adapter turns into metrics."""

    id: int
    messages: list[Message]
    params: SamplingParams
    on_event: EventCallback
    cancel_token: CancelToken = field(default_factory=CancelToken)
    submitted_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    prompt_tokens: int = 0  # the rendered prompt (batched path)
    reused_tokens: int = 0  # prompt tokens taken from the prefix cache instead of computed (batched path)
    generated_tokens: int = 0  # tokens sampled so far (batched path)

    def cancel(self) -> None:
        """Stop this request: before its next step if running (its KV blocks freed then), before it starts if waiting."""
        self.cancel_token.cancel()

    @property
    def cancelled(self) -> bool:
        return self.cancel_token.cancelled

    @property
    def done(self) -> bool:
        return self.finished_at is not None


class Scheduler:
    """Owns the engine on one thread; requests are admitted in arrival order."""

    def __init__(self, engine: EngineLike, name: str = "kubrick-engine", chain: bool = True):
        self.engine = engine
        self.chain = chain  # queue decode steps behind each other (see _chain); off: one step at a time
        self.batching = getattr(engine, "paged", None) is not None
        self._waiting: deque[RequestHandle] = deque()
        self._running: list = []  # RequestHandles (one at a time) or _Active requests (batched)
        self._prepared: dict[int, tuple] = {}  # waiting requests already checked: id -> (prompt, params, positions)
        self._pending: list[tuple[_Active, int]] = []  # sampled tokens whose text is still to be streamed
        self._inflight: _Inflight | None = None  # a queued step whose picks are not read back yet
        self._trace = StepTrace.from_env()  # KUBRICK_STEP_TRACE: a record of every step (step_trace.py)
        self._lock = threading.Condition()
        self._stopping = False
        self._ids = itertools.count(1)
        loop = self._batch_loop if self.batching else self._loop
        self._thread = threading.Thread(target=loop, name=name, daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        """Requests queued and not yet started."""
        with self._lock:
            return len(self._waiting)

    @property
    def running(self) -> int:
        """Requests the engine is generating for right now."""
        with self._lock:
            return len(self._running)

    def submit(self, messages: list[Message], params: SamplingParams, on_event: EventCallback) -> RequestHandle:
        """Queue a request; its events go to `on_event` (called on the engine thread, must not block long)."""
        handle = RequestHandle(id=next(self._ids), messages=messages, params=params, on_event=on_event)
        with self._lock:
            if self._stopping:
                stopped = True
            else:
                stopped = False
                self._waiting.append(handle)
                self._lock.notify()
        if stopped:
            self._finish(handle, EngineError(SHUTTING_DOWN))
        return handle

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel everything, end each request with an error event, and wait for the engine thread to exit."""
        with self._lock:
            self._stopping = True
            dropped = list(self._waiting)
            self._waiting.clear()
            for running in self._running:
                getattr(running, "handle", running).cancel()
            self._lock.notify_all()
        for handle in dropped:
            self._finish(handle, EngineError(SHUTTING_DOWN))
        self._thread.join(timeout)
        if self._trace is not None:
            self._trace.close()

    # -- continuous batching ---------------------------------------------------------------------------------

    def _batch_loop(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and not self._running and not self._stopping:
                    self._lock.wait()
                if self._stopping:
                    break
            try:
                self._iteration()
            except Exception as err:  # a bug outside any one request: fail the running ones, keep the loop alive
                log.exception("scheduler step failed")
                self._inflight = None
                for active in list(self._running):
                    self._end(active, error=EngineError(f"the engine failed ({type(err).__name__}: {err})"))
        for active in list(self._running):
            self._end(active, error=EngineError(SHUTTING_DOWN))

    def _iteration(self) -> None:
        for active in [a for a in self._running if a.handle.cancelled]:
            self._end(active, "cancelled")
        started, before = time.perf_counter(), (len(self._prepared), len(self._running))
        self._admit()
        if (len(self._prepared), len(self._running)) != before:  # traced when it did something
            self._traced("admit", started, prepared=len(self._prepared), running=len(self._running))
        if not self._running:
            self._inflight = None  # every request of it has ended: nothing of it is wanted
            with self._lock:  # a head that found no room waits for a finishing request (or a new one)
                if self._waiting and self._waiting[0].id in self._prepared and not self._stopping:
                    self._lock.wait(0.05)
            return
        self._step()

    def _admit(self) -> None:
        """First come, first served, while the paged cache can promise a request all the blocks it may need."""
        self._sweep_queue()
        engine, cache = self.engine, self.engine.paged
        while len(self._running) < engine.max_batch:
            with self._lock:
                if not self._waiting:
                    return
                handle = self._waiting[0]
            if handle.id not in self._prepared:  # arrived after the sweep: next step
                return
            prompt, params, positions = self._prepared[handle.id]
            try:
                seq = cache.admit(prompt, positions, engine.step_tokens)
            except Exception as err:  # a bug on this request's way in: it fails, the queue moves on
                log.exception("admitting request %d failed", handle.id)
                self._remove_waiting(handle)
                self._finish(handle, _failure(err))
                continue
            if seq is None:
                return  # no room now: it waits (and everyone behind it) until a running request frees blocks
            self._remove_waiting(handle)
            handle.started_at = time.monotonic()
            handle.prompt_tokens, handle.reused_tokens = len(prompt), seq.reused
            with self._lock:
                self._running.append(_Active(handle, prompt, params, seq, engine.stop_tokens))

    def _sweep_queue(self) -> None:
        """Answer soon, wherever they wait: cancelled requests, bad ones, and ones that could never fit.
        The others are checked and rendered once, however long they wait: at most PREPARE_PER_STEP a step, in
        arrival order, so a burst of arrivals does not stall the running streams (~1 ms a long prompt)."""
        engine, cache = self.engine, self.engine.paged
        with self._lock:
            waiting = list(self._waiting)
        rendered = 0
        for handle in waiting:
            if handle.cancelled:  # the engine never sees it
                self._remove_waiting(handle)
                self._finish(handle, Finished(Usage(0, 0, 0.0, 0.0), reason="cancelled"))
                continue
            if handle.id in self._prepared or rendered >= PREPARE_PER_STEP:
                continue
            rendered += 1
            try:
                prompt, params = engine.prepare(handle.messages, handle.params)
                # Every token it feeds, the last pick too: a chained step may feed it before it is read.
                positions = min(len(prompt) + params.max_tokens, engine.context_length)
                if not cache.fits_ever(positions, engine.step_tokens):
                    raise InvalidRequest(
                        f"this request needs room for {positions} tokens (a {len(prompt)}-token conversation + "
                        f"max_tokens {params.max_tokens}) but the whole KV cache holds {cache.capacity_tokens()}; "
                        "lower max_tokens, shorten the conversation, or raise --kv-cache-memory"
                    )
            except EngineError as err:  # InvalidRequest included: worded for a person already
                self._remove_waiting(handle)
                self._finish(handle, err)
                continue
            self._prepared[handle.id] = (prompt, params, positions)

    def _remove_waiting(self, handle: RequestHandle) -> None:
        self._prepared.pop(handle.id, None)
        with self._lock:
            for i, waiting in enumerate(self._waiting):
                if waiting is handle:
                    del self._waiting[i]
                    break

    def _plan(self) -> list[tuple[_Active, list[int]]]:
        """This step's work: a decode token for each request past its prompt, then prompt chunks, in order."""
        plan = [(a, [a.next_token]) for a in self._running if a.prefill_left == 0]
        return plan + self._prompt_chunks(self.engine.step_tokens - len(plan))

    def _prompt_chunks(self, budget: int) -> list[tuple[_Active, list[int]]]:
        """Up to `budget` prompt tokens of the requests still reading their prompts, in arrival order."""
        block = self.engine.paged.block_size
        plan = []
        for a in self._running:
            if a.prefill_left == 0 or budget <= 0:
                continue
            start = a.seq.length
            end = start + min(a.prefill_left, budget)
            if end < len(a.prompt):  # cut at a block boundary: a prompt's numbers then never depend on the cut
                end = end // block * block
            if end > start:
                plan.append((a, a.prompt[start:end]))
                budget -= end - start
        return plan

    def _step(self) -> None:
        if self._inflight is not None and not self._chain():
            self._resolve_inflight()
        if self._inflight is not None:  # chained: this iteration's step is queued and the last one's handled
            return
        plan = self._plan()
        if not plan:
            self._flush_pending()
            return
        prefill = sum(len(t) for a, t in plan if a.prefill_left)
        if prefill:
            # A step with a prompt chunk returns when the GPU is done (its attention launches and its rows'
            # logits need the host; tens of ms beside a big batch): stream the picks already in hand first,
            # so no stream waits for it twice.
            self._flush_pending()
        started = time.perf_counter()
        try:
            logits = self.engine.forward_batch([(a.seq, tokens) for a, tokens in plan])
        except Exception as err:
            self._fail_step([a for a, _ in plan], err)
            return
        self._traced("launch", started, kind="mixed" if prefill else "decode", rows=len(plan), prefill=prefill)
        finished = [a for a, _ in plan if a.prefill_left == 0]  # logits rows exist only for these
        # The last step's text is parsed and streamed now, while the GPU runs this step (a stop string found
        # there ends its request; this step's row for it is then dropped).
        self._flush_pending()
        if not finished:
            return
        try:
            picks = _pick(logits, finished)
        except Exception as err:
            self._fail_step(finished, err)
            return
        if self.chain:
            # Leave the picks on the GPU, so the next step can be queued behind this one before the host reads
            # them (see _chain).
            self._inflight = _Inflight(finished, _Picks(picks))
            return
        started = time.perf_counter()
        tokens = picks.tolist()  # one transfer for the batch
        self._traced("wait", started)
        self._take_picks(finished, tokens)

    def _chain(self) -> bool:
        """Queue the next step behind the in-flight one, its decode rows fed the in-flight picks on the GPU,
        then handle those picks while the GPU runs it: the host's work (text, stops, the next step's block
        tables, a mixed step's launches) then overlaps the GPU's instead of leaving it idle between steps.
        Prompt chunks ride along (their tokens are on the host), so requests joining mid-chain keep it going.

        Only when every running request either has a pick in flight or is still reading its prompt. A request
        the picks end (max_tokens, the context, a stop token or string) leaves as usual; its row of the queued
        step (admission reserved the room: the last pick may be fed) is dropped, and the next step leaves it
        out. False: not chained (the picks are still to be handled)."""
        inflight = self._inflight
        picked = {id(a) for a in inflight.actives}
        live = [i for i, a in enumerate(inflight.actives) if not (a.ended or a.handle.cancelled)]
        if not live or any(id(a) not in picked and a.prefill_left == 0 for a in self._running):
            return False
        actives = [inflight.actives[i] for i in live]
        fed = inflight.picks.device
        if len(live) < len(inflight.actives):  # requests that left: their picks are not fed
            import torch

            from kubrick.engine.cuda_graphs import on_device

            fed = fed[on_device(live, fed.device, torch.long)]
        chunks = self._prompt_chunks(self.engine.step_tokens - len(actives))
        if chunks:
            # On an engine whose steps compute as they are called (the CPU's), a prompt chunk holds the
            # thread: stream the text in hand first, as _step does.
            self._flush_pending()
        marks = [len(a.seq.tokens) for a in actives]  # where each placeholder lands in its sequence's tokens
        started = time.perf_counter()
        try:
            logits = self.engine.forward_batch([(a.seq, [0]) for a in actives] + [(a.seq, t) for a, t in chunks],
                                               device_tokens=fed)
            rows = actives + [a for a, _ in chunks if a.prefill_left == 0]  # a logits row each
            picks = _pick(logits, rows)
        except Exception as err:
            self._inflight = None
            self._fail_step(actives + [a for a, _ in chunks], err)
            return True
        self._inflight = _Inflight(rows, _Picks(picks))
        prefill = sum(len(t) for _, t in chunks)
        self._traced("launch", started, kind="chained mixed" if prefill else "chained", rows=len(actives) + len(chunks),
                     prefill=prefill)
        self._flush_pending()  # the last step's text, while the GPU works
        started = time.perf_counter()
        every = inflight.picks.tolist()  # waits for the previous step only; the GPU goes on with this one
        self._traced("wait", started)
        tokens = [every[i] for i in live]
        for a, mark, token in zip(actives, marks, tokens):
            a.seq.tokens[mark] = token
        self._take_picks(actives, tokens)
        return True

    def _resolve_inflight(self) -> None:
        """Read the in-flight step's picks back and hand them to their requests (no step queued behind)."""
        inflight, self._inflight = self._inflight, None
        started = time.perf_counter()
        tokens = inflight.picks.tolist()
        self._traced("wait", started)
        self._flush_pending()
        self._take_picks(inflight.actives, tokens)

    def _take_picks(self, actives: list[_Active], picks: list[int]) -> None:
        """Hand each request its pick."""
        for active, pick in zip(actives, picks):
            if active.ended:
                continue
            try:
                self._on_pick(active, pick)
            except Exception as err:  # parsing broke on this request; keep serving the others
                self._request_failed(active, err)

    def _fail_step(self, actives: list[_Active], err: Exception) -> None:
        """A step broke: end its requests with the reason, keep serving the rest."""
        if not isinstance(err, EngineError):
            log.exception("engine step failed")
            err = _failure(err)
        self._flush_pending()
        for active in actives:
            self._end(active, error=err)

    def _request_failed(self, a: _Active, err: Exception) -> None:
        log.exception("request %d failed", a.handle.id)
        self._end(a, error=_failure(err))

    def _on_pick(self, a: _Active, token: int) -> None:
        """Take this request's next token and stream what it completes (as Engine.generate does)."""
        if a.handle.cancelled:
            self._end(a, "cancelled")
            return
        a.produced += 1
        a.handle.generated_tokens = a.produced
        if a.first_token_at is None:
            a.first_token_at = time.perf_counter()
        if token in a.stop_tokens:
            self._end(a, "stop")
            return
        if a.produced >= a.params.max_tokens or len(a.prompt) + a.produced >= self.engine.context_length:
            self._stream_text(a, token)
            if not a.ended:
                self._end(a, "length")
            return
        a.next_token = token
        self._pending.append((a, token))  # streamed after the next step is on its way

    def _stream_text(self, a: _Active, token: int) -> None:
        """Parse one token into reasoning/answer text and stream it; a stop string ends the request."""
        for delta in a.parser.feed(token):
            text, stopped = a.stops.push(delta)
            if text:
                self._deliver_delta(a.handle, type(delta)(text))
            if stopped:
                self._end(a, "stop")
                return

    def _flush_pending(self) -> None:
        pending, self._pending = self._pending, []
        started = time.perf_counter()
        for a, token in pending:
            if a.ended:
                continue
            try:
                self._stream_text(a, token)
            except Exception as err:  # parsing broke on this request; keep serving the others
                self._request_failed(a, err)
        if pending:
            self._traced("deliver", started, n=len(pending))

    def _traced(self, ev: str, started: float, **fields) -> None:
        if self._trace is not None:
            self._trace.add(ev, started, **fields)

    def _end(self, a: _Active, reason: str = "", error: EngineError | None = None) -> None:
        """A request leaves the batch: its blocks go back at once, then its last events."""
        if a.ended:
            return
        a.ended = True
        self.engine.paged.release(a.seq)
        with self._lock:
            if a in self._running:
                self._running.remove(a)
        if error is not None:
            self._finish(a.handle, error)
            return
        if reason == "cancelled" and self._stopping:
            self._finish(a.handle, EngineError(SHUTTING_DOWN))
            return
        if not a.stops.stopped:  # a stop string hides everything after it; otherwise show what is held
            for delta in a.parser.finish():
                text, _ = a.stops.push(delta)
                if text:
                    self._deliver_delta(a.handle, type(delta)(text))
            for delta in a.stops.flush():
                self._deliver_delta(a.handle, delta)
        end = time.perf_counter()
        first = a.first_token_at or end
        decode_time = end - first
        rate = (a.produced - 1) / decode_time if a.produced > 1 and decode_time > 0 else a.produced / max(end - a.started, 1e-9)
        usage = Usage(len(a.prompt), a.produced, first - a.started, rate)
        self._finish(a.handle, Finished(usage=usage, reason=reason))

    def _deliver_delta(self, handle: RequestHandle, delta: Event) -> None:
        if handle.first_token_at is None:
            handle.first_token_at = time.monotonic()
        self._deliver(handle, delta)

    # -- one request at a time (engines without a paged cache) ---------------------------------------------

    def _next(self) -> RequestHandle | None:
        with self._lock:
            while not self._waiting and not self._stopping:
                self._lock.wait()
            if self._stopping:
                return None
            handle = self._waiting.popleft()
            self._running = [handle]
            return handle

    def _loop(self) -> None:
        while (handle := self._next()) is not None:
            try:
                self._run_one(handle)
            finally:
                with self._lock:
                    if handle in self._running:
                        self._running.remove(handle)

    def _run_one(self, handle: RequestHandle) -> None:
        handle.started_at = time.monotonic()
        if handle.cancelled:  # cancelled while it waited: the engine never sees it
            self._finish(handle, Finished(Usage(0, 0, 0.0, 0.0), reason="cancelled"))
            return
        try:
            for event in self.engine.generate(handle.messages, handle.params, handle.cancel_token):
                if isinstance(event, Finished):
                    if event.reason == "cancelled" and self._stopping:
                        self._finish(handle, EngineError(SHUTTING_DOWN))
                    else:
                        self._finish(handle, event)
                    return
                if handle.first_token_at is None:
                    handle.first_token_at = time.monotonic()
                self._deliver(handle, event)
            self._finish(handle, EngineError("the engine stopped without finishing the reply; this is a bug"))
        except EngineError as err:  # InvalidRequest included: worded for a person already
            self._finish(handle, err)
        except Exception as err:  # the engine broke on this request; keep serving the others
            log.exception("engine failed on request %d", handle.id)
            self._finish(handle, _failure(err))

    def _finish(self, handle: RequestHandle, outcome: Outcome) -> None:
        if handle.done:
            return
        handle.finished_at = time.monotonic()
        with self._lock:  # counts are right by the time the listener sees the last event
            if handle in self._running:
                self._running.remove(handle)
        self._deliver(handle, outcome)

    @staticmethod
    def _deliver(handle: RequestHandle, outcome: Outcome) -> None:
        try:
            handle.on_event(outcome)
        except Exception:  # a broken listener must not take the engine down
            log.exception("event callback failed for request %d", handle.id)


def _pick(logits, actives: list[_Active]):
    """Every row's next token, drawn on the logits' device with its request's sampler (ids not read back)."""
    from kubrick.engine.sampler import sample_rows

    return sample_rows(logits[:, : actives[0].vocab], [a.sampler for a in actives])  # a padded vocabulary's extra ids mean nothing


class _Picks:
    """A step's picks: on the device (to feed the next step) and on their way to the host. The copy to the host
    is queued right behind the draw: a plain .tolist() later would queue it behind the next step too, and wait
    for that step to finish."""

    def __init__(self, picks):
        import torch

        self.device, self.ready = picks, None
        self.host = picks
        if picks.is_cuda:
            self.host = torch.empty(picks.shape, dtype=picks.dtype, pin_memory=True)
            self.host.copy_(picks, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record()

    def tolist(self) -> list[int]:
        if self.ready is not None:
            self.ready.synchronize()
        return self.host.tolist()


class _Inflight:
    """A step queued on the GPU: its requests, in row order, and their picks (drawn there)."""

    def __init__(self, actives: list, picks: _Picks):
        self.actives, self.picks = actives, picks


class _Active:
    """A request in the running batch: its sequence in the paged cache and its own sampling and text state."""

    def __init__(self, handle: RequestHandle, prompt: list[int], params: SamplingParams, seq, stop_tokens: set[int]):
        from kubrick.engine import harmony
        from kubrick.engine.sampler import Sampler
        from kubrick.engine.stop import StopStrings

        self.handle, self.prompt, self.params, self.seq = handle, prompt, params, seq
        self.stop_tokens, self.vocab = stop_tokens, harmony.VOCAB_SIZE
        self.sampler, self.parser, self.stops = Sampler(params), harmony.HarmonyStream(), StopStrings(params.stop)
        self.produced = 0
        self.ended = False  # left the batch (its events are sent or on their way)
        self.next_token: int | None = None  # sampled, to be fed at the next step
        self.started = time.perf_counter()
        self.first_token_at: float | None = None

    @property
    def prefill_left(self) -> int:
        return max(0, len(self.prompt) - self.seq.length)
