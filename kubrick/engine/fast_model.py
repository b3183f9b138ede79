"""gpt-oss on Kubrick's Triton kernels: the reference model's weights, cache and interface, a faster forward.

`FastTransformer(config, weights)` is a drop-in for `model.Transformer` (same `forward(tokens, cache)`,
`new_cache`, `weights_bytes`), checked against it in tests/kernels/test_fast_model.py. Per layer:
RMSNorm kernel -> QKV matmul (torch) -> one kernel for YaRN RoPE (cos/sin from the reference's own
RotaryEmbedding) + keys/values written into the reference KVCache in place -> sink attention kernel (prefill: flash-style; one new token:
split-KV decode) -> out matmul (torch) + residual -> RMSNorm kernel -> router kernel (bf16-rounded logits,
as the reference's bf16 matmul picks) -> MXFP4 MoE kernel (GEMV for few tokens, expert tiles for many).
Dense matmuls stay with torch (cuBLAS is at its roofline there); the CUDA-graph decode loop comes next.
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
        c = self.config
        cos, sin = self.rope.cos_sin(positions)
        kv_lens = (positions[-1:] + 1).to(torch.int32)  # decode attention reads the length from the device
        x = self.embedding[tokens]
        for layer in range(c.num_hidden_layers):
            x = self._attention(layer, x, positions, cos, sin, cache, start, kv_lens)
            x = self._moe(layer, x)
        x = rmsnorm(x if all_logits else x[-1:], self.w["norm.scale"], c.rms_norm_eps)
        return F.linear(x, self.w["unembedding.weight"]).float()

    def _attention(self, layer, x, positions, cos, sin, cache: KVCache, start: int | None, kv_lens) -> torch.Tensor:
        c, p = self.config, f"block.{layer}.attn."
        n = x.shape[0]
        t = rmsnorm(x, self.w[p + "norm.scale"], c.rms_norm_eps)
        qkv = F.linear(t, self.w[p + "qkv.weight"], self.w[p + "qkv.bias"])
        keys, values = cache.keys[layer], cache.values[layer]
        q = rope_and_cache(qkv, cos, sin, positions, keys, values, c.num_attention_heads, c.num_key_value_heads)
        window = c.sliding_window if c.is_sliding(layer) else 0
        sinks = self.w[p + "sinks"]
        if n == 1:
            out = attention_decode(q, keys[None], values[None], sinks, kv_lens, window=window)
        else:
            out = attention_prefill(q[None], keys[None], values[None], sinks, start_pos=start, window=window)[0]
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
