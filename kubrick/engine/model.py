"""The reference gpt-oss model in plain PyTorch: the readable oracle every faster path is checked against.

Reads top to bottom like openai/gpt-oss's gpt_oss/torch/model.py: RMSNorm, YaRN rotary embeddings, attention
with learned sinks (sliding window on even layers, grouped-query heads), a mixture of experts whose MXFP4
weights stay packed until a token picks them, and the unembedding. Weights are bf16; norms, rotary angles and
softmaxes run in fp32; attention and projection matmuls take bf16 operands and accumulate in fp32; the
experts, dequantised exactly from MXFP4, run entirely in fp32 (so how tokens are grouped cannot change their
rounding); the residual stream is bf16, as in gpt-oss.

One sequence: `forward(tokens, cache)` runs the new tokens at positions cache.length … and appends their
keys and values to the cache. Many sequences (the scheduler's continuous batching): `forward_batch(segments,
paged_cache)` runs each sequence's next tokens (a prefill chunk or one decode token) in one pass; the
row-wise work (norms, projections, experts) runs over all their tokens together, attention runs per
sequence over keys gathered through its block table. That path is batch-invariant: a token's numbers do not
depend on which other sequences share its step (see `forward_batch`). Faster paths (kernels issue) plug in at two seams:
`Attention.forward` and `MoE.expert_weights()` / `MoE.forward`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kubrick.engine import mxfp4
from kubrick.engine.config import ModelConfig
from kubrick.engine.kv_cache import KVCache
from kubrick.engine.paged_cache import PagedKVCache, SequenceBlocks


class RMSNorm(torch.nn.Module):
    def __init__(self, scale: torch.Tensor, eps: float):
        super().__init__()
        self.scale = scale.float()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.float()
        t = t * torch.rsqrt(t.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (t * self.scale).to(x.dtype)


class RotaryEmbedding(torch.nn.Module):
    """YaRN-scaled rotary embedding, NeoX style (the two halves of each head rotate together)."""

    def __init__(self, config: ModelConfig, device: torch.device):
        super().__init__()
        self.head_dim = config.head_dim
        base, factor = config.rope_theta, config.rope_scaling_factor
        freq = base ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim)
        if factor > 1.0:
            # Frequencies that turn fewer than beta times over the original context are interpolated (slowed
            # down by `factor`), those turning more than alpha times keep their speed, a linear ramp between.
            self.concentration = 0.1 * math.log(factor) + 1.0
            d_half = self.head_dim / 2
            ctx = config.initial_context_length
            low = d_half * math.log(ctx / (config.rope_ntk_beta * 2 * math.pi)) / math.log(base)
            high = d_half * math.log(ctx / (config.rope_ntk_alpha * 2 * math.pi)) / math.log(base)
            interpolation = 1.0 / (factor * freq)
            extrapolation = 1.0 / freq
            ramp = (torch.arange(d_half, dtype=torch.float32, device=device) - low) / (high - low)
            keep = 1 - ramp.clamp(0, 1)
            self.inv_freq = interpolation * (1 - keep) + extrapolation * keep
        else:
            self.concentration = 1.0
            self.inv_freq = 1.0 / freq

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.float()[:, None] * self.inv_freq[None, :]
        return angles.cos() * self.concentration, angles.sin() * self.concentration

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [tokens, heads, head_dim]; cos/sin [tokens, head_dim/2]."""
        cos, sin = cos[:, None, :], sin[:, None, :]
        x1, x2 = torch.chunk(x.float(), 2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def attention(q, k, v, sinks, q_positions, k_positions, sliding_window: int) -> torch.Tensor:
    """Softmax attention with a learned sink logit per head, over the cached keys.

    q [n, kv_heads, q_per_kv, d]; k, v [m, kv_heads, d]; sinks [kv_heads * q_per_kv]. A query sees the keys
    at or before its own position, and only the last `sliding_window` of them when the window is not 0.
    The sink joins the softmax as one more logit and then takes no value: it lets a head attend to nothing.
    """
    n, kv_heads, q_per_kv, d = q.shape
    scores = torch.einsum("qhmd,khd->hmqk", q.float(), k.float()) / math.sqrt(d)
    distance = q_positions[:, None] - k_positions[None, :]
    visible = distance >= 0
    if sliding_window:
        visible &= distance < sliding_window
    scores = scores.masked_fill(~visible, float("-inf"))
    sink = sinks.float().reshape(kv_heads, q_per_kv, 1, 1).expand(-1, -1, n, 1)
    weights = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    out = torch.einsum("hmqk,khd->qhmd", weights, v.float())
    return out.reshape(n, -1).to(q.dtype)


class Attention(torch.nn.Module):
    def __init__(self, config: ModelConfig, layer: int, w: dict[str, torch.Tensor], rope: RotaryEmbedding):
        super().__init__()
        p = f"block.{layer}.attn."
        self.layer = layer
        self.norm = RMSNorm(w[p + "norm.scale"], config.rms_norm_eps)
        self.qkv_weight, self.qkv_bias = w[p + "qkv.weight"], w[p + "qkv.bias"]
        self.out_weight, self.out_bias = w[p + "out.weight"], w[p + "out.bias"]
        self.sinks = w[p + "sinks"]
        self.rope = rope
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.sliding_window = config.sliding_window if config.is_sliding(layer) else 0

    def qkv(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated queries [n, kv_heads, q_per_kv, d], rotated keys and values [n, kv_heads, d]."""
        t = self.norm(x)
        qkv = F.linear(t, self.qkv_weight, self.qkv_bias)
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        q, k, v = torch.split(qkv, [q_size, kv_size, kv_size], dim=-1)
        q = q.reshape(-1, self.heads, self.head_dim)
        k = k.reshape(-1, self.kv_heads, self.head_dim)
        v = v.reshape(-1, self.kv_heads, self.head_dim)
        cos, sin = self.rope.cos_sin(positions)
        q, k = self.rope.rotate(q, cos, sin), self.rope.rotate(k, cos, sin)
        return q.reshape(-1, self.kv_heads, self.heads // self.kv_heads, self.head_dim), k, v

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        q, k, v = self.qkv(x, positions)
        keys, values, k_positions = cache.store(self.layer, k, v, positions, self.sliding_window)
        t = attention(q, keys, values, self.sinks, positions, k_positions, self.sliding_window)
        return x + F.linear(t, self.out_weight, self.out_bias)

    def forward_paged(self, x: torch.Tensor, positions: torch.Tensor, segments: list, cache: PagedKVCache) -> torch.Tensor:
        """Several sequences' new tokens, concatenated in `x`; each segment's keys and values go to its blocks.

        Attention runs per sequence and per block-aligned chunk of its new tokens, over exactly the keys that
        chunk sees, so a sequence gets the same numbers whether its prompt ran in one step or several and
        whatever else ran beside it.
        """
        q, k, v = self.qkv(x, positions)
        out, row = [], 0
        for seq, tokens in segments:
            start, n = seq.length, len(tokens)
            cache.write(self.layer, seq, start, k[row : row + n], v[row : row + n])
            reach = max(0, start - self.sliding_window + 1) if self.sliding_window else 0  # the oldest key needed
            all_keys, all_values = cache.gather(self.layer, seq, reach, start + n)  # one copy per sequence
            for lo, hi in _block_chunks(start, start + n, cache.block_size):
                first = max(0, lo - self.sliding_window + 1) if self.sliding_window else 0
                keys, values = all_keys[first - reach : hi - reach], all_values[first - reach : hi - reach]
                k_positions = torch.arange(first, hi, device=x.device)
                rows = slice(row + lo - start, row + hi - start)
                out.append(attention(q[rows], keys, values, self.sinks, positions[rows], k_positions, self.sliding_window))
            row += n
        return x + F.linear(torch.cat(out), self.out_weight, self.out_bias)


def _block_chunks(start: int, end: int, size: int):
    """(lo, hi) pieces of start … end that never cross a multiple of `size`."""
    lo = start
    while lo < end:
        hi = min(end, (lo // size + 1) * size)
        yield lo, hi
        lo = hi


def swiglu(x: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss's clamped SwiGLU over interleaved columns: even = gate, odd = linear (with +1)."""
    gate, linear = x[..., ::2], x[..., 1::2]
    gate = gate.clamp(max=limit)
    linear = linear.clamp(min=-limit, max=limit)
    return gate * torch.sigmoid(alpha * gate) * (linear + 1)


class MoE(torch.nn.Module):
    def __init__(self, config: ModelConfig, layer: int, w: dict[str, torch.Tensor]):
        super().__init__()
        p = f"block.{layer}.mlp."
        self.norm = RMSNorm(w[p + "norm.scale"], config.rms_norm_eps)
        self.gate_weight, self.gate_bias = w[p + "gate.weight"], w[p + "gate.bias"]
        # Packed MXFP4: mlp1 [E, 2I, H/32, 16] + scales [E, 2I, H/32]; mlp2 [E, H, I/32, 16] + scales.
        self.mlp1_blocks, self.mlp1_scales = w[p + "mlp1_weight.blocks"], w[p + "mlp1_weight.scales"]
        self.mlp2_blocks, self.mlp2_scales = w[p + "mlp2_weight.blocks"], w[p + "mlp2_weight.scales"]
        self.mlp1_bias, self.mlp2_bias = w[p + "mlp1_bias"], w[p + "mlp2_bias"]
        self.top_k = config.experts_per_token
        self.alpha, self.limit = config.swiglu_alpha, config.swiglu_limit

    def expert_weights(self, expert: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """One expert's (mlp1 [2I, H], mlp2 [H, I]) dequantised from its packed blocks (exact in fp32 or bf16)."""
        mlp1 = mxfp4.dequantize(self.mlp1_blocks[expert], self.mlp1_scales[expert], dtype)
        mlp2 = mxfp4.dequantize(self.mlp2_blocks[expert], self.mlp2_scales[expert], dtype)
        return mlp1, mlp2

    def route(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k experts per token and their weights: a softmax over the chosen experts' router logits."""
        logits = F.linear(t, self.gate_weight, self.gate_bias)
        top = torch.topk(logits.float(), k=self.top_k, dim=-1, sorted=True)
        return top.indices, torch.softmax(top.values, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.norm(x)
        indices, weights = self.route(t)
        if len(t) * self.top_k <= len(self.mlp1_blocks):
            out = self.gathered_experts(t, indices, weights)
        else:
            out = self.expert_by_expert(t, indices, weights)
        return x + out.to(x.dtype)

    def forward_rowwise(self, x: torch.Tensor) -> torch.Tensor:
        """The batched path's MoE: each token's numbers are the same whatever tokens share the call."""
        t = self.norm(x)
        indices, weights = self.route(t)
        return x + self.expert_by_expert(t, indices, weights, rowwise=True).to(x.dtype)

    def expert_by_expert(self, t: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, rowwise: bool = False) -> torch.Tensor:
        """Many tokens (prefill): dequantise each chosen expert once and run all its tokens through it.

        rowwise: one matmul per token (an fp32 matmul's rounding on the CPU depends on how many rows share
        it; bf16 ones, as in attention, were seen not to)."""
        linear = _rowwise_linear if rowwise else F.linear
        out = torch.zeros(t.shape, dtype=torch.float32, device=t.device)
        for expert in torch.unique(indices).tolist():
            token, slot = torch.where(indices == expert)
            mlp1, mlp2 = self.expert_weights(expert)
            h = swiglu(linear(t[token].float(), mlp1, self.mlp1_bias[expert].float()), self.alpha, self.limit)
            y = linear(h, mlp2, self.mlp2_bias[expert].float())
            out.index_add_(0, token, y * weights[token, slot, None])
        return out

    def gathered_experts(self, t: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Few tokens (decode): gather each token's k experts at once, as gpt-oss's own reference does; the
        device never waits for the host to learn which experts were picked."""
        mlp1 = mxfp4.dequantize(self.mlp1_blocks[indices], self.mlp1_scales[indices], torch.float32)  # [n, k, 2I, H]
        h = torch.einsum("nkoh,nh->nko", mlp1, t.float()) + self.mlp1_bias[indices].float()
        h = swiglu(h, self.alpha, self.limit)
        mlp2 = mxfp4.dequantize(self.mlp2_blocks[indices], self.mlp2_scales[indices], torch.float32)  # [n, k, H, I]
        y = torch.einsum("nkhi,nki->nkh", mlp2, h) + self.mlp2_bias[indices].float()
        return torch.einsum("nkh,nk->nh", y, weights)


def _rowwise_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return torch.cat([F.linear(row[None], weight, bias) for row in x])


class Block(torch.nn.Module):
    def __init__(self, config: ModelConfig, layer: int, w: dict[str, torch.Tensor], rope: RotaryEmbedding):
        super().__init__()
        self.attn = Attention(config, layer, w, rope)
        self.mlp = MoE(config, layer, w)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        return self.mlp(self.attn(x, positions, cache))


class Transformer(torch.nn.Module):
    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor]):
        super().__init__()
        self.config = config
        self.embedding = weights["embedding.weight"]
        self.device = self.embedding.device
        rope = RotaryEmbedding(config, self.device)
        self.blocks = torch.nn.ModuleList(Block(config, n, weights, rope) for n in range(config.num_hidden_layers))
        self.norm = RMSNorm(weights["norm.scale"], config.rms_norm_eps)
        self.unembedding = weights["unembedding.weight"]

    def new_cache(self, capacity: int) -> KVCache:
        c = self.config
        return KVCache(c.num_hidden_layers, capacity, c.num_key_value_heads, c.head_dim, self.device)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, cache: KVCache, all_logits: bool = False) -> torch.Tensor:
        """tokens [n] (the next n tokens of the sequence) -> fp32 logits [n, vocab] (or [1, vocab] for the
        last token only, the usual case). Advances the cache by n."""
        positions = torch.arange(cache.length, cache.length + len(tokens), device=self.device)
        x = self.embedding[tokens.to(self.device)]
        for block in self.blocks:
            x = block(x, positions, cache)
        cache.advance(len(tokens))
        x = self.norm(x if all_logits else x[-1:])
        return F.linear(x, self.unembedding).float()

    def new_paged_cache(self, num_blocks: int, window_blocks: int, block_size: int) -> PagedKVCache:
        return PagedKVCache.for_model(self.config, num_blocks, window_blocks, block_size, self.device)

    @torch.inference_mode()
    def forward_batch(self, segments: list[tuple[SequenceBlocks, list[int]]], cache: PagedKVCache) -> torch.Tensor:
        """Each segment (a sequence and its next tokens: a prefill chunk or one decode token) runs at positions
        seq.length …; advances each sequence. Returns fp32 logits [k, vocab] of the last token of each segment
        that reached the end of its sequence's known tokens (a decode token, a prompt's last chunk), in order:
        a chunk from the middle of a prompt needs none.

        Norms, rotary, projections (bf16) and the unembedding work row by row, the experts run one token per
        matmul, attention per sequence: a token's logits depend only on its own sequence.
        """
        for seq, tokens in segments:
            cache.prepare(seq, tokens, prefill=seq.length < len(seq.tokens))
        tokens = torch.tensor([t for _, part in segments for t in part], dtype=torch.long, device=self.device)
        positions = torch.cat([torch.arange(seq.length, seq.length + len(part)) for seq, part in segments]).to(self.device)
        x = self.embedding[tokens]
        for block in self.blocks:
            x = block.mlp.forward_rowwise(block.attn.forward_paged(x, positions, segments, cache))
        last = torch.tensor([len(part) for _, part in segments]).cumsum(0) - 1
        for seq, part in segments:
            cache.advance(seq, len(part))
        wanted = torch.tensor([seq.length >= len(seq.tokens) for seq, _ in segments])
        return F.linear(self.norm(x[last[wanted].to(self.device)]), self.unembedding).float()

    def weights_bytes(self) -> int:
        """Bytes of all weights as held in memory (experts packed)."""
        seen, total = set(), 0
        for value in _tensors(self):
            if value.data_ptr() not in seen:
                seen.add(value.data_ptr())
                total += value.numel() * value.element_size()
        return total


def _tensors(module: torch.nn.Module):
    for m in module.modules():
        for value in vars(m).values():
            if isinstance(value, torch.Tensor):
                yield value
