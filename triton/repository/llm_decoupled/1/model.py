"""llm_decoupled: the Triton model that adapts requests to the Kubrick engine (a thin adapter, nothing more).

The engine runs in a process of its own (kubrick/server/engine_process.py: one GIL for the engine thread, another
for the sends). `execute` parses each request and hands it to that process, then returns None (decoupled model).
The engine's events come back a step at a time into an outbox; one response thread turns them into responses:
each `text_output` is one JSON event, {"type": "reasoning"|"chunk"|"complete"|"error", …}, and the last one
carries the FINAL flag. A client that goes away (`response_sender.is_cancelled()`) cancels its request in the
engine. Custom Prometheus metrics are published beside Triton's own.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from dataclasses import dataclass

import numpy as np
import triton_python_backend_utils as pb_utils

from kubrick.engine.api import (
    ContentDelta,
    EngineError,
    Finished,
    InvalidRequest,
    ReasoningDelta,
    parse_messages,
    parse_params,
)
from kubrick.engine.step_trace import StepTrace
from kubrick.server.engine_process import EngineProcess
from kubrick.server.outbox import CANCEL_POLL_S, cancel_poll_interval, coalesced, drain

RESTART_WITHIN_S = 60.0  # an engine process that dies again sooner than this after a restart stays down
GAUGES_EVERY_S = 0.05  # how often the running/waiting/KV-cache gauges are refreshed (IPC, and a walk over the batch)
TTFT_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
TPOT_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]


@dataclass
class Pending:
    """A request in flight: where its responses go and its id in the engine (None: it never reached it)."""

    sender: object
    request_id: int | None = None
    client_left: bool = False
    checked_at: float = 0.0  # last is_cancelled() poll (time.monotonic())
    timing: tuple | None = None  # from the engine with the last event: (time to first text, time per token)


class Metrics:
    """Kubrick's own Prometheus metrics, labelled with the model and the engine version."""

    def __init__(self, model: str, engine_version: str):
        labels = {"model": model, "engine_version": engine_version}
        # Families must outlive their metrics: keep them all on self.
        self.families: list = []

        def metric(name: str, description: str, kind, **extra):
            family = pb_utils.MetricFamily(name=name, description=description, kind=kind)
            self.families.append(family)
            return family.Metric(labels=labels, **extra)

        counter, gauge, histogram = (
            pb_utils.MetricFamily.COUNTER,
            pb_utils.MetricFamily.GAUGE,
            pb_utils.MetricFamily.HISTOGRAM,
        )
        self.generated_tokens = metric(
            "kubrick_generated_tokens_total", "Tokens generated (completion tokens), all requests", counter
        )
        self.prompt_tokens = metric(
            "kubrick_prompt_tokens_total", "Prompt tokens processed (prefill), all requests", counter
        )
        self.ttft = metric(
            "kubrick_time_to_first_token_seconds",
            "From a request's arrival (queueing included) to its first generated text",
            histogram,
            buckets=TTFT_BUCKETS,
        )
        self.tpot = metric(
            "kubrick_time_per_output_token_seconds",
            "Mean time between generated tokens of a request, after the first",
            histogram,
            buckets=TPOT_BUCKETS,
        )
        self.running = metric("kubrick_requests_running", "Requests the engine is generating for now", gauge)
        self.waiting = metric("kubrick_requests_waiting", "Requests queued for the engine, not started yet", gauge)
        self.kv_cache = metric(
            "kubrick_kv_cache_usage_ratio", "Fraction of the engine's KV-cache capacity in use (0 to 1)", gauge
        )
        finished = pb_utils.MetricFamily(
            name="kubrick_requests_finished_total",
            description="Requests ended, by reason: stop, length, cancelled or error",
            kind=counter,
        )
        self.families.append(finished)
        self.finished = {
            reason: finished.Metric(labels={**labels, "reason": reason})
            for reason in ("stop", "length", "cancelled", "error")
        }
        self._gauges: dict[str, float] = {}

    def set_gauges(self, running: int, waiting: int, kv_cache: float) -> None:
        """Publish the gauges that changed (each publish is a message to the server)."""
        for name, value in (("running", running), ("waiting", waiting), ("kv_cache", kv_cache)):
            if self._gauges.get(name) != value:
                getattr(self, name).set(float(value))
                self._gauges[name] = value

    def record(self, outcome: object, timing: tuple | None) -> None:
        """Count a finished request; timing: (time to first text, time per token after it), each None if unknown."""
        if not isinstance(outcome, Finished):
            self.finished["error"].increment(1)
            return
        self.finished.get(outcome.reason, self.finished["stop"]).increment(1)
        usage = outcome.usage
        if usage.prompt_tokens:
            self.prompt_tokens.increment(usage.prompt_tokens)
        if usage.completion_tokens:
            self.generated_tokens.increment(usage.completion_tokens)
        ttft, tpot = timing or (None, None)
        if ttft is not None:
            self.ttft.observe(ttft)
        if tpot is not None:
            self.tpot.observe(tpot)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.model_name = config.get("name", "llm_decoupled")
        settings = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        # The instance kind decides the device unless TRITON_DEVICE or the config says otherwise.
        if args.get("model_instance_kind") == "GPU":
            kind_device = f"cuda:{args.get('model_instance_device_id', '0')}"
        else:
            kind_device = "cpu"
        device = settings.get("device") or os.environ.get("TRITON_DEVICE") or kind_device
        context_length = settings.get("context_length")

        self.engine_settings = {"checkpoint": settings.get("checkpoint") or None, "device": device,
                                "context_length": int(context_length) if context_length else None}
        self.outbox: queue.Queue = queue.Queue()
        self.pending: dict[int, Pending] = {}  # request id -> Pending; touched by the response thread only
        self.last_request_id = 0
        self.stopping = False
        self.restarting = False
        self.restarted_at: float | None = None  # when the engine process was last started again after dying
        self.engine_down: str | None = None  # while it is down: why, and what to do (the requests' error)
        self.engine = self._start_engine()
        info = self.engine.info
        self.metrics = Metrics(self.model_name, info["version"])
        self.trace = StepTrace.from_env()  # KUBRICK_STEP_TRACE: the engine process writes its steps to it too
        self.gauges_at = 0.0
        self.responder = threading.Thread(target=self._respond_loop, name="kubrick-responses", daemon=True)
        self.responder.start()
        self._refresh_gauges()
        pb_utils.Logger.log_info(
            f"{self.model_name}: engine {info['version']} on {info['device']}, "
            f"context {info['context_length']} tokens; {info['kv_cache']}"
        )

    def _start_engine(self) -> EngineProcess:
        engine = EngineProcess.start(self.engine_settings)
        engine.listen(on_events=lambda events: self.outbox.put(("engine", events)), on_exit=self._engine_exited)
        return engine

    def _engine_exited(self, reason: str) -> None:
        """The engine process died (killed, out of memory, a CUDA fault): its requests end with an error, and it
        is started again, unless it died within RESTART_WITHIN_S of the last restart (it would only die again)."""
        recently = self.restarted_at is not None and time.monotonic() - self.restarted_at < RESTART_WITHIN_S
        self.restarting = not self.stopping and not recently
        remedy = "it is restarting: send the request again shortly" if self.restarting else "restart the server"
        self.engine_down = f"{reason}; {remedy}"
        self.outbox.put(("engine exited", (self.engine_down, self.last_request_id)))
        if self.restarting:
            threading.Thread(target=self._restart_engine, name="kubrick-engine-restart", daemon=True).start()

    def _restart_engine(self) -> None:
        pb_utils.Logger.log_error(f"{self.model_name}: {self.engine_down}")
        try:
            engine = self._start_engine()
        except EngineError as err:
            self.engine_down = f"the engine process exited and could not start again ({err}); restart the server"
            pb_utils.Logger.log_error(f"{self.model_name}: {self.engine_down}")
            self.restarting = False
            return
        if self.stopping:
            engine.stop()
            return
        self.engine, self.restarting, self.engine_down = engine, False, None
        self.restarted_at = time.monotonic()
        pb_utils.Logger.log_info(f"{self.model_name}: the engine process is back; {engine.info['kv_cache']}")

    def execute(self, requests):
        for request in requests:
            pending = Pending(sender=request.get_response_sender())
            try:
                messages, params = self._parse(request)
            except InvalidRequest as err:
                self.outbox.put((pending, err))
                continue
            except Exception as err:  # never let one odd request fail the others in this batch
                self.outbox.put((pending, EngineError(f"the server could not read this request ({err})")))
                continue
            self.last_request_id += 1
            pending.request_id = self.last_request_id
            self.outbox.put((pending, None))  # registered before any of its events can arrive
            try:
                self.engine.submit(pending.request_id, messages, params)
            except EngineError as err:  # the engine process is gone (and maybe restarting) or shutting down
                self.outbox.put((pending, EngineError(self.engine_down or str(err))))
        return None

    def finalize(self):
        self.stopping = True
        self.engine.stop()  # every request still in flight gets its last event
        self.outbox.put((None, None))
        self.responder.join(timeout=30)
        if self.trace is not None:
            self.trace.close()

    @staticmethod
    def _parse(request):
        tensor = pb_utils.get_input_tensor_by_name(request, "text_input")
        if tensor is None:
            raise InvalidRequest('the request has no text_input; send a JSON list of {"role", "content"} messages')
        values = tensor.as_numpy().reshape(-1)
        if values.size != 1:
            raise InvalidRequest("text_input must be one string: a JSON list of messages")
        messages = parse_messages(values[0])
        try:
            raw = json.loads(request.parameters() or "{}")
        except json.JSONDecodeError:
            raise InvalidRequest("the request parameters are not valid JSON") from None
        return messages, parse_params(raw)

    # The response thread: the only place that talks to response senders. One thread, not several: each send
    # is a round trip to the server process (~0.1-0.3 ms at 64 streams); four threads sending for their own
    # requests cost 11-32 % of the tokens a second at 64 clients when the engine shared their process and GIL
    # (BENCHMARKS.md run 41; scripts/experiments/response_lanes.sh).

    def _respond_loop(self) -> None:
        while True:
            try:
                first = self.outbox.get(timeout=CANCEL_POLL_S)
            except queue.Empty:
                self._poll_cancelled()
                self._refresh_gauges()
                continue
            started = time.perf_counter()
            batch = coalesced(self._outcomes(drain(self.outbox, first)))
            for pending, outcome in batch:
                if pending is None:
                    return
                try:
                    self._respond(pending, outcome)
                except Exception as err:  # one broken response must not stop the others
                    pb_utils.Logger.log_error(f"{self.model_name}: sending a response failed: {err}")
            if self.trace is not None:  # KUBRICK_STEP_TRACE: how long the clients' text waits on this thread
                self.trace.add("respond", started, n=len(batch))
            self._refresh_gauges()

    def _outcomes(self, items: list[tuple]) -> list[tuple[Pending | None, object]]:
        """The outbox's items as (request, outcome) pairs: registrations (outcome None) and local errors as they
        are, the engine's events matched to their requests, and the engine's exit as an error for every one."""
        out: list[tuple[Pending | None, object]] = []
        for first, second in items:
            if first == "engine":
                for request_id, outcome, timing in second:
                    pending = self._registered(out, request_id)
                    if pending is not None:
                        pending.timing = timing or pending.timing
                        out.append((pending, outcome))
            elif first == "engine exited":  # every request it had (ids up to `last`) ends with the reason
                reason, last = second
                waiting = {id(p): p for p in self.pending.values()}
                waiting.update({id(p): p for p, o in out if p is not None and o is None})
                out.extend((p, EngineError(reason)) for p in waiting.values() if p.request_id <= last)
            else:
                out.append((first, second))
        return out

    def _registered(self, out: list, request_id: int) -> Pending | None:
        """The request with this id: registered earlier, or in this very batch (out) ahead of its events."""
        pending = self.pending.get(request_id)
        if pending is None:
            for candidate, outcome in reversed(out):
                if outcome is None and candidate is not None and candidate.request_id == request_id:
                    return candidate
        return pending

    def _respond(self, pending: Pending, outcome) -> None:
        if outcome is None:  # registration of a newly submitted request
            self.pending[pending.request_id] = pending
            return
        if isinstance(outcome, (ReasoningDelta, ContentDelta)):
            if not pending.client_left:
                kind = "reasoning" if isinstance(outcome, ReasoningDelta) else "chunk"
                self._send(pending, {"type": kind, "content": outcome.text})
                self._check_cancelled(pending)
            return
        # A terminal event: Finished, or an error for a person.
        if pending.request_id is not None and self.pending.pop(pending.request_id, None) is None:
            return  # it had ended already (an error when the engine exited, then its own last event)
        self.metrics.record(outcome, pending.timing)
        if pending.client_left or (isinstance(outcome, Finished) and outcome.reason == "cancelled"):
            self._send(pending, None, final=True)
        elif isinstance(outcome, Finished):
            usage = outcome.usage
            event = {
                "type": "complete",
                "finish_reason": outcome.reason,
                "usage": {
                    "prompt_tokens": usage.prompt_tokens,
                    "completion_tokens": usage.completion_tokens,
                    "time_to_first_token_s": round(usage.time_to_first_token_s, 6),
                    "tokens_per_s": round(usage.tokens_per_s, 3),
                },
            }
            self._send(pending, event, final=True)
        else:
            message = str(outcome) if isinstance(outcome, EngineError) else f"the server failed: {outcome}"
            self._send(pending, {"type": "error", "content": message}, final=True)

    def _send(self, pending: Pending, event: dict | None, final: bool = False) -> None:
        flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
        if event is None:
            pending.sender.send(flags=flags)
            return
        text = json.dumps(event, ensure_ascii=False)
        tensor = pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_))
        pending.sender.send(pb_utils.InferenceResponse(output_tensors=[tensor]), flags=flags)

    def _check_cancelled(self, pending: Pending) -> None:
        now = time.monotonic()
        if pending.client_left or now - pending.checked_at < cancel_poll_interval(len(self.pending)):
            return
        pending.checked_at = now
        if pending.sender.is_cancelled():
            pending.client_left = True
            if pending.request_id is not None:
                try:
                    self.engine.cancel(pending.request_id)  # the engine stops before its next step
                except EngineError:
                    pass  # the engine is gone: the request has ended (or is about to, with that error)

    def _poll_cancelled(self) -> None:
        for pending in list(self.pending.values()):
            self._check_cancelled(pending)

    def _refresh_gauges(self) -> None:
        now = time.monotonic()
        if now - self.gauges_at < GAUGES_EVERY_S:
            return
        self.gauges_at = now
        self.metrics.set_gauges(*self.engine.gauges)

