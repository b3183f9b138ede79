"""Mixed steps (prompt chunks beside decodes) replayed as one CUDA graph per bucket of rows, attention included.

An eager mixed step launches ~500 kernels and torch ops from Python; in the server that host work stretched when
the response thread held the interpreter lock, and every stream's next token waited on it. Graph pieces cut at
the attention (until run 41) still launched the attention from Python, a few launches a layer for each prompt
chunk, ~12 ms a step on the H100 host. Here the whole model runs in one graph, because the attention of any mix
of rows can be written with fixed shapes:

  decode rows   the step's one-token segments come first (the scheduler plans them so): the split-KV decode
                kernel runs over the first `decode_rows` rows of the bucket with splits fixed per bucket (as
                the decode graphs do), each row r reading segment r's block table and kv_len. Rows past the
                real decodes compute junk that the prompt tiles overwrite or nobody reads: against a prompt
                segment's own blocks (all allocated) while r is a segment, else kv_len 1 in the scratch block;
  prompt rows   attention_prefill_varlen over a fixed-size tile list, one entry per BLOCK_M rows of a chunk
                (segment, first row, rows, position), the unused entries -1 (their programs return at once).

A step copies its rows, kv_lens, block tables (step_staging.py) and tile list into static buffers (pinned staging,
one transfer each) and replays the smallest bucket holding its rows; rows n... are idle (token 0 at position 0,
keys and values written into the pools' scratch block, results never read). The logits (final norm and unembedding of
each segment's last row) are computed eagerly after the replay.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from kubrick.engine.cuda_graphs import capture, on_device, warm_up
from kubrick.engine.kernels._common import block_config
from kubrick.engine.kernels.attention import pick_splits, prefill_tiles
from kubrick.engine.paged_cache import PagedKVCache
from kubrick.engine.step_staging import StepStaging

if TYPE_CHECKING:
    from kubrick.engine.fast_model import FastTransformer, PagedStep

# Rows of a step; from 64 up, so every bucket takes the grouped MoE path. The engine captures those below its
# step budget (KUBRICK_STEP_TOKENS) and one of the budget itself, up to the last.
BUCKETS = (64, 128, 256, 512, 1024, 2048)


class PagedMixedGraphs:
    def __init__(self, model: "FastTransformer", cache: PagedKVCache, max_rows: int, max_blocks: int,
                 max_segments: int):
        from kubrick.engine.fast_model import PagedStep

        self.cache = cache  # no reference to the model: model -> graphs -> model would hold GPU memory until gc
        c, device = model.config, model.device
        self.buckets = sorted({b for b in BUCKETS if b < max_rows} | {min(max_rows, BUCKETS[-1])})
        top, page = self.buckets[-1], cache.block_size
        self.max_blocks, self.max_segments = max_blocks, max_segments
        block_m = block_config("attn_prefill", device)["BLOCK_M"]
        self.max_tiles = top // block_m + max_segments  # a chunk adds at most one partial tile
        self.staging = StepStaging(cache, top, max_segments, max_blocks, device)
        self.host_tiles = torch.full((self.max_tiles, 4), -1, dtype=torch.int32, pin_memory=True)
        self.tiles = self.host_tiles.to(device)
        rows, kv_lens, tables = self.staging.rows, self.staging.kv_lens, self.staging.tables
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.streams: dict[int, torch.Tensor] = {}  # bucket -> the residual stream the graph leaves
        pool = None
        for bucket in self.buckets:
            decodes = min(bucket, max_segments)
            step = PagedStep(
                tokens=rows[0, :bucket], positions=rows[1, :bucket], rows_full=rows[2, :bucket],
                rows_window=rows[3, :bucket], kv_lens=kv_lens, table_full=tables[0],
                table_window=tables[1], decode_only=False, decode_count=decodes,
                decode_segments=slice(0, decodes), decode_rows=slice(0, decodes),
                prefills=[(0, 0, 0, 0)],  # (any: the tile list on the device says where the chunks are)
                last_rows=rows[0, :0], tiles=self.tiles,
                splits={  # per window: the longest context the graphs were captured for
                    window: pick_splits(decodes, c.num_key_value_heads, keys,
                                        block_config("attn_decode", device)["BLOCK_N"], device)
                    for window, keys in ((0, max_blocks * page),
                                         (c.sliding_window, min(c.sliding_window, max_blocks * page)))
                },
            )

            def layers(step=step):
                return model._paged_stream(step, cache)

            warm_up(device, layers)
            graph, self.streams[bucket] = capture(layers, pool)
            pool = graph.pool()  # one pool: the graphs replay one after another, never at once
            self.graphs[bucket] = graph

    def fits(self, step: "PagedStep") -> bool:
        """Whether the graphs can run this step: few enough rows and segments, its decode rows first."""
        segments = step.kv_lens.shape[0]
        return (step.tokens.shape[0] <= self.buckets[-1] and segments <= self.max_segments
                and step.table_full.shape[1] <= self.max_blocks and isinstance(step.decode_rows, slice))

    def step(self, model: "FastTransformer", step: "PagedStep", device_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """A step's host tensors (PagedStep.build) -> fp32 logits of each segment's last row.
        device_tokens: the tokens of the first rows (the decode rows), already on the GPU."""
        n = step.tokens.shape[0]
        bucket = next(b for b in self.buckets if n <= b)
        tiles = prefill_tiles(step.prefills, model.device)
        assert len(tiles) <= self.max_tiles
        self.staging.stage(step, bucket, self.max_segments)  # waits for the last step's copies: then the tiles
        self.host_tiles.numpy()[: len(tiles)] = tiles
        self.host_tiles[len(tiles):] = -1
        self.tiles.copy_(self.host_tiles, non_blocking=True)
        self.staging.finish(device_tokens)
        self.graphs[bucket].replay()
        moved = replace(step, last_rows=on_device(step.last_rows, model.device))
        return model._paged_logits(self.streams[bucket][:n], moved, last_rows=True)
