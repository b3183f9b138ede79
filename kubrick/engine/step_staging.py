"""A paged step's inputs on their way into a CUDA graph: pinned host staging, one transfer each, static device twins.

Both graph runners (PagedGraphDecoder for decode-only steps, PagedMixedGraphs for steps with prompt chunks) read
their inputs from static device buffers: per row the token, its position and its cache rows in the full-attention
and sliding-window pools; per segment (a sequence of the step) its kv_len and its two block-table rows. A step
fills the host side, pads the rest of its bucket with idle rows and segments (token 0 at position 0, writing into
the pools' scratch block and reading only it), and copies over; the copies are asynchronous, so the next step
waits for them (`copied`) before it refills the staging.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kubrick.engine.paged_cache import PagedKVCache

if TYPE_CHECKING:
    from kubrick.engine.fast_model import PagedStep

ROW_FIELDS = ("tokens", "positions", "rows_full", "rows_window")  # PagedStep's per-row inputs, in buffer order


class StepStaging:
    """Static device buffers for up to `rows` rows and `segments` segments, and their pinned host staging."""

    def __init__(self, cache: PagedKVCache, rows: int, segments: int, max_blocks: int, device: torch.device):
        self.cache = cache
        page = cache.block_size
        self.idle = (0, 0, cache.scratch_full * page, cache.scratch_window * page)  # an idle row's ROW_FIELDS
        self.host_rows = torch.zeros(len(ROW_FIELDS), rows, dtype=torch.long, pin_memory=True)
        self.host_lens = torch.ones(segments, dtype=torch.int32, pin_memory=True)
        self.host_tables = torch.zeros(2, segments, max_blocks, dtype=torch.int32, pin_memory=True)
        self._idle_rows(0, rows)
        self._idle_segments(0, segments)
        self.rows, self.kv_lens, self.tables = (t.to(device) for t in (self.host_rows, self.host_lens, self.host_tables))
        self.copied = torch.cuda.Event()  # the last step's transfers are done: the staging may be refilled
        self.copied.record()

    def stage(self, step: "PagedStep", rows: int, segments: int) -> None:
        """Fill the host side with the step's inputs, its bucket padded to `rows` rows and `segments` segments
        with idle ones, and queue the copies of that much (copy_extra() may queue more before finish())."""
        n, used, cols = step.tokens.shape[0], step.kv_lens.shape[0], step.table_full.shape[1]
        self.copied.synchronize()
        for i, name in enumerate(ROW_FIELDS):
            self.host_rows[i, :n] = getattr(step, name)
        self._idle_rows(n, rows)
        self.host_lens[:used] = step.kv_lens
        self.host_tables[0, :used, :cols] = step.table_full
        self.host_tables[1, :used, :cols] = step.table_window
        self._idle_segments(used, segments)
        self.rows[:, :rows].copy_(self.host_rows[:, :rows], non_blocking=True)
        self.kv_lens[:segments].copy_(self.host_lens[:segments], non_blocking=True)
        self.tables[:, :segments].copy_(self.host_tables[:, :segments], non_blocking=True)

    def finish(self, device_tokens: torch.Tensor | None) -> None:
        """After the copies: mark the staging free once they are done, and put tokens already on the GPU (the
        picks of the step before, in stream order after it) over the first rows' placeholders."""
        self.copied.record()
        if device_tokens is not None:
            self.rows[0, : len(device_tokens)].copy_(device_tokens)

    def _idle_rows(self, first: int, end: int) -> None:
        for i, value in enumerate(self.idle):
            self.host_rows[i, first:end] = value

    def _idle_segments(self, first: int, end: int) -> None:
        self.host_lens[first:end] = 1
        self.host_tables[0, first:end] = self.cache.scratch_full
        self.host_tables[1, first:end] = self.cache.scratch_window
