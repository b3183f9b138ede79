"""gpt-oss on Kubrick's Triton kernels: the reference model's weights, cache and interface, a faster forward.

`FastTransformer(config, weights)` is a drop-in for `model.Transformer` (same `forward(tokens, cache)`,
`new_cache`, `weights_bytes`), checked against it in tests/kernels/test_fast_model.py. Per layer:
RMSNorm kernel -> QKV matmul -> one kernel for YaRN RoPE (cos/sin from the reference's own RotaryEmbedding) +
keys/values written into the reference KVCache in place (for one token both in one launch, the GEMV's rows
stored in RoPE's pairs) -> sink attention kernel (prefill: flash-style; one new
token: split-KV decode) -> out matmul -> one kernel for the residual add, RMSNorm (at decode also in the MoE
GEMV's input layout) and the router (bf16-rounded logits, as the reference's bf16 matmul picks) -> MXFP4 MoE
kernel (GEMV for few tokens, expert tiles for many), which sums the experts into the residual stream.
Between layers the residual stream is float32 holding what the model's bf16 adds give (see _moe).
Dense matmuls, the unembedding included: at one token the GEMV of kernels/linear.py; otherwise torch/cuBLAS.

Decode loops: `CudaGraphDecoder` (one sequence, one captured step replayed per token),
`CudaGraphBatchDecoder` (a static `BatchedKVCache` of B slots, one graph per batch-size bucket) and
`GraphedFastTransformer`, the class the Engine runs on a GPU (FastTransformer whose one-token steps replay
the graph captured over the engine's cache).

Continuous batching: `forward_batch(segments, paged_cache)` runs one scheduler step (decode tokens and prompt
chunks of many sequences) over the paged KV cache, whose blocks the attention kernels read in place through
block tables. A step of decode tokens only replays `PagedGraphDecoder`'s graph for its batch-size bucket; a
step with prompt chunks replays `PagedMixedGraphs`' graph for its bucket of rows (mixed_graphs.py: the decode
rows' attention and all prompt chunks' attention inside it, on fixed-size inputs), or runs eagerly when it has
more rows or sequences than the graphs were captured for. No step waits for the GPU to be launched, so the
scheduler queues each behind the last (chained steps).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from kubrick.engine.config import ModelConfig
from kubrick.engine.cuda_graphs import capture, on_device, warm_up
from kubrick.engine.kernels import moe, uses_gemv
from kubrick.engine.kernels._common import block_config
from kubrick.engine.kernels.attention import (attention_decode, attention_prefill, attention_prefill_varlen, pick_splits,
                                              prefill_tiles)
from kubrick.engine.kernels.linear import linear
from kubrick.engine.kernels.moe_gemv import new_gemv_input
from kubrick.engine.kernels.rmsnorm import rmsnorm
from kubrick.engine.kernels.rope import interleave_rope_rows, qkv_rope_cache
from kubrick.engine.kernels.router import norm_router
from kubrick.engine.kernels.step_inputs import KV_LENS_EACH, KV_LENS_LAST, KV_LENS_NONE, step_inputs
from kubrick.engine.kv_cache import KVCache
from kubrick.engine.mixed_graphs import PagedMixedGraphs
from kubrick.engine.model import RotaryEmbedding
from kubrick.engine.paged_cache import PagedKVCache, SequenceBlocks
from kubrick.engine.step_staging import StepStaging


class FastTransformer:
    takes_device_tokens = True  # forward_batch may feed the last step's picks without reading them back

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor]):
        """weights: the checkpoint's tensors (not changed). The model's own dict holds the QKV projections with
        their rows in RoPE's pairs instead (`…attn.qkv.weight.rope_pairs`, rope.interleave_rope_rows), so that
        the one-token GEMV rotates in its epilogue: drop the caller's dict after this, or those stay twice."""
        self.config = config
        self.w = dict(weights)
        for layer in range(config.num_hidden_layers):
            for part in ("weight", "bias"):
                name = f"block.{layer}.attn.qkv.{part}"
                self.w[name + ".rope_pairs"] = interleave_rope_rows(self.w.pop(name), config.head_dim)
        self.embedding = weights["embedding.weight"]
        self.device, self.dtype = self.embedding.device, self.embedding.dtype
        self.rope = RotaryEmbedding(config, self.device)
        self.paged_decoder: PagedGraphDecoder | None = None  # GraphedFastTransformer.capture_paged sets these
        self.mixed_graphs: PagedMixedGraphs | None = None

    def new_cache(self, capacity: int) -> KVCache:
        c = self.config
        return KVCache(c.num_hidden_layers, capacity, c.num_key_value_heads, c.head_dim, self.device)

    def new_batched_cache(self, batch: int, capacity: int) -> "BatchedKVCache":
        c = self.config
        return BatchedKVCache(c.num_hidden_layers, batch, capacity, c.num_key_value_heads, c.head_dim, self.device)

    def __call__(self, tokens: torch.Tensor, cache: KVCache, all_logits: bool = False) -> torch.Tensor:
        return self.forward(tokens, cache, all_logits)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, cache: KVCache, all_logits: bool = False) -> torch.Tensor:
        """tokens [n] -> fp32 logits [n, vocab] (or [1, vocab] for the last token); advances the cache by n."""
        start, n = cache.length, len(tokens)
        if start + n > cache.capacity:
            raise ValueError(f"KV cache full: {start + n} tokens > capacity {cache.capacity}")
        positions = torch.arange(start, start + n, device=self.device)
        logits = self._run(tokens.to(self.device), positions, cache, start, all_logits)
        cache.advance(n)
        return logits

    @torch.inference_mode()
    def decode_step(self, token: torch.Tensor, position: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One token at one position, both int64 tensors [1] on the device -> logits [1, vocab].

        No host work at all, so CUDA graphs can capture it (see CudaGraphDecoder). Writes the token's keys and
        values at `position`; does not touch cache.length.
        """
        return self._run(token, position, cache, start=None, all_logits=False)

    def _run(self, tokens, positions, cache: KVCache, start: int | None, all_logits: bool) -> torch.Tensor:
        # One sequence: its cache rows are its positions; keys [S, KVH, D] are seen as a batch of one.
        kv = [(cache.keys[i], cache.values[i], cache.keys[i][None], cache.values[i][None])
              for i in range(self.config.num_hidden_layers)]
        # (the decode attention reads the sequence's length, the last position + 1, from the device)
        return self._layers(tokens, positions, positions, kv, start, KV_LENS_LAST, all_logits)

    @torch.inference_mode()
    def decode_batch(self, tokens: torch.Tensor, positions: torch.Tensor, cache: "BatchedKVCache") -> torch.Tensor:
        """One new token for each of B sequences: tokens, positions int64 [B] on the device -> logits [B, vocab].

        Sequence b lives in slot b of the static batched cache and writes its keys/values at `positions[b]`.
        No host work (CUDA-graph capturable); cache lengths are the caller's business.
        """
        batch = tokens.shape[0]
        rows = positions + cache.slot_offsets[:batch]  # rows of the flattened [B*S, KVH, D] cache
        kv = [cache.layer(i, batch) for i in range(self.config.num_hidden_layers)]
        return self._layers(tokens, positions, rows, kv, None, KV_LENS_EACH, all_logits=True)

    def _step_inputs(self, tokens: torch.Tensor, positions: torch.Tensor, kv_lens: int = KV_LENS_NONE):
        """(embeddings, rotary cos, sin, kv_lens) of a step's tokens, in one launch (kernels/step_inputs.py)."""
        return step_inputs(tokens, positions, self.embedding, self.rope.inv_freq, self.rope.concentration, kv_lens)

    def _layers(self, tokens, positions, rows, kv, start: int | None, kv_lens_kind: int, all_logits: bool):
        c = self.config
        x, cos, sin, kv_lens = self._step_inputs(tokens, positions, kv_lens_kind)
        for layer in range(c.num_hidden_layers):
            x = self._moe(layer, *self._attention(layer, x, cos, sin, rows, kv[layer], start, kv_lens))
        x = rmsnorm(x if all_logits else x[-1:], self.w["norm.scale"], c.rms_norm_eps, dtype=self.dtype)
        return self._unembed(x)

    # -- continuous batching over the paged KV cache ------------------------------------------------------------

    def new_paged_cache(self, num_blocks: int, window_blocks: int, block_size: int) -> PagedKVCache:
        return PagedKVCache.for_model(self.config, num_blocks, window_blocks, block_size, self.device)

    @torch.inference_mode()
    def forward_batch(self, segments: list[tuple[SequenceBlocks, list[int]]], cache: PagedKVCache,
                      device_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """One scheduler step, as model.Transformer.forward_batch: each segment (a sequence and its next tokens)
        runs at positions seq.length …; returns fp32 logits of the last token of each segment that reached the
        end of its sequence's known tokens, in order; advances every sequence.

        device_tokens: the first len(device_tokens) segments' one token each, on the GPU (the last step's
        picks), to feed instead of their placeholders: the step is queued without waiting for the last one to
        finish. Nothing here waits for the GPU: host inputs cross in pinned copies, and the logits rows wanted
        are chosen on the host.
        """
        graphs = self.paged_decoder if self.paged_decoder is not None and self.paged_decoder.cache is cache else None
        graphed = (graphs is not None and len(segments) <= graphs.buckets[-1]
                   and all(len(part) == 1 for _, part in segments))
        for seq, part in segments:
            cache.prepare(seq, part, prefill=seq.length < len(seq.tokens))
        step = PagedStep.build(segments, cache, width=graphs.max_blocks if graphs else None)
        if graphs is not None and step.decode_count <= graphs.buckets[-1]:
            # The decode kernel's splits of the graph bucket that would hold these decodes: compiled already.
            step.splits = graphs.steps[graphs.bucket_for(max(step.decode_count, 1))].splits
        mixed = self.mixed_graphs
        if graphed:
            logits = graphs.step(step, device_tokens)[: len(segments)]
        elif mixed is not None and mixed.cache is cache and mixed.fits(step):
            logits = mixed.step(self, step, device_tokens)  # one CUDA graph, attention included
        else:
            moved = step.to(self.device)
            if device_tokens is not None:  # the decode rows come first
                moved.tokens[: len(device_tokens)] = device_tokens
            logits = self._paged_layers(moved, cache, last_rows=True)
        for seq, part in segments:
            cache.advance(seq, len(part))
        wanted = [i for i, (seq, _) in enumerate(segments) if seq.length >= len(seq.tokens)]
        if len(wanted) == len(segments):
            return logits
        return logits.index_select(0, on_device(wanted, logits.device, torch.long))

    def _paged_layers(self, step: "PagedStep", cache: PagedKVCache, last_rows: bool) -> torch.Tensor:
        """The model over one step's rows; logits of each segment's last row (last_rows) or of every row."""
        return self._paged_logits(self._paged_stream(step, cache), step, last_rows)

    def _paged_stream(self, step: "PagedStep", cache: PagedKVCache) -> torch.Tensor:
        """Every layer over one step's rows -> the residual stream after the last (before the final norm)."""
        x, cos, sin, _ = self._step_inputs(step.tokens, step.positions)
        for layer in range(self.config.num_hidden_layers):
            q = self._paged_qkv(layer, x, cos, sin, step.rows_full, step.rows_window, cache)
            out = self._paged_attention(layer, q, step, cache)
            x = self._moe(layer, *self._out_projection(layer, out, x))
        return x

    def _paged_logits(self, x: torch.Tensor, step: "PagedStep | None", last_rows: bool) -> torch.Tensor:
        if last_rows and not step.decode_only:
            x = x[step.last_rows]
        x = rmsnorm(x, self.w["norm.scale"], self.config.rms_norm_eps, dtype=self.dtype)
        return self._unembed(x)

    def _unembed(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 logits. One row on a GPU: our GEMV (366 against cuBLAS's 410 µs on the H100); on the CPU the
        interpreted GEMV over the 201,088-row vocabulary would take minutes, so torch's matmul."""
        w = self.w["unembedding.weight"]
        return (linear(x, w) if x.is_cuda else F.linear(x, w)).float()

    def _paged_qkv(self, layer, x, cos, sin, rows_full, rows_window, cache: PagedKVCache,
                   q_out: torch.Tensor | None = None) -> torch.Tensor:
        """Attention norm, QKV projection, RoPE; keys and values written to the pools at their rows -> q [n, QH, D]."""
        c, p = self.config, f"block.{layer}.attn."
        keys, values = cache.keys[layer], cache.values[layer]  # pools [blocks, PAGE, KVH, D]
        t = rmsnorm(x, self.w[p + "norm.scale"], c.rms_norm_eps, dtype=self.dtype)
        rows = rows_window if c.is_sliding(layer) else rows_full
        return qkv_rope_cache(t, self.w[p + "qkv.weight.rope_pairs"], self.w[p + "qkv.bias.rope_pairs"], cos, sin,
                              rows, keys.flatten(0, 1), values.flatten(0, 1), c.num_attention_heads,
                              c.num_key_value_heads, out=q_out)

    def _paged_attention(self, layer, q, step: "PagedStep", cache: PagedKVCache,
                         out: torch.Tensor | None = None) -> torch.Tensor:
        """Sink attention of the step's rows of q over the paged pools -> [n, QH * D] (into `out` if given;
        rows of `out` past the step's are left alone)."""
        c, p = self.config, f"block.{layer}.attn."
        n = step.tokens.shape[0]
        sliding = c.is_sliding(layer)
        keys, values = cache.keys[layer], cache.values[layer]
        window = c.sliding_window if sliding else 0
        table = step.table_window if sliding else step.table_full
        sinks = self.w[p + "sinks"]
        splits = step.splits.get(window) if step.splits else None
        out = torch.empty_like(q) if out is None else out.view(-1, *q.shape[1:])
        if step.decode_only:
            attention_decode(q[:n], keys, values, sinks, step.kv_lens, window=window, splits=splits, block_table=table,
                             out=out[:n])
        else:
            if step.decode_count:  # one-token segments: the decode kernel, in one launch
                d = step.decode_segments
                out[step.decode_rows] = attention_decode(q[step.decode_rows], keys, values, sinks, step.kv_lens[d],
                                                         window=window, splits=splits, block_table=table[d])
            if step.prefills:  # prompt chunks: one flash launch for them all, over the step's tile list
                attention_prefill_varlen(q, keys, values, sinks, step.tiles, table, window=window, out=out)
        return out.reshape(out.shape[0], -1)

    def _attention(self, layer, x, cos, sin, rows, kv, start: int | None, kv_lens):
        """start None: every row of x is one new token of its own sequence (decode); else a prefill chunk."""
        c, p = self.config, f"block.{layer}.attn."
        n = x.shape[0]
        keys, values, batched_keys, batched_values = kv  # rows view [R, KVH, D]; per sequence [B, S, KVH, D]
        t = rmsnorm(x, self.w[p + "norm.scale"], c.rms_norm_eps, dtype=self.dtype)
        q = qkv_rope_cache(t, self.w[p + "qkv.weight.rope_pairs"], self.w[p + "qkv.bias.rope_pairs"], cos, sin, rows,
                           keys, values, c.num_attention_heads, c.num_key_value_heads)
        window = c.sliding_window if c.is_sliding(layer) else 0
        sinks = self.w[p + "sinks"]
        if start is None or n == 1:
            out = attention_decode(q, batched_keys, batched_values, sinks, kv_lens, window=window)
        else:
            out = attention_prefill(q[None], batched_keys, batched_values, sinks, start_pos=start, window=window)[0]
        return self._out_projection(layer, out.reshape(n, -1), x)

    def _out_projection(self, layer: int, out: torch.Tensor, x: torch.Tensor):
        """The attention's out-projection -> what _moe takes: (the residual stream x, the projection), which
        _moe's first kernel adds."""
        p = f"block.{layer}.attn."
        return x, linear(out, self.w[p + "out.weight"], self.w[p + "out.bias"])

    def _moe(self, layer: int, x: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """The MoE block and both residual adds. x is the residual stream (the embeddings at layer 0, float32
        after), `attention` the out-projection not yet added to it. One kernel (norm_router) adds them as the
        model's bf16 add does, writes the sum to a new float32 stream, norms it and routes it; the experts are
        summed into the stream in place, which is returned (the next norm rounds it to the model's dtype).
        Against bf16 adds between layers, this saves a copy of the residual to float32 and a cast back a layer."""
        c, p = self.config, f"block.{layer}.mlp."
        weights = [self.w[p + name] for name in ("mlp1_weight.blocks", "mlp1_weight.scales", "mlp1_bias",
                                                   "mlp2_weight.blocks", "mlp2_weight.scales", "mlp2_bias")]
        stream = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        x_gemv = None  # at decode the MoE GEMV's input layout, written by the same kernel
        if uses_gemv(x.shape[0], c.experts_per_token, x.device):
            x_gemv = new_gemv_input(x.shape[0], x.shape[1], attention.dtype, x.device)
        t, ids, route = norm_router(x, attention, self.w[p + "norm.scale"], c.rms_norm_eps, self.w[p + "gate.weight"],
                                    self.w[p + "gate.bias"], c.experts_per_token, stream=stream, gemv_out=x_gemv,
                                    round_logits=attention.dtype == torch.bfloat16)
        return moe(t, ids, route, *weights, swiglu_alpha=c.swiglu_alpha, swiglu_limit=c.swiglu_limit,
                   x_gemv=x_gemv, out=stream)

    def weights_bytes(self) -> int:
        seen, total = set(), 0
        for t in self.w.values():
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total


class CudaGraphDecoder:
    """Batch-1 decode by replaying one captured CUDA graph of FastTransformer.decode_step.

    The token and its position live in static device buffers: a step copies them in, replays the graph and
    returns the static logits buffer (valid until the next step). The cache is the one captured with.
    """

    def __init__(self, model: FastTransformer, cache: KVCache):
        self.cache = cache  # no reference to the model: model -> decoder -> model would hold GPU memory until gc
        device = model.device
        self.token = torch.zeros(1, dtype=torch.long, device=device)
        # Warm-up and capture write keys/values at the last cache row, which no prompt has reached yet.
        self.position = torch.full((1,), cache.capacity - 1, dtype=torch.long, device=device)

        def decode():
            return model.decode_step(self.token, self.position, cache)

        warm_up(device, decode)
        self.graph, self.logits = capture(decode)

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """token: int64 tensor [1] on the device (e.g. the previous step's argmax) -> logits [1, vocab]."""
        if self.cache.length >= self.cache.capacity:
            raise ValueError(f"KV cache full: {self.cache.length + 1} tokens > capacity {self.cache.capacity}")
        self.token.copy_(token)
        self.position.fill_(self.cache.length)
        self.graph.replay()
        self.cache.advance(1)
        return self.logits


class BatchedKVCache:
    """Static keys/values for up to `batch` sequences: per layer [batch, capacity, KVH, D], slot b = sequence b.

    Preallocated once, so CUDA graphs can be captured over it; a graph for a smaller batch bucket uses the
    first slots (a prefix view, no copy).
    """

    def __init__(self, layers: int, batch: int, capacity: int, kv_heads: int, head_dim: int, device,
                 dtype=torch.bfloat16):
        self.batch, self.capacity = batch, capacity
        shape = (batch, capacity, kv_heads, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.slot_offsets = torch.arange(batch, device=device) * capacity  # first row of each slot, flattened

    def layer(self, layer: int, batch: int):
        """(keys rows [batch*S, KVH, D], values rows, keys [batch, S, KVH, D], values) of the first `batch` slots."""
        k, v = self.keys[layer][:batch], self.values[layer][:batch]
        return k.flatten(0, 1), v.flatten(0, 1), k, v

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


class CudaGraphBatchDecoder:
    """Batched decode: one captured CUDA graph of FastTransformer.decode_batch per batch-size bucket.

    `step(tokens, positions)` with n ≤ the largest bucket sequences (slots 0 … n-1) replays the smallest
    bucket that holds n; the idle slots of the bucket decode token 0 at the last row of their own slot (as do
    warm-up and capture), which no live sequence has reached. The graphs share one memory pool (only one replays at a time). Returns the bucket's
    static logits [bucket, vocab] (valid until the next step).
    """

    def __init__(self, model: FastTransformer, cache: BatchedKVCache, buckets=(1, 8, 32, 64)):
        self.cache = cache  # no reference to the model: model -> decoder -> model would hold GPU memory until gc
        self.buckets = sorted(b for b in buckets if b <= cache.batch) or [cache.batch]
        device = model.device
        self.tokens = torch.zeros(cache.batch, dtype=torch.long, device=device)
        self.idle_position = cache.capacity - 1
        self.positions = torch.full((cache.batch,), self.idle_position, dtype=torch.long, device=device)
        self.graphs, self.logits, pool = {}, {}, None
        for bucket in self.buckets:
            tokens, positions = self.tokens[:bucket], self.positions[:bucket]

            def decode(tokens=tokens, positions=positions):
                return model.decode_batch(tokens, positions, cache)

            warm_up(device, decode)
            graph, self.logits[bucket] = capture(decode, pool)
            pool = graph.pool()
            self.graphs[bucket] = graph

    def bucket_for(self, n: int) -> int:
        for bucket in self.buckets:
            if n <= bucket:
                return bucket
        raise ValueError(f"{n} sequences, but the largest batch bucket is {self.buckets[-1]}")

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens, positions: int64 [n] on the device -> logits [bucket, vocab]; rows n … are idle slots."""
        n = tokens.shape[0]
        bucket = self.bucket_for(n)
        self.tokens[:n].copy_(tokens)
        self.positions[:n].copy_(positions)
        if n < bucket:
            self.tokens[n:bucket].zero_()
            self.positions[n:bucket].fill_(self.idle_position)
        self.graphs[bucket].replay()
        return self.logits[bucket]


class GraphedFastTransformer(FastTransformer):
    """What the Engine runs on a GPU: FastTransformer whose one-token steps replay a captured CUDA graph.

    Same interface as model.Transformer. `new_cache` captures the decode graph over the new cache (so no
    request pays for it); `forward` of one token on that cache replays it, everything else (prefill chunks,
    another cache, all_logits) runs eagerly. On a CPU it is plain FastTransformer.
    """

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor]):
        super().__init__(config, weights)
        self.decoder: CudaGraphDecoder | None = None

    def capture_paged(self, cache: PagedKVCache, max_blocks: int, max_batch: int, max_rows: int | None = None) -> None:
        """Capture the graphs of continuous batching over `cache` (sequences up to max_blocks blocks): decode
        steps of up to max_batch sequences, and mixed steps of up to max_rows rows (mixed_graphs.py)."""
        if self.device.type == "cuda":
            self.paged_decoder = self.mixed_graphs = None  # free the old graphs' pools first
            self.paged_decoder = PagedGraphDecoder(self, cache, max_blocks, max_batch)
            if max_rows:
                self.mixed_graphs = PagedMixedGraphs(self, cache, max_rows, max_blocks, max_batch)
            self._compile_mixed_steps(cache)
            self._load_tail_kernels(max_batch)

    def release_paged(self) -> None:
        """Drop the graphs of continuous batching (their memory pools go back to the caching allocator)."""
        self.paged_decoder = self.mixed_graphs = None

    def _load_tail_kernels(self, rows: int) -> None:
        """Run a step's eager tail (final norm, unembedding, float32 copy, argmax) once at every row count up to
        `rows`. cuBLAS picks its kernel by the row count, and CUDA loads a kernel's module at its first launch
        (lazy loading), waiting for the GPU to go idle: mid-serving that held the launch of a queued step for
        ~36 ms the first time a step had 17, 33, 42 or 49 segments (BENCHMARKS.md run 41)."""
        x = torch.zeros(rows, self.config.hidden_size, dtype=self.dtype, device=self.device)
        for n in range(1, rows + 1):
            self._paged_logits(x[:n], None, last_rows=False).argmax(-1)
        torch.cuda.synchronize(self.device)

    def _compile_mixed_steps(self, cache: PagedKVCache) -> None:
        """Run prompts of each kind through forward_batch once, so that no request waits while Triton compiles
        the kernels of eager steps (prefill attention, the grouped MoE's two block tables)."""
        reuse, cache.prefix_reuse = cache.prefix_reuse, False
        short, long = cache.admit([2] * 17, 18, 512), cache.admit([1] * 600, 601, 512)
        try:
            if short is None or long is None:
                return  # a cache too small for this: the first requests compile instead
            self.forward_batch([(short, [2] * 17)], cache)  # 17 tokens: the small MoE table
            self.forward_batch([(short, [3]), (long, [1] * 512)], cache)  # a decode beside a long chunk
            self.forward_batch([(long, [1] * 88)], cache)  # a chunk that starts mid-prompt, past the window
        finally:
            for seq in (short, long):
                if seq is not None:
                    cache.release(seq)
            cache.drop_cached()
            cache.prefix_reuse = reuse

    def new_cache(self, capacity: int) -> KVCache:
        cache = super().new_cache(capacity)
        if self.device.type == "cuda":
            self.decoder = None  # drop the old graph (and its memory pool) before capturing the new one
            self.decoder = CudaGraphDecoder(self, cache)
        return cache

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, cache: KVCache, all_logits: bool = False) -> torch.Tensor:
        decoder = self.decoder
        if decoder is not None and decoder.cache is cache and len(tokens) == 1:
            return decoder.step(tokens.to(self.device).view(1)).clone()  # the static buffer is rewritten next step
        return super().forward(tokens, cache, all_logits)


@dataclass
class PagedStep:
    """One scheduler step's inputs, as the kernels want them: per row (token) and per segment (sequence)."""

    tokens: torch.Tensor  # int64 [rows]
    positions: torch.Tensor  # int64 [rows]
    rows_full: torch.Tensor  # int64 [rows]: cache row (block * PAGE + offset) of each token's keys, full layers
    rows_window: torch.Tensor  # the same in the sliding-window pools
    kv_lens: torch.Tensor  # int32 [segments]: keys each segment's last token sees
    table_full: torch.Tensor  # int32 [segments, blocks]
    table_window: torch.Tensor
    decode_only: bool  # every segment is one token (the decode kernel takes the whole step)
    decode_count: int  # one-token segments (in a mixed step) …
    decode_segments: slice | torch.Tensor  # … which they are
    decode_rows: slice | torch.Tensor  # their rows (a slice when they come first, as the scheduler puts them)
    prefills: list[tuple[int, int, int, int]]  # (segment, first row, length, start position) of longer ones
    last_rows: torch.Tensor  # int64 [segments]: the last row of each segment
    splits: dict[int, int] | None = None  # decode splits per window, fixed for a CUDA graph
    tiles: torch.Tensor | None = None  # the prompt chunks' prefill tiles, on the device (set by `to`)

    @classmethod
    def build(cls, segments: list[tuple[SequenceBlocks, list[int]]], cache: PagedKVCache,
              width: int | None = None) -> "PagedStep":
        """Host arrays (numpy, then CPU tensors) for the segments, whose blocks `cache.prepare` has allocated.
        width: block-table columns (default: as many as the longest segment needs; a fixed width keeps the
        kernels from compiling a variant per table stride).

        Whole-step numpy operations, not a few per segment: at 64 decodes a step the per-segment version took
        ~1 ms of the engine thread's Python, time the server's response thread waits for the interpreter lock."""
        count = len(segments)
        lengths = np.fromiter((len(part) for _, part in segments), dtype=np.int64, count=count)
        starts = np.fromiter((seq.length for seq, _ in segments), dtype=np.int64, count=count)
        slots = np.fromiter((seq.slot for seq, _ in segments), dtype=np.int64, count=count)
        ends = np.cumsum(lengths)  # one past each segment's last row
        first_rows = ends - lengths
        total = int(ends[-1])
        # Row r of segment i sits at position starts[i] + (r - first_rows[i]).
        positions = np.arange(total, dtype=np.int64) + np.repeat(starts - first_rows, lengths)
        rows_full, rows_window = cache.rows_at(np.repeat(slots, lengths), positions)
        tokens = np.fromiter(itertools.chain.from_iterable(part for _, part in segments), dtype=np.int64, count=total)
        single = lengths == 1
        decode_segments = np.flatnonzero(single).tolist()
        decode_rows = first_rows[single].tolist()
        prefills = [(int(i), int(first_rows[i]), int(lengths[i]), int(starts[i])) for i in np.flatnonzero(~single)]
        decodes = len(decode_rows)
        if decode_rows == list(range(decodes)) and decode_segments == decode_rows:
            decode_rows = decode_segments = slice(0, decodes)
        kv_lens = starts + lengths
        cols = cache.blocks_needed(int(kv_lens.max()))
        if width is not None and width >= cols:
            cache.ensure_table_width(width)
            cols = width
        return cls(
            tokens=torch.from_numpy(tokens),
            positions=torch.from_numpy(positions),
            rows_full=torch.from_numpy(rows_full),
            rows_window=torch.from_numpy(rows_window),
            kv_lens=torch.from_numpy(kv_lens.astype(np.int32)),
            table_full=torch.from_numpy(np.ascontiguousarray(cache.table_full[slots, :cols])),
            table_window=torch.from_numpy(np.ascontiguousarray(cache.table_window[slots, :cols])),
            decode_only=not prefills,
            decode_count=decodes,
            decode_segments=_index(decode_segments),
            decode_rows=_index(decode_rows),
            prefills=prefills,
            last_rows=torch.from_numpy(ends - 1),
        )

    def to(self, device) -> "PagedStep":
        """The step's tensors on `device`; to a GPU through pinned copies, so the host need not wait for the
        GPU's queue (a pageable copy would wait for every step queued before it)."""
        device = torch.device(device)
        moved = {name: on_device(getattr(self, name), device) for name in
                 ("tokens", "positions", "rows_full", "rows_window", "kv_lens", "table_full", "table_window",
                  "last_rows", "decode_segments", "decode_rows") if isinstance(getattr(self, name), torch.Tensor)}
        if self.prefills:
            moved["tiles"] = on_device(torch.from_numpy(prefill_tiles(self.prefills, device)), device)
        return PagedStep(**{**self.__dict__, **moved})


def _index(items: list[int] | slice) -> slice | torch.Tensor:
    return items if isinstance(items, slice) else torch.tensor(items, dtype=torch.long)


class PagedGraphDecoder:
    """Decode-only steps over the paged cache: one captured CUDA graph per batch-size bucket.

    Static device buffers hold a step's per-row inputs and block tables (as wide as the context; step_staging.py);
    a step fills the first n rows, pads the rest of its bucket with idle rows, copies them over and replays.
    The graphs share one memory pool (one replays at a time). Attention splits are fixed per bucket for the
    longest context.
    """

    def __init__(self, model: FastTransformer, cache: PagedKVCache, max_blocks: int, max_batch: int,
                 buckets=(1, 2, 4, 8, 16, 32, 64)):
        self.cache = cache  # no reference to the model: model -> decoder -> model would hold GPU memory until gc
        self.buckets = sorted({b for b in buckets if b < max_batch} | {max_batch})
        device, top, page = model.device, self.buckets[-1], cache.block_size
        self.max_blocks = max_blocks
        self.staging = StepStaging(cache, top, top, max_blocks, device)  # decode rows only: a segment a row
        c, block_n = model.config, block_config("attn_decode", device)["BLOCK_N"]
        self.graphs, self.logits, self.steps, pool = {}, {}, {}, None
        for bucket in self.buckets:
            step = self._static_step(bucket)
            step.splits = {  # per window: the longest context the graphs were captured for
                window: pick_splits(bucket, c.num_key_value_heads, keys, block_n, device)
                for window, keys in ((0, max_blocks * page), (c.sliding_window, min(c.sliding_window, max_blocks * page)))
            }

            def layers(step=step):
                return model._paged_layers(step, cache, last_rows=False)

            warm_up(device, layers)
            graph, self.logits[bucket] = capture(layers, pool)
            pool = graph.pool()
            self.graphs[bucket] = graph
            self.steps[bucket] = step

    def _static_step(self, bucket: int) -> PagedStep:
        rows, kv_lens, tables = self.staging.rows, self.staging.kv_lens, self.staging.tables
        return PagedStep(
            tokens=rows[0, :bucket], positions=rows[1, :bucket], rows_full=rows[2, :bucket],
            rows_window=rows[3, :bucket], kv_lens=kv_lens[:bucket],
            table_full=tables[0, :bucket], table_window=tables[1, :bucket], decode_only=True, decode_count=bucket,
            decode_segments=slice(0, bucket), decode_rows=slice(0, bucket), prefills=[],
            last_rows=torch.arange(bucket, device=rows.device),
        )

    def bucket_for(self, n: int) -> int:
        return next(b for b in self.buckets if n <= b)

    def step(self, step: PagedStep, device_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """A decode-only step (host tensors from PagedStep.build) -> logits [bucket, vocab], rows n … idle.
        device_tokens: the tokens of the first rows, already on the GPU (step.tokens holds placeholders there)."""
        bucket = self.bucket_for(step.tokens.shape[0])
        assert step.table_full.shape[1] <= self.max_blocks, "a sequence outgrew the context the graphs were captured for"
        self.staging.stage(step, bucket, bucket)
        self.staging.finish(device_tokens)
        self.graphs[bucket].replay()
        return self.logits[bucket]
