"""What holds the MoE decode GEMV at ~60 % of copy bandwidth at one token: a fixed cost a call (ramp-up and tail
of its two launches) or the streaming rate itself? One token routed to k = 1, 2, 4, 8, 16 experts (k x 13.2 MB
of MXFP4 weights), 8 layers of random 20b experts replayed in a CUDA graph (bench_kernels.time_per_call), and a
least-squares line time = fixed + bytes / rate over k. Prints each point and the fit. On a GPU:

    python3 scripts/experiments/gemv_scaling_probe.py
"""

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench_kernels as b  # noqa: E402

from kubrick.engine.kernels.moe_gemv import moe_gemv  # noqa: E402

LAYERS = 8


def main() -> None:
    bandwidth = b.copy_bandwidth()
    experts = b.moe_weights(LAYERS)
    x = torch.randn(1, b.HIDDEN, device="cuda", dtype=b.BF16)
    points = []
    for k in (1, 2, 4, 8, 16):
        calls = []
        for layer, w in enumerate(experts):
            gen = torch.Generator(device="cuda").manual_seed(layer)
            ids = torch.randperm(b.EXPERTS, device="cuda", generator=gen)[:k].to(torch.int32)[None]
            route = torch.full((1, k), 1.0 / k, device="cuda")
            calls.append(lambda ids=ids, route=route, w=w: moe_gemv(x, ids, route, *w))
        us = b.time_per_call(calls) * 1e6
        nbytes = k * b.mxfp4_expert_bytes()
        points.append((nbytes, us))
        print(f"k={k:2d}  {nbytes / 1e6:6.1f} MB  {us:6.1f} us  {100 * nbytes / (us / 1e6) / bandwidth:4.1f} % of copy",
              flush=True)
    mb, us = np.array([p[0] for p in points]) / 1e6, np.array([p[1] for p in points])
    slope, fixed = np.polyfit(mb, us, 1)
    print(f"fit: {fixed:.1f} us fixed + {slope * 1e3:.2f} us a GB -> streaming at {1e3 / slope:.0f} GB/s "
          f"({100 * 1e12 / slope / bandwidth:.0f} % of copy {bandwidth / 1e9:.0f} GB/s); at k=4 the fixed part is "
          f"{100 * fixed / us[2]:.0f} % of the call")


if __name__ == "__main__":
    main()
