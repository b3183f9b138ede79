"""Mixed steps (prompt chunks beside decodes) replayed as CUDA graphs cut at the attention.

An eager mixed step launches ~500 kernels and torch ops from Python. In the server that host work took 33-45 ms
against 26 ms of GPU work (64 decodes + a 448-token chunk, BENCHMARKS.md), so every stream's next token waited
on Python. Here everything but the attention is captured once per bucket of row counts, in pieces:

  piece 0         embedding, RoPE angles; layer 0's norm, QKV projection, RoPE + keys/values into the pools -> q
  piece l (1..L-1) layer l-1's out-projection and MoE block; layer l's norm, QKV, RoPE + keys/values   -> q
  piece L         the last layer's out-projection and MoE block                                  -> the stream

and between pieces the attention runs eagerly over the step's real rows, whose launches depend on where each
sequence is in the cache (a decode launch for the one-token rows, a flash launch per prompt chunk). A step of
n rows replays the smallest bucket holding n; rows n... are idle (token 0 at position 0, keys and values
written into the pools' scratch block, attention never run for them, their results never read). The logits
(final norm and unembedding of each segment's last row) are computed eagerly after the last piece.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kubrick.engine.cuda_graphs import capture, warm_up
from kubrick.engine.paged_cache import PagedKVCache

if TYPE_CHECKING:
    from kubrick.engine.fast_model import FastTransformer, PagedStep

BUCKETS = (64, 128, 256, 512)  # rows of a step; from 64 up, so every bucket takes the grouped MoE path


class PagedMixedGraphs:
    def __init__(self, model: "FastTransformer", cache: PagedKVCache, max_rows: int):
        self.cache = cache  # no reference to the model: model -> graphs -> model would hold GPU memory until gc
        c, device = model.config, model.device
        self.layers = c.num_hidden_layers
        self.buckets = sorted({b for b in BUCKETS if b < max_rows} | {min(max_rows, BUCKETS[-1])})
        top, page = self.buckets[-1], cache.block_size
        # Per row: token, position, cache row in the full-attention pools, cache row in the window pools.
        self.idle = (0, 0, cache.scratch_full * page, cache.scratch_window * page)
        self.host_rows = torch.zeros(4, top, dtype=torch.long, pin_memory=True)
        self.rows = torch.zeros(4, top, dtype=torch.long, device=device)
        self._fill_idle(0, top)
        self.rows.copy_(self.host_rows)
        # What crosses a cut: q (pieces -> attention) and the attention's output (attention -> next piece).
        self.q = torch.zeros(top, c.num_attention_heads, c.head_dim, dtype=model.dtype, device=device)
        self.attn = torch.zeros(top, c.num_attention_heads * c.head_dim, dtype=model.dtype, device=device)
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        self.streams: dict[int, dict] = {}  # bucket -> the pieces' shared state; "x" ends as the last stream
        pool = None
        for bucket in self.buckets:
            pieces = self._pieces(model, bucket)
            warm_up(device, lambda pieces=pieces: [piece() for piece in pieces])
            graphs = []
            for piece in pieces:  # one pool: the pieces replay one after another, never at once
                graph, _ = capture(piece, pool)
                pool = graph.pool()
                graphs.append(graph)
            self.graphs[bucket] = graphs
        self.copied = torch.cuda.Event()  # the last step's row transfer is done: the staging may be refilled
        self.copied.record()

    def _pieces(self, model: "FastTransformer", bucket: int) -> list:
        tokens, positions, rows_full, rows_window = (self.rows[i, :bucket] for i in range(4))
        q, attn, cache = self.q[:bucket], self.attn[:bucket], self.cache
        state: dict = {}
        self.streams[bucket] = state

        def first():
            state["x"], state["cos"], state["sin"], _ = model._step_inputs(tokens, positions)
            model._paged_qkv(0, state["x"], state["cos"], state["sin"], rows_full, rows_window, cache, q_out=q)

        def after_attention(layer: int):
            def piece():
                state["x"] = model._moe(layer, *model._out_projection(layer, attn, state["x"]))
                if layer + 1 < self.layers:
                    model._paged_qkv(layer + 1, state["x"], state["cos"], state["sin"], rows_full, rows_window,
                                     cache, q_out=q)
            return piece

        return [first] + [after_attention(layer) for layer in range(self.layers)]

    def _fill_idle(self, first: int, end: int) -> None:
        for i, value in enumerate(self.idle):
            self.host_rows[i, first:end] = value

    def fits(self, rows: int) -> bool:
        return rows <= self.buckets[-1]

    def step(self, model: "FastTransformer", step: "PagedStep") -> torch.Tensor:
        """A step's host tensors (PagedStep.build, splits set) -> fp32 logits of each segment's last row."""
        n = step.tokens.shape[0]
        bucket = next(b for b in self.buckets if n <= b)
        self.copied.synchronize()
        for i, name in enumerate(("tokens", "positions", "rows_full", "rows_window")):
            self.host_rows[i, :n] = getattr(step, name)
        self._fill_idle(n, bucket)
        self.rows[:, :bucket].copy_(self.host_rows[:, :bucket], non_blocking=True)
        self.copied.record()
        on_device = step.to(model.device)
        q, attn = self.q[:bucket], self.attn[:bucket]
        graphs = self.graphs[bucket]
        graphs[0].replay()
        for layer in range(self.layers):
            model._paged_attention(layer, q, on_device, self.cache, out=attn)
            graphs[layer + 1].replay()
        return model._paged_logits(self.streams[bucket]["x"][:n], on_device, last_rows=True)
