"""Engine: a conversation in, a stream of reasoning/answer deltas out, on one gpt-oss checkpoint.

One generation at a time (the scheduler queues requests in front of it). The KV cache is kept between
requests, so a follow-up turn whose prompt extends the last conversation reuses the whole prefill chunks
it shares with it (see `_prefill`).
"""

from __future__ import annotations

import importlib
import os
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import torch

from kubrick import __version__
from kubrick.engine import harmony
from kubrick.engine.api import (
    CancelToken,
    EngineError,
    Event,
    Finished,
    InvalidRequest,
    Message,
    SamplingParams,
    Usage,
    parse_params,
)
from kubrick.engine.checkpoint import load_checkpoint
from kubrick.engine.sampler import Sampler
from kubrick.engine.stop import StopStrings

DEFAULT_CONTEXT_LENGTH = 8192
# The model implementations an engine can run: the readable reference (the oracle), or the same model on
# Kubrick's Triton kernels (kernels issue). Both take (config, weights) and share forward(tokens, cache).
IMPLEMENTATIONS = {
    "reference": ("kubrick.engine.model", "Transformer"),
    "triton": ("kubrick.engine.fast_model", "GraphedFastTransformer"),  # decode steps replay a CUDA graph on a GPU
}
PREFILL_CHUNK = 512  # tokens per prefill step: 20b's scores stay near 1 GB even at an 8192-token context


def _validated(params: SamplingParams) -> SamplingParams:
    """The same checks a request's raw parameters get (a caller may build SamplingParams by hand)."""
    raw = asdict(params)
    raw["stop"] = list(raw["stop"])
    return parse_params(raw)


class Engine:
    def __init__(
        self,
        checkpoint: str | Path,
        device: str = "cpu",
        context_length: int = DEFAULT_CONTEXT_LENGTH,
        implementation: str | None = None,
    ):
        implementation = implementation or os.environ.get("KUBRICK_ENGINE_IMPL") or None
        if implementation is not None and implementation not in IMPLEMENTATIONS:
            raise EngineError(
                f"unknown engine implementation {implementation!r} (KUBRICK_ENGINE_IMPL); use {' or '.join(IMPLEMENTATIONS)}"
            )
        if context_length < 2:
            raise EngineError(f"context length must be at least 2 tokens, not {context_length}")
        try:
            self.torch_device = torch.device(device)
        except RuntimeError:
            raise EngineError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
        if self.torch_device.type == "cuda" and not torch.cuda.is_available():
            raise EngineError(f"device {device} asked for, but this PyTorch sees no CUDA GPU; use --device cpu")
        harmony.encoding()  # fail early, with one clear line, if the vocabulary is missing
        self.checkpoint = Path(checkpoint)
        self.device = str(self.torch_device)
        self.context_length = context_length
        # Default: the kernels on a GPU, the reference on a CPU (where Triton only has its slow interpreter).
        implementation = implementation or ("triton" if self.torch_device.type == "cuda" else "reference")
        self.implementation = implementation
        self.version = f"{__version__}-{implementation}"
        self.config, weights = load_checkpoint(self.checkpoint, self.torch_device)
        if self.config.vocab_size < harmony.VOCAB_SIZE:
            raise EngineError(
                f"checkpoint {self.checkpoint} has a vocabulary of {self.config.vocab_size} tokens; gpt-oss's "
                f"Harmony format needs {harmony.VOCAB_SIZE}"
            )
        module, name = IMPLEMENTATIONS[implementation]
        self.model = getattr(importlib.import_module(module), name)(self.config, weights)
        self.cache = self.model.new_cache(context_length)
        self.cached_tokens: list[int] = []  # the tokens whose keys/values the cache holds
        self.prefill_chunk = PREFILL_CHUNK
        self.prefilled_chunks = 0  # leading whole chunks of the cache that a prefill computed
        self.last_reused_tokens = 0  # prompt tokens the last request took from the cache
        self.stop_tokens = harmony.stop_tokens()
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls, checkpoint=None, device=None, context_length=None) -> "Engine":
        """Arguments win over TRITON_CHECKPOINT/TRITON_MODEL, TRITON_DEVICE, TRITON_CONTEXT_LENGTH, then defaults."""
        checkpoint = checkpoint or os.environ.get("TRITON_CHECKPOINT") or os.environ.get("TRITON_MODEL")
        if not checkpoint:
            raise EngineError("no checkpoint: pass one or set TRITON_CHECKPOINT to a gpt-oss checkpoint folder")
        device = device or os.environ.get("TRITON_DEVICE") or ("cuda:0" if torch.cuda.is_available() else "cpu")
        if context_length is None:
            raw = os.environ.get("TRITON_CONTEXT_LENGTH", str(DEFAULT_CONTEXT_LENGTH))
            try:
                context_length = int(raw)
            except ValueError:
                raise EngineError(f"TRITON_CONTEXT_LENGTH must be a whole number of tokens, not {raw!r}") from None
        return cls(checkpoint, device=device, context_length=context_length)

    def kv_cache_usage(self) -> float:
        return self.cache.usage()

    def render(self, messages: list[Message], params: SamplingParams) -> list[int]:
        return harmony.render_prompt(messages, params.reasoning_effort)

    def generate(
        self, messages: list[Message], params: SamplingParams, cancel: CancelToken | None = None
    ) -> Iterator[Event]:
        """Check the request now (InvalidRequest before any event), then stream its events."""
        params = _validated(params)
        if not messages:
            raise InvalidRequest("no messages; send at least one user message")
        prompt = self.render(messages, params)
        if len(prompt) >= self.context_length:
            raise InvalidRequest(
                f"the conversation is {len(prompt)} tokens, more than the context of {self.context_length} allows "
                "(room for at least one reply token is needed); shorten it or start a new one"
            )
        return self._stream(prompt, params, cancel or CancelToken())

    def _prefill(self, prompt: list[int]) -> torch.Tensor:
        """Logits after the prompt. The prompt runs in chunks of `prefill_chunk` tokens counted from position 0.

        Whole chunks the last request already ran with the same tokens are reused from the cache. Only whole
        chunks, and only ones that came from a prefill: then every number is computed exactly as a cold
        start computes it (the same tokens in the same matmul shapes), so greedy replies never depend on
        what the engine served before. Keys from decode steps, computed one token at a time, round
        differently and are recomputed.
        """
        chunk = self.prefill_chunk
        shared = 0
        for a, b in zip(self.cached_tokens, prompt[:-1]):  # at least one token must run to give logits
            if a != b:
                break
            shared += 1
        reuse = min(shared // chunk, self.prefilled_chunks) * chunk
        self.cache.truncate(reuse)
        self.cached_tokens = list(prompt)
        self.last_reused_tokens = reuse
        for start in range(reuse, len(prompt), chunk):  # bounds attention's score matrix on long prompts
            part = torch.tensor(prompt[start : start + chunk], dtype=torch.long, device=self.torch_device)
            logits = self.model(part, self.cache)
        self.prefilled_chunks = len(prompt) // chunk
        return logits[-1]

    def _step(self, token: int) -> torch.Tensor:
        self.cached_tokens.append(token)
        return self.model(torch.tensor([token], device=self.torch_device), self.cache)[-1]

    def _stream(self, prompt: list[int], params: SamplingParams, cancel: CancelToken) -> Iterator[Event]:
        with self._lock:
            start = time.perf_counter()
            first_token_at = None
            sampler = Sampler(params)
            parser = harmony.HarmonyStream()
            stops = StopStrings(params.stop)
            produced, reason = 0, "length"
            try:
                logits = None if cancel.cancelled else self._prefill(prompt)
                while True:
                    if cancel.cancelled:
                        reason = "cancelled"
                        break
                    token = sampler(logits[: harmony.VOCAB_SIZE])  # a padded vocabulary's extra ids mean nothing
                    produced += 1
                    if first_token_at is None:
                        first_token_at = time.perf_counter()
                    if token in self.stop_tokens:
                        reason = "stop"
                        break
                    stopped = False
                    for delta in parser.feed(token):
                        text, stopped = stops.push(delta)
                        if text:
                            yield type(delta)(text)
                        if stopped:
                            break
                    if stopped:
                        reason = "stop"
                        break
                    if produced >= params.max_tokens or len(self.cached_tokens) + 1 >= self.context_length:
                        break
                    logits = self._step(token)
                if not stops.stopped:  # a stop string hides everything after it; otherwise show what is held
                    for delta in parser.finish():
                        text, _ = stops.push(delta)
                        if text:
                            yield type(delta)(text)
                    yield from stops.flush()
            except torch.cuda.OutOfMemoryError:
                raise EngineError("the GPU ran out of memory; try a shorter conversation or a smaller context length") from None
            finally:
                # Whatever happened (an error, a consumer that walked away), keep the token list true to the cache.
                self.cached_tokens = self.cached_tokens[: self.cache.length]
            end = time.perf_counter()
            first_token_at = first_token_at or end
            decode_time = end - first_token_at
            rate = (produced - 1) / decode_time if produced > 1 and decode_time > 0 else produced / max(end - start, 1e-9)
            usage = Usage(
                prompt_tokens=len(prompt),
                completion_tokens=produced,
                time_to_first_token_s=first_token_at - start,
                tokens_per_s=rate,
            )
            yield Finished(usage=usage, reason=reason)
