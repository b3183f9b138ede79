"""Engine: a conversation in, a stream of reasoning/answer deltas out, on one gpt-oss checkpoint.

`generate` serves one request at a time. For many at once, the scheduler drives the batched path:
`prepare` checks a request and renders its prompt, `forward_batch` runs one step of many sequences over the
paged KV cache (`paged_cache.py`), sized by `kv_cache_memory`. The single-request KV cache is kept between
requests, so a follow-up turn whose prompt extends the last conversation reuses the whole prefill chunks
it shares with it (see `_prefill`).
"""

from __future__ import annotations

import gc
import importlib
import logging
import os
import re
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
from kubrick.engine.paged_cache import DEFAULT_BLOCK_SIZE, DEFAULT_CPU_BYTES, DEFAULT_GPU_FRACTION, PagedKVCache
from kubrick.engine.sampler import Sampler
from kubrick.engine.stop import StopStrings
from kubrick.engine.switches import switched_off

DEFAULT_CONTEXT_LENGTH = 8192
# The model implementations an engine can run: the readable reference (the oracle), or the same model on
# Kubrick's Triton kernels (kernels issue). Both take (config, weights) and share forward(tokens, cache).
IMPLEMENTATIONS = {
    "reference": ("kubrick.engine.model", "Transformer"),
    "triton": ("kubrick.engine.fast_model", "GraphedFastTransformer"),  # decode steps replay a CUDA graph on a GPU
}
PREFILL_CHUNK = 512  # tokens per prefill step: 20b's scores stay near 1 GB even at an 8192-token context
DEFAULT_MAX_BATCH = 64  # sequences in one batched step
DEFAULT_STEP_TOKENS = 512  # tokens (decode + prefill) in one batched step: bounds a step's time

log = logging.getLogger(__name__)


def _setting(name: str, value, default: int) -> int:
    """A whole-number setting: the argument, else the environment variable, else the default."""
    raw = value if value is not None else os.environ.get(name, default)
    try:
        number = int(raw)
    except (TypeError, ValueError):
        raise EngineError(f"{name} must be a whole number, not {raw!r}") from None
    if number < 1:
        raise EngineError(f"{name} must be at least 1, not {number}")
    return number


def parse_kv_cache_memory(setting: str | float) -> tuple[str, float | int]:
    """A kv-cache-memory setting, checked without a device: ("fraction", f) for 0 < f <= 1 of the memory free,
    or ("bytes", n) for a size such as 512MiB or 2GiB; EngineError for anything else."""
    text = str(setting).strip()
    size = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(KiB|MiB|GiB|KB|MB|GB|B)?", text, re.IGNORECASE)
    units = {"b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9}
    if size and size.group(2):
        return "bytes", int(float(size.group(1)) * units[size.group(2).lower()])
    if size and 0 < float(size.group(1)) <= 1:
        return "fraction", float(size.group(1))
    raise EngineError(
        f"kv-cache-memory must be a fraction of free memory (0.9) or a size (512MiB, 4GiB), not {setting!r}"
    )


def kv_cache_fraction(setting: str | float | None, device: torch.device) -> float | None:
    """The fraction of free memory the KV-cache setting asks for, or None when it names a size."""
    raw = setting if setting is not None else os.environ.get("KUBRICK_KV_CACHE_MEMORY")
    if raw is None or raw == "":
        return DEFAULT_GPU_FRACTION if device.type == "cuda" else None
    kind, amount = parse_kv_cache_memory(raw)
    return amount if kind == "fraction" else None


def kv_cache_budget(setting: str | float | None, device: torch.device, held_back: int = 0) -> int:
    """Bytes for the paged KV cache. setting: a fraction (0 < f <= 1) of the memory free now (on a GPU, after
    the weights, less `held_back`: what the CUDA graphs will take), or a size such as 512MiB or 2GiB; default
    0.9 on a GPU, 256 MiB on a CPU."""
    raw = setting if setting is not None else os.environ.get("KUBRICK_KV_CACHE_MEMORY")
    if (raw is None or raw == "") and device.type != "cuda":
        return DEFAULT_CPU_BYTES
    fraction = kv_cache_fraction(setting, device)
    if fraction is None:
        return int(parse_kv_cache_memory(raw)[1])
    if device.type == "cuda":
        return int(max(0, torch.cuda.mem_get_info(device)[0] - held_back) * fraction)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * fraction)


def _validated(params: SamplingParams) -> SamplingParams:
    """The same checks a request's raw parameters get (a caller may build SamplingParams by hand)."""
    raw = asdict(params)
    raw["stop"] = list(raw["stop"])
    return parse_params(raw)


def _warm_sampling(vocab: int, device: torch.device) -> None:
    """Compile the sampling kernels (or load them from Triton's cache) before serving: compiled at the first
    sampled request, they would hold every stream back for a second or two. Rows as the scheduler passes them:
    float32 logits of the model's vocabulary, cut to the tokenizer's (a strided view)."""
    from kubrick.engine.sampler import sample_rows

    logits = torch.zeros(2, vocab, dtype=torch.float32, device=device)[:, : min(vocab, harmony.VOCAB_SIZE)]
    sample_rows(logits, [Sampler(SamplingParams(temperature=1.0, top_p=0.9, seed=0)),
                         Sampler(SamplingParams(temperature=1.0, top_k=40, seed=1))])
    torch.cuda.synchronize(device)


class Engine:
    def __init__(
        self,
        checkpoint: str | Path,
        device: str = "cpu",
        context_length: int = DEFAULT_CONTEXT_LENGTH,
        implementation: str | None = None,
        kv_cache_memory: str | float | None = None,
        max_batch: int | None = None,
        step_tokens: int | None = None,
        block_size: int | None = None,
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
        del weights  # the model holds what it needs (the Triton one re-lays some tensors out: no second copy)
        self.cache = self.model.new_cache(context_length)
        self.cached_tokens: list[int] = []  # the tokens whose keys/values the cache holds
        self.prefill_chunk = PREFILL_CHUNK
        self.prefilled_chunks = 0  # leading whole chunks of the cache that a prefill computed
        self.last_reused_tokens = 0  # prompt tokens the last request took from the cache
        self.stop_tokens = harmony.stop_tokens()
        self._lock = threading.Lock()
        self.max_batch = _setting("KUBRICK_MAX_BATCH", max_batch, DEFAULT_MAX_BATCH)
        self.step_tokens = _setting("KUBRICK_STEP_TOKENS", step_tokens, DEFAULT_STEP_TOKENS)
        self.block_size = _setting("KUBRICK_KV_BLOCK_SIZE", block_size, DEFAULT_BLOCK_SIZE)
        if self.step_tokens < self.max_batch + self.block_size:  # room for every decode plus one prefill block
            raise EngineError(
                f"KUBRICK_STEP_TOKENS ({self.step_tokens}) must be at least KUBRICK_MAX_BATCH ({self.max_batch}) "
                f"+ the block size ({self.block_size}), so prompts keep moving while every sequence decodes"
            )
        # The scheduler batches requests over the paged cache for models that read it (both do; a model
        # without forward_batch would be served one request at a time through generate()).
        self.paged: PagedKVCache | None = None
        self.graph_bytes = 0  # GPU memory the CUDA graphs of batched steps take (measured; 0 without graphs)
        if hasattr(self.model, "forward_batch"):
            graphed = hasattr(self.model, "capture_paged") and self.torch_device.type == "cuda"
            if graphed and kv_cache_fraction(kv_cache_memory, self.torch_device) is not None:
                self.graph_bytes = self._measure_graphs()
            self.paged = self._new_paged_cache(kv_cache_budget(kv_cache_memory, self.torch_device, self.graph_bytes))
            self.paged.prefix_reuse = not switched_off("KUBRICK_PREFIX_CACHE")
            if graphed:  # decode steps replay CUDA graphs; no request pays for them
                self._capture(self.paged)
                _warm_sampling(self.config.vocab_size, self.torch_device)
            log.info("%s", self.kv_cache_description())

    def _capture(self, cache: PagedKVCache) -> None:
        self.model.capture_paged(cache, cache.blocks_needed(self.context_length), self.max_batch, self.step_tokens)

    def _measure_graphs(self) -> int:
        """Bytes the CUDA graphs of batched steps take (their static buffers and pools, and what their warm-up
        leaves cached), measured by capturing them once over a small cache: they do not depend on the cache's
        size, so the real cache is then sized from the memory left after weights and graphs."""
        device = self.torch_device
        torch.cuda.synchronize(device)
        free = torch.cuda.mem_get_info(device)[0]
        probe = self._paged_cache_of(max(64, 2 * -(-self.context_length // self.block_size)))  # room to warm up
        try:
            self._capture(probe)
            torch.cuda.synchronize(device)
            used = free - torch.cuda.mem_get_info(device)[0] - probe.nbytes()
        finally:
            self.model.release_paged()
            del probe
            gc.collect()
            torch.cuda.empty_cache()
        return max(0, used)

    def _window_blocks(self) -> int:
        """Window-layer blocks for max_batch sequences (twice over, so finished prompts stay cached)."""
        span = -(-(self.config.sliding_window + self.step_tokens) // self.block_size) + 1
        return 2 * self.max_batch * span

    def _new_paged_cache(self, budget: int) -> PagedKVCache:
        """The window-layer blocks (_window_blocks), the rest of the budget in full-attention blocks."""
        c, bs = self.config, self.block_size
        sliding = sum(c.is_sliding(n) for n in range(c.num_hidden_layers))
        full_bytes = PagedKVCache.block_bytes(c.num_hidden_layers - sliding, c.num_key_value_heads, c.head_dim, bs)
        window_bytes = PagedKVCache.block_bytes(sliding, c.num_key_value_heads, c.head_dim, bs)
        full_blocks = (budget - self._window_blocks() * window_bytes) // max(full_bytes, 1)
        if full_blocks < 1:
            raise EngineError(
                f"a KV-cache budget of {budget / 2**20:.0f} MiB is too small for {self.max_batch} sequences of "
                f"{self.step_tokens}-token steps; raise --kv-cache-memory or lower KUBRICK_MAX_BATCH/KUBRICK_STEP_TOKENS"
            )
        return self._paged_cache_of(int(full_blocks))

    def _paged_cache_of(self, full_blocks: int) -> PagedKVCache:
        return self.model.new_paged_cache(full_blocks, self._window_blocks(), self.block_size)

    def kv_cache_description(self) -> str:
        """One line for the log: how many tokens the paged KV cache holds and its size."""
        if self.paged is None:
            return f"KV cache: one sequence of {self.context_length} tokens ({self.cache.nbytes() / 2**20:.0f} MiB)"
        p = self.paged
        graphs = f"; sized after the CUDA graphs' {self.graph_bytes / 2**20:.0f} MiB" if self.graph_bytes else ""
        return (
            f"paged KV cache: {p.capacity_tokens()} tokens in {p.full_pool.num_blocks} blocks of {p.block_size} "
            f"+ {p.window_pool.num_blocks} sliding-window blocks, {p.nbytes() / 2**20:.0f} MiB; batches of up to "
            f"{self.max_batch} sequences, {self.step_tokens} tokens a step{graphs}"
        )

    def prepare(self, messages: list[Message], params: SamplingParams) -> tuple[list[int], SamplingParams]:
        """Check a request (InvalidRequest, worded for a person) and render its prompt."""
        params = _validated(params)
        if not messages:
            raise InvalidRequest("no messages; send at least one user message")
        prompt = self.render(messages, params)
        if len(prompt) >= self.context_length:
            raise InvalidRequest(
                f"the conversation is {len(prompt)} tokens, more than the context of {self.context_length} allows "
                "(room for at least one reply token is needed); shorten it or start a new one"
            )
        return prompt, params

    def forward_batch(self, segments, device_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """One batched step over the paged cache: logits [segments, vocab] (see model.Transformer.forward_batch).

        device_tokens: one token each for the first len(device_tokens) segments (the decode rows; prompt chunks
        may follow), as a device tensor (the last step's picks, not yet read back), fed in place of their
        placeholders. The kernel engine queues such a step behind the last
        one without waiting for it; the reference model reads the tokens first.
        """
        try:
            if device_tokens is None:
                return self.model.forward_batch(segments, self.paged)
            if getattr(self.model, "takes_device_tokens", False):
                return self.model.forward_batch(segments, self.paged, device_tokens=device_tokens)
            picks = device_tokens.tolist()  # the first len(picks) segments are one placeholder each
            fed = [(seq, [t]) for (seq, _), t in zip(segments, picks)] + list(segments[len(picks):])
            return self.model.forward_batch(fed, self.paged)
        except torch.cuda.OutOfMemoryError:
            raise EngineError("the GPU ran out of memory; lower --kv-cache-memory or KUBRICK_STEP_TOKENS") from None

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
        """The fuller of the two caches: the paged one (the scheduler's batches) and the one of generate()."""
        return max(self.cache.usage(), self.paged.usage() if self.paged is not None else 0.0)

    def render(self, messages: list[Message], params: SamplingParams) -> list[int]:
        return harmony.render_prompt(messages, params.reasoning_effort)

    def generate(
        self, messages: list[Message], params: SamplingParams, cancel: CancelToken | None = None
    ) -> Iterator[Event]:
        """Check the request now (InvalidRequest before any event), then stream its events."""
        prompt, params = self.prepare(messages, params)
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
