"""Capturing a step as a CUDA graph, the way every graph class of the engine does it (fast_model.py,
mixed_graphs.py): run it a few times on a side stream first, so that Triton compiles every kernel and the
caching allocator settles outside the capture, then capture it once, optionally into a memory pool shared with
other graphs that never replay at the same time. Also the one way host inputs reach the GPU for a queued step
(`on_device`): through pinned memory, so the host need not wait for the steps queued before."""

from __future__ import annotations

from typing import Callable, TypeVar

import torch

T = TypeVar("T")


def warm_up(device: torch.device, step: Callable[[], object], times: int = 2) -> None:
    """Run `step` `times` on a side stream (what torch.cuda.graph asks for before a capture)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(times):
            step()
    torch.cuda.current_stream(device).wait_stream(side)


def capture(step: Callable[[], T], pool=None) -> tuple[torch.cuda.CUDAGraph, T]:
    """-> (the graph of one call of `step`, what that call returned: the static outputs a replay rewrites)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = step()
    return graph, out


def on_device(values, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A host tensor or list on `device`. To a GPU it goes through pinned memory without waiting for the device's
    queue: a copy from pageable memory would wait for every step queued before it."""
    host = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
