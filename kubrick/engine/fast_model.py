"""gpt-oss on Kubrick's Triton kernels: the reference model's weights, cache and interface, a faster forward.

`FastTransformer(config, weights)` is a drop-in for `model.Transformer` (same `forward(tokens, cache)`,
`new_cache`, `weights_bytes`), checked against it in tests/kernels/test_fast_model.py. Per layer:
RMSNorm kernel -> QKV matmul (torch) -> one kernel for YaRN RoPE (cos/sin from the reference's own
RotaryEmbedding) + keys/values written into the reference KVCache in place -> sink attention kernel (prefill: flash-style; one new token:
split-KV decode) -> out matmul (torch) + residual -> RMSNorm kernel -> router kernel (bf16-rounded logits,
as the reference's bf16 matmul picks) -> MXFP4 MoE kernel (GEMV for few tokens, expert tiles for many).
Dense matmuls stay with torch/cuBLAS.

Decode loops: `CudaGraphDecoder` (one sequence, one captured step replayed per token),
`CudaGraphBatchDecoder` (a static `BatchedKVCache` of B slots, one graph per batch-size bucket) and
`GraphedFastTransformer`, the class the Engine runs on a GPU (FastTransformer whose one-token steps replay
the graph captured over the engine's cache).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kubrick.engine.config import ModelConfig
from kubrick.engine.kernels import moe
from kubrick.engine.kernels.attention import attention_decode, attention_prefill
from kubrick.engine.kernels.rmsnorm import rmsnorm
from kubrick.engine.kernels.rope import rope_and_cache
from kubrick.engine.kernels.router import router
from kubrick.engine.kv_cache import KVCache
from kubrick.engine.model import RotaryEmbedding


class FastTransformer:
    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor]):
        self.config = config
        self.w = weights
        self.embedding = weights["embedding.weight"]
        self.device = self.embedding.device
        self.rope = RotaryEmbedding(config, self.device)

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
        kv_lens = (positions[-1:] + 1).to(torch.int32)  # decode attention reads the length from the device
        return self._layers(tokens, positions, positions, kv, start, kv_lens, all_logits)

    @torch.inference_mode()
    def decode_batch(self, tokens: torch.Tensor, positions: torch.Tensor, cache: "BatchedKVCache") -> torch.Tensor:
        """One new token for each of B sequences: tokens, positions int64 [B] on the device -> logits [B, vocab].

        Sequence b lives in slot b of the static batched cache and writes its keys/values at `positions[b]`.
        No host work (CUDA-graph capturable); cache lengths are the caller's business.
        """
        batch = tokens.shape[0]
        rows = positions + cache.slot_offsets[:batch]  # rows of the flattened [B*S, KVH, D] cache
        kv = [cache.layer(i, batch) for i in range(self.config.num_hidden_layers)]
        kv_lens = (positions + 1).to(torch.int32)
        return self._layers(tokens, positions, rows, kv, None, kv_lens, all_logits=True)

    def _layers(self, tokens, positions, rows, kv, start: int | None, kv_lens, all_logits: bool) -> torch.Tensor:
        c = self.config
        cos, sin = self.rope.cos_sin(positions)
        x = self.embedding[tokens]
        for layer in range(c.num_hidden_layers):
            x = self._attention(layer, x, cos, sin, rows, kv[layer], start, kv_lens)
            x = self._moe(layer, x)
        x = rmsnorm(x if all_logits else x[-1:], self.w["norm.scale"], c.rms_norm_eps)
        return F.linear(x, self.w["unembedding.weight"]).float()

    def _attention(self, layer, x, cos, sin, rows, kv, start: int | None, kv_lens) -> torch.Tensor:
        """start None: every row of x is one new token of its own sequence (decode); else a prefill chunk."""
        c, p = self.config, f"block.{layer}.attn."
        n = x.shape[0]
        keys, values, batched_keys, batched_values = kv  # rows view [R, KVH, D]; per sequence [B, S, KVH, D]
        t = rmsnorm(x, self.w[p + "norm.scale"], c.rms_norm_eps)
        qkv = F.linear(t, self.w[p + "qkv.weight"], self.w[p + "qkv.bias"])
        q = rope_and_cache(qkv, cos, sin, rows, keys, values, c.num_attention_heads, c.num_key_value_heads)
        window = c.sliding_window if c.is_sliding(layer) else 0
        sinks = self.w[p + "sinks"]
        if start is None or n == 1:
            out = attention_decode(q, batched_keys, batched_values, sinks, kv_lens, window=window)
        else:
            out = attention_prefill(q[None], batched_keys, batched_values, sinks, start_pos=start, window=window)[0]
        return x + F.linear(out.reshape(n, -1), self.w[p + "out.weight"], self.w[p + "out.bias"])

    def _moe(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        c, p = self.config, f"block.{layer}.mlp."
        t = rmsnorm(x, self.w[p + "norm.scale"], c.rms_norm_eps)
        ids, weights = router(t, self.w[p + "gate.weight"], self.w[p + "gate.bias"], c.experts_per_token,
                              round_logits=t.dtype == torch.bfloat16)
        y = moe(
            t, ids, weights,
            self.w[p + "mlp1_weight.blocks"], self.w[p + "mlp1_weight.scales"], self.w[p + "mlp1_bias"],
            self.w[p + "mlp2_weight.blocks"], self.w[p + "mlp2_weight.scales"], self.w[p + "mlp2_bias"],
            swiglu_alpha=c.swiglu_alpha, swiglu_limit=c.swiglu_limit,
        )
        return x + y

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
        self.model, self.cache = model, cache
        device = model.device
        self.token = torch.zeros(1, dtype=torch.long, device=device)
        # Warm-up and capture write keys/values at the last cache row, which no prompt has reached yet.
        self.position = torch.full((1,), cache.capacity - 1, dtype=torch.long, device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):  # compiles every kernel outside the capture
                model.decode_step(self.token, self.position, cache)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = model.decode_step(self.token, self.position, cache)

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
        self.model, self.cache = model, cache
        self.buckets = sorted(b for b in buckets if b <= cache.batch) or [cache.batch]
        device = model.device
        self.tokens = torch.zeros(cache.batch, dtype=torch.long, device=device)
        self.idle_position = cache.capacity - 1
        self.positions = torch.full((cache.batch,), self.idle_position, dtype=torch.long, device=device)
        self.graphs, self.logits, pool = {}, {}, None
        for bucket in self.buckets:
            tokens, positions = self.tokens[:bucket], self.positions[:bucket]
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(2):  # compiles every kernel outside the capture
                    model.decode_batch(tokens, positions, cache)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[bucket] = model.decode_batch(tokens, positions, cache)
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
