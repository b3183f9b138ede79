"""A static KV cache for one sequence: preallocated keys and values per layer, filled as tokens arrive.

Every layer keeps every position (simple; for gpt-oss-20b at 8192 tokens that is 400 MB); sliding-window
layers attend over only the last `window` of them.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, layers: int, capacity: int, kv_heads: int, head_dim: int, device, dtype=torch.bfloat16):
        self.capacity = capacity
        self.length = 0  # tokens already in the cache (positions 0 … length-1)
        shape = (capacity, kv_heads, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.positions = torch.arange(capacity, device=device)

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, window: int = 0):
        """Write the new tokens' k, v at their positions; return (keys, values, key positions) to attend over.

        For a sliding layer only keys within reach of the new queries are returned: the last `window - 1`
        cached ones plus the new ones.
        """
        end = self.length + len(k)
        if end > self.capacity:
            raise ValueError(f"KV cache full: {end} tokens > capacity {self.capacity}")
        self.keys[layer][self.length : end] = k
        self.values[layer][self.length : end] = v
        start = max(0, self.length - window + 1) if window else 0
        return self.keys[layer][start:end], self.values[layer][start:end], self.positions[start:end]

    def advance(self, n: int) -> None:
        self.length += n

    def truncate(self, length: int) -> None:
        """Forget everything from `length` on (to reuse a shared prefix of the next prompt)."""
        self.length = min(self.length, max(0, length))

    def usage(self) -> float:
        return self.length / self.capacity

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)
