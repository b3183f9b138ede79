"""A paged KV cache for many sequences at once: fixed-size blocks, a block table per sequence, prefix reuse.

Two pools of blocks, each block holding `block_size` positions of keys and values:

* the **full pool** for the full-attention layers: a sequence's block table lists one block per
  `block_size` positions, from position 0 to its end;
* the **window pool** for the sliding-window layers: a sequence holds only the blocks that still reach
  into its last `window` positions; older ones are released as it moves on.

Blocks are shared by content. A full block of prompt tokens that a prefill computed gets a key: a hash
chain over the tokens of every block up to and including it (so equal keys mean an equal prefix, not just
an equal block). A later sequence whose prompt starts with the same blocks takes them instead of
computing them again (prefix reuse: the next turn of a chat re-sends its whole history). Blocks are
refcounted; one that no sequence holds stays cached under its key and is evicted least recently used
first when a fresh block is needed. Blocks a decode step wrote are never keyed: their numbers come from
one-token steps, which round differently from a prefill, and reusing them would make a greedy reply
depend on what the engine served before. They return to the free list when their sequence ends.

Admission never overcommits: `admit` reserves every block a sequence can ever need (its prompt plus
max_tokens, capped by the context), so a running sequence never runs out of blocks, and a request that
does not fit now waits in the scheduler's queue.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np
import torch

DEFAULT_BLOCK_SIZE = 16
DEFAULT_CPU_BYTES = 256 * 2**20  # on a CPU the cache gets a fixed budget (no free-memory probe to size it by)
DEFAULT_GPU_FRACTION = 0.9  # of the GPU memory still free after the weights and CUDA graphs


class CacheFull(Exception):
    """No block to hand out (admission accounting makes this a bug if it ever happens while running)."""


class BlockPool:
    """Block ids with refcounts, content keys and an LRU of unreferenced keyed blocks."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.refs = [0] * num_blocks
        self.free: deque[int] = deque(range(num_blocks))  # unkeyed and unreferenced
        self.key_of: dict[int, bytes] = {}
        self.by_key: dict[bytes, int] = {}
        self.cached: OrderedDict[int, None] = OrderedDict()  # keyed and unreferenced, least recently used first

    def available(self) -> int:
        """Blocks a sequence could be given now: free ones plus cached ones that may be evicted."""
        return len(self.free) + len(self.cached)

    def allocate(self) -> int:
        if self.free:
            block = self.free.popleft()
        elif self.cached:
            block, _ = self.cached.popitem(last=False)  # evict the least recently used prefix block
            del self.by_key[self.key_of.pop(block)]
        else:
            raise CacheFull("no free KV-cache block")
        self.refs[block] = 1
        return block

    def lookup(self, key: bytes) -> int | None:
        return self.by_key.get(key)

    def acquire(self, block: int) -> None:
        self.refs[block] += 1
        self.cached.pop(block, None)

    def release(self, block: int) -> None:
        self.refs[block] -= 1
        assert self.refs[block] >= 0, f"block {block} released more often than acquired"
        if self.refs[block] == 0:
            if block in self.key_of:
                self.cached[block] = None  # most recently used end
            else:
                self.free.append(block)

    def set_key(self, block: int, key: bytes) -> None:
        """Make a block findable by content (first writer wins; an equal block elsewhere stays unkeyed)."""
        if key not in self.by_key and block not in self.key_of:
            self.by_key[key] = block
            self.key_of[block] = key

    def referenced(self) -> int:
        return self.num_blocks - self.available()

    def drop_cached(self) -> None:
        """Forget every unreferenced prefix block (a cold start for the next requests)."""
        for block in list(self.cached):
            del self.by_key[self.key_of.pop(block)]
            self.free.append(block)
        self.cached.clear()


def chain_keys(tokens: list[int], block_size: int, previous: bytes = b"") -> list[bytes]:
    """The content key of every full block of `tokens`: a hash of the previous block's key and this block's tokens.
    `previous`: the key of the block before tokens[0] (when continuing a chain)."""
    keys = []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        block = tokens[start : start + block_size]
        previous = hashlib.blake2b(previous + b"".join(t.to_bytes(4, "little") for t in block), digest_size=16).digest()
        keys.append(previous)
    return keys


@dataclass
class SequenceBlocks:
    """One sequence's place in the cache."""

    tokens: list[int]  # the prompt, then the tokens fed by decode steps
    reserved: int  # full blocks this sequence may ever hold
    full: list[int] = field(default_factory=list)  # block table of the full-attention layers
    window: dict[int, int] = field(default_factory=dict)  # block index -> window-pool block, the recent ones only
    length: int = 0  # positions whose keys/values are in the cache
    prefilled: int = 0  # leading positions a prefill computed (only their full blocks may be keyed)
    reused: int = 0  # leading positions taken from the cache at admission
    keyed: int = 0  # leading full blocks already given their content key
    last_key: bytes = b""  # the key of block keyed-1, where the chain goes on
    window_reserved: int = 0  # window-pool blocks this sequence may hold at once
    slot: int = -1  # its row in the block tables while admitted


class PagedKVCache:
    def __init__(
        self,
        sliding: list[bool],
        window: int,
        kv_heads: int,
        head_dim: int,
        num_blocks: int,
        window_blocks: int,
        block_size: int = DEFAULT_BLOCK_SIZE,
        device="cpu",
        dtype=torch.bfloat16,
    ):
        self.block_size, self.window = block_size, window
        self.sliding = sliding
        self.full_pool, self.window_pool = BlockPool(num_blocks), BlockPool(window_blocks)
        shape_full = (num_blocks + 1, block_size, kv_heads, head_dim)  # + the scratch block
        shape_window = (window_blocks + 1, block_size, kv_heads, head_dim)
        self.keys, self.values = [], []
        for is_sliding in sliding:  # one [blocks, block_size, kv_heads, head_dim] tensor per layer
            shape = shape_window if is_sliding else shape_full
            # empty, not zeros: only written positions are ever read, and untouched pages cost no memory on a CPU
            self.keys.append(torch.empty(shape, dtype=dtype, device=device))
            self.values.append(torch.empty(shape, dtype=dtype, device=device))
        self.sequences: dict[int, SequenceBlocks] = {}  # admitted and not yet released, by id()
        self.prefix_reuse = True  # off: every prompt is computed in full (to measure what reuse saves)
        # Block tables for kernels that read the blocks in place: row = a sequence's slot, column = its logical
        # block index, value = the pool block (the window table's released columns go stale; no query reads
        # them). Each pool has one scratch block past its last, never handed out: unused table entries point at
        # it, and padding rows of a CUDA-graph step write there.
        self.scratch_full, self.scratch_window = num_blocks, window_blocks
        self.table_full = np.full((0, 0), self.scratch_full, dtype=np.int32)
        self.table_window = np.full((0, 0), self.scratch_window, dtype=np.int32)
        self.free_slots: list[int] = []

    @classmethod
    def for_model(cls, config, num_blocks: int, window_blocks: int, block_size: int, device) -> "PagedKVCache":
        """The cache for a gpt-oss ModelConfig: which layers slide, the window, the KV heads and head size."""
        sliding = [config.is_sliding(n) for n in range(config.num_hidden_layers)]
        return cls(sliding, config.sliding_window, config.num_key_value_heads, config.head_dim, num_blocks,
                   window_blocks, block_size, device)

    # -- sizes -------------------------------------------------------------------------------------------

    @staticmethod
    def block_bytes(layers: int, kv_heads: int, head_dim: int, block_size: int, dtype=torch.bfloat16) -> int:
        """Bytes of keys and values of `layers` layers for one block."""
        return 2 * layers * block_size * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def _window_span(self, step_tokens: int) -> int:
        """Window blocks one sequence holds while it runs `step_tokens` new positions."""
        return -(-(self.window + step_tokens) // self.block_size) + 1

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def capacity_tokens(self) -> int:
        return self.full_pool.num_blocks * self.block_size

    def usage(self) -> float:
        """Fraction of the full pool held or promised to running sequences (cached prefix blocks count as free)."""
        return (self.full_pool.referenced() + self.outstanding()[0]) / self.full_pool.num_blocks

    # -- admission and release -----------------------------------------------------------------------------

    def blocks_needed(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def fits_ever(self, tokens: int, step_tokens: int) -> bool:
        """Whether a sequence of `tokens` positions could run in an otherwise empty cache."""
        return (
            self.blocks_needed(tokens) <= self.full_pool.num_blocks
            and self._window_span(step_tokens) <= self.window_pool.num_blocks
        )

    def outstanding(self) -> tuple[int, int]:
        """(full, window) blocks promised to admitted sequences and not yet allocated to them."""
        full = sum(s.reserved - len(s.full) for s in self.sequences.values())
        window = sum(max(0, s.window_reserved - len(s.window)) for s in self.sequences.values())
        return full, window

    def admit(self, prompt: list[int], max_positions: int, step_tokens: int) -> SequenceBlocks | None:
        """Take the cached prefix and reserve the rest, or None (nothing held) when the cache has no room now.

        max_positions: the most positions the sequence will ever write; step_tokens: the most it writes in
        one step (its window-layer blocks must cover that plus the window)."""
        seq = SequenceBlocks(tokens=list(prompt), reserved=self.blocks_needed(max_positions))
        seq.window_reserved = self._window_span(step_tokens)
        self._take_prefix(seq)
        full, window = self.outstanding()
        if (
            self.full_pool.available() < full + seq.reserved - len(seq.full)
            or self.window_pool.available() < window + seq.window_reserved - len(seq.window)
        ):
            self.release(seq)
            return None
        self.sequences[id(seq)] = seq
        self._give_slot(seq)
        return seq

    # -- block tables ------------------------------------------------------------------------------------------

    def _give_slot(self, seq: SequenceBlocks) -> None:
        if not self.free_slots:  # grow by a few rows at a time (admission, not the cache, bounds the count)
            rows = len(self.table_full)
            grow = max(8, rows)
            self.table_full = self._grown(self.table_full, rows + grow, self.table_full.shape[1], self.scratch_full)
            self.table_window = self._grown(self.table_window, rows + grow, self.table_window.shape[1], self.scratch_window)
            self.free_slots = list(range(rows + grow - 1, rows - 1, -1))
        seq.slot = self.free_slots.pop()
        self.table_full[seq.slot] = self.scratch_full
        self.table_window[seq.slot] = self.scratch_window
        self._set_table(seq, 0)

    def ensure_table_width(self, cols: int) -> None:
        """Block tables at least `cols` blocks wide (they grow on demand; a kernel caller may want them wider)."""
        if cols > self.table_full.shape[1]:
            wide = max(cols, 2 * self.table_full.shape[1], 64)
            self.table_full = self._grown(self.table_full, len(self.table_full), wide, self.scratch_full)
            self.table_window = self._grown(self.table_window, len(self.table_window), wide, self.scratch_window)

    @staticmethod
    def _grown(table: np.ndarray, rows: int, cols: int, fill: int) -> np.ndarray:
        bigger = np.full((rows, cols), fill, dtype=np.int32)
        bigger[: table.shape[0], : table.shape[1]] = table
        return bigger

    def _set_table(self, seq: SequenceBlocks, first: int) -> None:
        """Write the sequence's block ids from logical block `first` on into its table rows."""
        if seq.slot < 0:
            return
        self.ensure_table_width(max(len(seq.full), max(seq.window, default=-1) + 1))
        self.table_full[seq.slot, first : len(seq.full)] = seq.full[first:]
        for index, block in seq.window.items():
            if index >= first:
                self.table_window[seq.slot, index] = block

    def rows(self, seq: SequenceBlocks, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """Cache rows (pool block * block_size + offset) of positions start … end-1: (full pools, window pools)."""
        return self.rows_at(np.full(end - start, seq.slot), np.arange(start, end))

    def rows_at(self, slots: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The same for any rows at once: the sequence (table slot) and position of each -> (full, window) int64."""
        blocks, offsets = positions // self.block_size, positions % self.block_size
        full = self.table_full[slots, blocks].astype(np.int64) * self.block_size + offsets
        window = self.table_window[slots, blocks].astype(np.int64) * self.block_size + offsets
        return full, window

    def _take_prefix(self, seq: SequenceBlocks) -> None:
        """Share the longest cached prefix of whole blocks (leaving at least one prompt token to compute)."""
        bs = self.block_size
        keys = chain_keys(seq.tokens[: len(seq.tokens) - 1], bs) if self.prefix_reuse else []
        full = []
        for key in keys:
            block = self.full_pool.lookup(key)
            if block is None:
                break
            full.append(block)
        n, first, window = 0, 0, []
        for candidate in range(len(full), 0, -1):  # the window layers need the blocks reaching into the last window
            first = max(0, candidate * bs - self.window + 1) // bs
            window = [self.window_pool.lookup(keys[i]) for i in range(first, candidate)]
            if all(b is not None for b in window):
                n = candidate
                break
        if n == 0:
            first, window = 0, []
        for block in full[:n]:
            self.full_pool.acquire(block)
        for block in window:
            self.window_pool.acquire(block)
        seq.full = full[:n]
        seq.window = dict(zip(range(first, n), window))
        seq.length = seq.prefilled = seq.reused = n * bs
        seq.keyed, seq.last_key = n, keys[n - 1] if n else b""

    def release(self, seq: SequenceBlocks) -> None:
        """Give back everything a sequence holds or reserved (completion, cancellation, error)."""
        self.sequences.pop(id(seq), None)
        if seq.slot >= 0:
            self.free_slots.append(seq.slot)
            seq.slot = -1
        for block in seq.full:
            self.full_pool.release(block)
        for block in seq.window.values():
            self.window_pool.release(block)
        seq.full, seq.window, seq.reserved, seq.window_reserved = [], {}, 0, 0

    # -- writing and reading, for the model ------------------------------------------------------------------

    def prepare(self, seq: SequenceBlocks, tokens: list[int], prefill: bool) -> None:
        """Make room for `tokens` at positions seq.length …: allocate their blocks (already reserved)."""
        end = seq.length + len(tokens)
        first = seq.length // self.block_size  # the first block this step writes
        needed = self.blocks_needed(end)
        allocated = len(seq.full) < needed
        while len(seq.full) < needed:
            seq.full.append(self.full_pool.allocate())
        for index in range(first, needed):
            if index not in seq.window:
                seq.window[index] = self.window_pool.allocate()
                allocated = True
        if allocated:  # (blocks it held already are in the tables since they were handed out)
            self._set_table(seq, first)
        if seq.length >= len(seq.tokens):
            seq.tokens.extend(tokens)
        if prefill and seq.prefilled == seq.length:
            seq.prefilled = end

    def positions(self, seq: SequenceBlocks, start: int, end: int, layer: int):
        """(block ids, offsets) of positions start … end-1 in `layer`'s pool."""
        index = torch.arange(start, end)
        blocks = index // self.block_size
        if self.sliding[layer]:
            table = torch.tensor([seq.window[int(b)] for b in blocks.unique()], dtype=torch.long)
            ids = table[blocks - blocks[0]]
        else:
            ids = torch.tensor(seq.full, dtype=torch.long)[blocks]
        return ids, index % self.block_size

    def write(self, layer: int, seq: SequenceBlocks, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        ids, offsets = self.positions(seq, start, start + len(k), layer)
        ids, offsets = ids.to(k.device), offsets.to(k.device)
        self.keys[layer][ids, offsets] = k
        self.values[layer][ids, offsets] = v

    def gather(self, layer: int, seq: SequenceBlocks, start: int, end: int):
        """Keys and values of positions start … end-1, copied out of the blocks (the reference's way to read)."""
        ids, offsets = self.positions(seq, start, end, layer)
        ids, offsets = ids.to(self.keys[layer].device), offsets.to(self.keys[layer].device)
        return self.keys[layer][ids, offsets], self.values[layer][ids, offsets]

    def advance(self, seq: SequenceBlocks, n: int) -> None:
        """The model wrote n more positions: key the full blocks a prefill completed, drop window blocks left behind."""
        seq.length += n
        bs = self.block_size
        done = min(seq.prefilled, seq.length) // bs  # full blocks a prefill completed
        if done > seq.keyed:
            keys = chain_keys(seq.tokens[seq.keyed * bs : done * bs], bs, seq.last_key)
            for index, key in enumerate(keys, start=seq.keyed):
                self.full_pool.set_key(seq.full[index], key)
                if index in seq.window:
                    self.window_pool.set_key(seq.window[index], key)
            seq.keyed, seq.last_key = done, keys[-1]
        keep_from = max(0, seq.length - self.window + 1) // bs  # the next query reaches back to here
        for index in [i for i in seq.window if i < keep_from]:
            self.window_pool.release(seq.window.pop(index))

    def drop_cached(self) -> None:
        self.full_pool.drop_cached()
        self.window_pool.drop_cached()
