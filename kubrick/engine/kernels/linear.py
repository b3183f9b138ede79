"""Linear layers for one token (batch-1 decode): y = x W^T + b (+ residual) as a GEMV that streams W once.

At one token cuBLAS runs these shapes at 59 % (out-projection, 2880 x 4096) and 76 % (QKV, 5120 x 2880) of
copy bandwidth on the H100 (BENCHMARKS.md, profile of run 21). This kernel reads W in 16-byte vectors, many
rows per program and the K loop unmasked but for one tail step, and adds the bias and the residual on the
way out (one launch fewer than `x + F.linear(...)`). Rounding is F.linear's: float32 sums, the output
rounded to x's dtype, then the residual added and rounded again, as `x + linear` does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait

from kubrick.engine.kernels._common import block_config, pdl, pdl_start, round_to_bf16


@triton.jit
def _gemv_step(x_ptr, w_ptr, offs_n, mask_n, k0, K: tl.constexpr, BLOCK_K: tl.constexpr, MASK_N: tl.constexpr,
               MASK_K: tl.constexpr):
    k = k0 + tl.arange(0, BLOCK_K)
    if MASK_K:
        in_k = k < K
        w_mask = in_k[None, :] & mask_n[:, None] if MASK_N else in_k[None, :]
        w = tl.load(w_ptr + offs_n[:, None] * K + k[None, :], mask=w_mask, other=0.0)
        x = tl.load(x_ptr + k[None, :] + 0 * offs_n[:, None], mask=in_k[None, :], other=0.0)
    else:
        w = _w_tile(w_ptr, offs_n, mask_n, k0, K, BLOCK_K, MASK_N)
        x = _x_tile(x_ptr, offs_n, k0, BLOCK_K)
    return w.to(tl.float32) * x.to(tl.float32)


@triton.jit
def _w_tile(w_ptr, offs_n, mask_n, k0, K: tl.constexpr, BLOCK_K: tl.constexpr, MASK_N: tl.constexpr):
    """W's rows offs_n at K positions k0 .. k0 + BLOCK_K (a whole step)."""
    k = k0 + tl.arange(0, BLOCK_K)
    if MASK_N:
        return tl.load(w_ptr + offs_n[:, None] * K + k[None, :], mask=mask_n[:, None], other=0.0)
    return tl.load(w_ptr + offs_n[:, None] * K + k[None, :])


@triton.jit
def _x_tile(x_ptr, offs_n, k0, BLOCK_K: tl.constexpr):
    k = k0 + tl.arange(0, BLOCK_K)
    return tl.load(x_ptr + k[None, :] + 0 * offs_n[:, None])  # in W's layout: no shuffle through shared memory


@triton.jit
def gemv_rows(x_ptr, w_ptr, offs_n, mask_n, K: tl.constexpr, BLOCK_K: tl.constexpr, MASK_N: tl.constexpr,
              AHEAD: tl.constexpr, PDL: tl.constexpr, LAUNCH_AT_END: tl.constexpr = False):
    """float32 sums x . W[offs_n] over all of K (one token): the GEMV's body, which also waits for the kernel
    before under PDL (kernels that end in another epilogue call this, as rope.qkv_rope_cache does)."""
    FULL: tl.constexpr = K // BLOCK_K * BLOCK_K
    # AHEAD, under PDL: the first step's weights are loaded before waiting for the kernel before (they do not
    # depend on it), so the stream of W starts while that kernel still runs. The step goes into the loop's own
    # accumulator (a separate sum would cost a reduction across the program, and was slower). Two steps ahead
    # were no faster (BENCHMARKS.md run 35).
    FIRST_AHEAD: tl.constexpr = AHEAD and PDL and BLOCK_K <= FULL
    if FIRST_AHEAD:
        w0 = _w_tile(w_ptr, offs_n, mask_n, 0, K, BLOCK_K, MASK_N)
    if LAUNCH_AT_END:  # the caller lets the next kernel launch itself, after its stores
        if PDL:
            gdc_wait()
    else:
        pdl_start(PDL)
    acc = tl.zeros((offs_n.shape[0], BLOCK_K), dtype=tl.float32)
    if FIRST_AHEAD:
        acc += w0.to(tl.float32) * _x_tile(x_ptr, offs_n, 0, BLOCK_K).to(tl.float32)
    for k0 in range(BLOCK_K if FIRST_AHEAD else 0, FULL, BLOCK_K):
        acc += _gemv_step(x_ptr, w_ptr, offs_n, mask_n, k0, K, BLOCK_K, MASK_N, False)
    if FULL < K:
        acc += _gemv_step(x_ptr, w_ptr, offs_n, mask_n, FULL, K, BLOCK_K, MASK_N, True)
    return tl.sum(acc, axis=1)


@triton.jit
def _linear_gemv_kernel(x_ptr, w_ptr, b_ptr, res_ptr, out_ptr, N: tl.constexpr, K: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                        HAS_RESIDUAL: tl.constexpr, AHEAD: tl.constexpr, PDL: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    MASK_N: tl.constexpr = N % BLOCK_N != 0
    mask_n = offs_n < N
    y = gemv_rows(x_ptr, w_ptr, offs_n, mask_n, K, BLOCK_K, MASK_N, AHEAD, PDL)
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    if out_ptr.dtype.element_ty == tl.bfloat16:
        y = round_to_bf16(y)
    if HAS_RESIDUAL:
        y += tl.load(res_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        if out_ptr.dtype.element_ty == tl.bfloat16:
            y = round_to_bf16(y)
    tl.store(out_ptr + offs_n, y.to(out_ptr.dtype.element_ty), mask=mask_n)


def uses_gemv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether linear() takes the one-token GEMV (else F.linear)."""
    return x.shape[0] == 1 and weight.is_contiguous() and x[0].is_contiguous()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           residual: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T + bias (+ residual [M, N]) in x's dtype: the GEMV for M == 1, else F.linear."""
    if not uses_gemv(x, weight):
        y = F.linear(x, weight, bias)
        return y if residual is None else residual + y
    n, k = weight.shape
    cfg = block_config("linear_gemv", x.device) | (config or {})
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    _linear_gemv_kernel[(triton.cdiv(n, cfg["BLOCK_N"]),)](
        x, weight, bias if bias is not None else out, residual if residual is not None else out, out,
        N=n, K=k, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None, AHEAD=bool(cfg.get("AHEAD", True)), **pdl(x.device),
        num_warps=cfg["num_warps"],
    )
    return out
