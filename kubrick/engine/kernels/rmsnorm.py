"""Fused RMSNorm: one program per row, float32 statistics, output in the input's dtype (one read, one write).

Before the MoE at decode it can also write its output in the MoE GEMV's input layout (kernels/moe_gemv.py),
which saves the GEMV a launch of its own.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kubrick.engine.kernels.moe_gemv import X_SCALE


@triton.jit
def _rmsnorm_kernel(x_ptr, w_ptr, out_ptr, stride_x, stride_out, n_cols, eps, gemv_ptr, BLOCK: tl.constexpr,
                    GEMV: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    y = (x * inv_rms * w).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_out + cols, y, mask=mask)
    if GEMV:  # float32 times 2**64 at [col % 8, col // 8]: moe_gemv.gemv_layout
        tl.store(gemv_ptr + row * n_cols + (cols % 8) * (n_cols // 8) + cols // 8,
                 y.to(tl.float32) * X_SCALE, mask=mask)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, out: torch.Tensor | None = None,
            gemv_out: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., H] (last dim contiguous), weight [H] -> RMSNorm(x) * weight in x's dtype.

    gemv_out: a float32 [rows, 8, H/8] buffer that also receives the result in moe_gemv's input layout.
    """
    n_cols = x.shape[-1]
    x2 = x.reshape(-1, n_cols)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if out is None:
        out = torch.empty_like(x2)
    out2 = out.view(-1, n_cols)
    block = triton.next_power_of_2(n_cols)
    _rmsnorm_kernel[(x2.shape[0],)](
        x2, weight, out2, x2.stride(0), out2.stride(0), n_cols, eps, gemv_out if gemv_out is not None else out2,
        BLOCK=block, GEMV=gemv_out is not None, num_warps=4 if block <= 4096 else 8,
    )
    return out2.view(x.shape)
