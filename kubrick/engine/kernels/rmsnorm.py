"""Fused RMSNorm: one program per row, float32 statistics, output in the model's dtype (one read, one write).

It can also write its output in the MoE GEMV's input layout (kernels/moe_gemv.py), which saves the GEMV a
launch of its own.

Between layers the residual stream is kept in float32 (the MoE kernels sum their experts into it, see
FastTransformer._moe), so these kernels also do the model's bf16 adds and casts around it:
  rmsnorm(stream, dtype=bf16)       rounds the stream to the model's dtype before the statistics (the cast
                                    after the MoE); the model norms the attention's input this way;
  add_rmsnorm(x, y, w, stream=s)    h = x + y as the model adds in its dtype (the residual add after the
                                    attention), writes h to s in float32 (the MoE's accumulator, no copy) and
                                    returns RMSNorm(h). The model uses router.norm_router, which does the same
                                    and routes h in the same launch; `residual_sum` is their shared add.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kubrick.engine.kernels._common import pdl, pdl_start, round_to
from kubrick.engine.kernels.moe_gemv import GemvInput, store_gemv_input


@triton.jit
def residual_sum(x_ptr, y_ptr, row, stride_x, stride_y, cols, mask, ADD: tl.constexpr, DTYPE: tl.constexpr):
    """Row `row`'s columns `cols` of x (+ y) as the model sees them: x rounded to DTYPE (x may be the float32
    stream), then torch's x + y in DTYPE (a float32 sum rounded once) -> float32."""
    x = round_to(tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32), DTYPE)
    if ADD:
        x = round_to(x + tl.load(y_ptr + row * stride_y + cols, mask=mask, other=0.0).to(tl.float32), DTYPE)
    return x


@triton.jit
def _rmsnorm_kernel(x_ptr, y_ptr, w_ptr, out_ptr, stream_ptr, stride_x, stride_y, stride_out, n_cols, eps, gemv_ptr,
                    gemv_mult_ptr, BLOCK: tl.constexpr, GEMV: tl.constexpr, HALF: tl.constexpr, ADD: tl.constexpr,
                    STREAM: tl.constexpr, PDL: tl.constexpr):
    pdl_start(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    DTYPE: tl.constexpr = out_ptr.dtype.element_ty
    x = residual_sum(x_ptr, y_ptr, row, stride_x, stride_y, cols, mask, ADD, DTYPE)
    if STREAM:
        tl.store(stream_ptr + row * n_cols + cols, x, mask=mask)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    y = (x * inv_rms * w).to(DTYPE)
    tl.store(out_ptr + row * stride_out + cols, y, mask=mask)
    if GEMV:
        y = y.to(tl.float32)
        store_gemv_input(gemv_ptr, gemv_mult_ptr, row, cols, y, n_cols, mask, tl.max(tl.abs(y), axis=0), True, HALF)


def _rows(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    t2 = t.reshape(-1, n_cols)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _launch(x, y, weight, eps, out, stream, gemv_out, dtype) -> torch.Tensor:
    n_cols = x.shape[-1]
    x2 = _rows(x, n_cols)
    y2 = _rows(y, n_cols) if y is not None else x2
    if out is None:
        out = torch.empty(x2.shape, dtype=dtype or x.dtype, device=x.device)
    out2 = out.view(-1, n_cols)
    if stream is not None:
        assert stream.dtype == torch.float32 and stream.is_contiguous() and stream.numel() == x2.numel()
    block = triton.next_power_of_2(n_cols)
    _rmsnorm_kernel[(x2.shape[0],)](
        x2, y2, weight, out2, stream if stream is not None else out2, x2.stride(0), y2.stride(0), out2.stride(0),
        n_cols, eps, gemv_out.data if gemv_out is not None else out2,
        gemv_out.mult if gemv_out is not None and gemv_out.half else out2,
        BLOCK=block, GEMV=gemv_out is not None, HALF=gemv_out is not None and gemv_out.half, ADD=y is not None,
        STREAM=stream is not None,
        **pdl(x.device), num_warps=4 if block <= 4096 else 8,
    )
    return out2.view(*x.shape[:-1], n_cols)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, out: torch.Tensor | None = None,
            gemv_out: GemvInput | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [..., H] (last dim contiguous), weight [H] -> RMSNorm(x) * weight in `dtype` (default x's dtype).

    A float32 x with a narrower `dtype` is rounded to it first: x is then the float32 residual stream.
    gemv_out: a GemvInput (moe_gemv.new_gemv_input) that also receives the result in moe_gemv's input layout.
    """
    return _launch(x, None, weight, eps, out, None, gemv_out, dtype)


def add_rmsnorm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5,
                stream: torch.Tensor | None = None, gemv_out: GemvInput | None = None) -> torch.Tensor:
    """RMSNorm(h) * weight in y's dtype, where h = x + y summed as y's dtype sums (x, if float32, rounded to
    y's dtype first). stream: a float32 buffer shaped like x that receives h (it may be x itself)."""
    return _launch(x, y, weight, eps, None, stream, gemv_out, y.dtype)
