"""MoE for decode batches on Hopper (sm90), in Gluon: MXFP4 weights decoded straight into wgmma's register operand.

moe_grouped's sm90 tiles leave the decoded weights' place in registers to Triton, which then reshuffles them
into the tensor-core operand's layout (PRMTs, shared-memory trips). Gluon makes layouts explicit, so here the
decode writes the operand directly:

  wgmma's A fragment (bf16, one warp's 16 rows) gives lane t, for each 16-value chunk c of K, the value pairs
  at 16c + 2(t%4) and 16c + 8 + 2(t%4): scattered. So the order of K inside a BLOCK_K tile is permuted: the
  dot's position kl = 16c + 8*nibble + 2(t%4) + h holds the true position (BLOCK_K/4)(t%4) + 4c + 2h + nibble
  (true_k). Each lane's codes are then BLOCK_K/4 consecutive true positions, one run of bytes read with one
  shared-memory load, and a byte's two codes (nibble 0, 1) land 8 apart, where the decode's output registers
  put them. The activations, the dot's other operand (from shared memory), are stored in that order instead:
  x by a copy before mlp1 (in_dot_order), h by mlp1 itself for mlp2.

The weights and activations arrive by cp.async in a ring of STAGES stages of SUB steps (BLOCK_K values of every
row a step); the warpgroup (one: 4 warps) decodes a step (_common.mxfp4_to_bf16's PTX, weights 2**-63 too small)
and issues an async wgmma against x^T, one wgmma in flight while the next step decodes. Two warpgroups (8 warps)
sharing the ring gave wrong sums in run 37: a warpgroup's wgmma wait covers only its own wgmmas, so its refill of
a slot raced with the other's reads. With a CTA barrier before each refill they are right, but no faster (564 against
558 us a layer at 512 tokens, twice the warps in flight: BENCHMARKS.md run 43,
scripts/experiments/moe_wgmma_two_warpgroups.patch), so the kernel takes 4 warps only.
The scales come by plain loads three steps ahead (the compiler repacks them at the top of the next step, so in
effect one step ahead; copying a tile's scales into shared memory once gained 3 % at 512 tokens and lost on the
decode tiles: run 43).

Why stages of several steps: the bytes of one row are far apart in memory (a row is K/2 bytes), so a step
reads BLOCK_N short runs. Asked for as one stage, a row's SUB steps are one run (SUB * BLOCK_K / 2 bytes),
which DRAM serves faster: on the H100 the same kernel reading its bytes as one contiguous run (PROBE, wrong
numbers, a timing probe) was ~25 % faster than with 32-byte runs, and stages of 5 steps got half to two thirds
of that back (BENCHMARKS.md run 37).

Tiles: BLOCK_N weight rows (64 a warpgroup: wgmma's M) x BLOCK_M (token, expert) pairs of one expert (wgmma's
N), laid out by moe_grouped.group_by_expert. mlp1 fuses bias and swiglu, mlp2 the bias, the routing weight and
the float32 atomic sum over a token's experts. moe_grouped hands its calls here on sm90 up to the block table's
MAX_PAIRS (moe_wgmma entry); there is no CPU-interpreter path (Gluon compiles only), so GPU tests cover it.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait
from triton.runtime.jit import constexpr_function

from kubrick.engine.kernels._common import _MXFP4_PTX, mlp2_sum

X_SHIFT = gl.constexpr(2.0**63)  # the decoded weights are 2**-63 times too small (_common.mxfp4_to_bf16)


@constexpr_function  # (also plain Python: tests call it)
def true_k(kl: int, block_k: int) -> int:
    """The true K position (within a tile) that the dot's position kl holds (see the module docstring)."""
    h, lane, nibble, chunk = kl & 1, (kl >> 1) & 3, (kl >> 3) & 1, kl >> 4
    return (block_k // 4) * lane + 4 * chunk + 2 * h + nibble


def dot_order(k: torch.Tensor, block_k: int) -> torch.Tensor:
    """Where true K position k sits in the dot order of its tile (the inverse of true_k, over the whole K)."""
    t = k % block_k
    lane, rest = t // (block_k // 4), t % (block_k // 4)
    chunk, h, nibble = rest // 4, (rest // 2) % 2, rest % 2
    return k - t + 16 * chunk + 8 * nibble + 2 * lane + h


@constexpr_function
def packed_bases(dot_bases: dict, block_k: int) -> dict:
    """The linear-layout bases of the packed bytes [rows, BLOCK_K / 2] (true order) whose decoded codes, put in dot
    order, land where `dot_bases` (the A fragment's bases over [rows, BLOCK_K] in dot order) wants them. The
    nibble (kl = 8) is dropped: both codes of a byte come from it. A lane's bytes come first in register order,
    so that its shared-memory load is one vector."""
    def byte(basis):
        return [basis[0], true_k(basis[1], block_k) // 2]
    regs = [byte(b) for b in dot_bases["reg"] if b != [0, 8]]
    regs = sorted([b for b in regs if b[0] == 0], key=lambda b: b[1]) + [b for b in regs if b[0] != 0]
    return dict(reg=regs, lane=[byte(b) for b in dot_bases["lane"]], warp=[byte(b) for b in dot_bases["warp"]])


@constexpr_function
def _packed_layout(dot, BLOCK_K):
    bases = packed_bases(dict(reg=dot.reg_bases, lane=dot.lane_bases, warp=dot.warp_bases), BLOCK_K)
    return gl.DistributedLinearLayout(bases["reg"], bases["lane"], bases["warp"], [], [dot.shape[0], BLOCK_K // 2])


@constexpr_function
def _in_groups(packed):
    """The packed layout over [rows, scale groups, 16 bytes] (byte j = 16 * group + j % 16)."""
    def split(basis):
        return [basis[0], basis[1] // 16, basis[1] % 16]
    return gl.DistributedLinearLayout([split(b) for b in packed.reg_bases], [split(b) for b in packed.lane_bases],
                                      [split(b) for b in packed.warp_bases], [],
                                      [packed.shape[0], packed.shape[1] // 16, 16])


@gluon.jit
def _decode(packed, scale):
    """uint8 bytes and their bf16 multipliers (same shape) -> (low codes, high codes) in bf16, 2**-63 too small."""
    return gl.inline_asm_elementwise(asm=_MXFP4_PTX, constraints="=r,=r,=r,=r,r,r,r", args=[packed, scale],
                                     dtype=(gl.bfloat16, gl.bfloat16), is_pure=True, pack=4)


@gluon.jit
def _scale_bf16(scale):
    """E8M0 bytes -> the bf16 multipliers of _decode (_common.mxfp4_scale_bf16)."""
    bits = (gl.minimum(scale.to(gl.int32), 191) + 63) << 7
    return bits.to(gl.int16).to(gl.bfloat16, bitcast=True)


@gluon.jit
def _load_stage(w_ring, x_ring, stage, slot, w_ptrs, x_ptrs, x_mask, BYTES: gl.constexpr, SUB: gl.constexpr,
                STEPS: gl.constexpr, PROBE: gl.constexpr):
    """Queue the SUB steps of `stage` (packed bytes and activations) into ring slot `slot`, one cp.async group.
    Stages past the end load the last one again (never read), so the loop needs no branch."""
    first = gl.minimum(stage * SUB, STEPS - SUB)
    for sub in gl.static_range(SUB):
        b0 = (first + sub) * BYTES
        if PROBE:  # timing probe (wrong numbers): the tile's bytes read as one contiguous run
            async_copy.async_copy_global_to_shared(w_ring.index(slot * SUB + sub), w_ptrs + b0 * w_ring.shape[1])
        else:
            async_copy.async_copy_global_to_shared(w_ring.index(slot * SUB + sub), w_ptrs + b0)
        async_copy.async_copy_global_to_shared(x_ring.index(slot * SUB + sub), x_ptrs + 2 * b0, mask=x_mask)
    async_copy.commit_group()


@gluon.jit
def _expert_wgmma(x_ptr, x_rows, stride_x, valid_m, w_blocks, w_scales, row0, row_end,
                  K_BYTES: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_K: gl.constexpr,
                  STAGES: gl.constexpr, SUB: gl.constexpr, num_warps: gl.constexpr, PROBE: gl.constexpr):
    """acc [BLOCK_N, BLOCK_M] = W[row0 : row0 + BLOCK_N] @ x[x_rows]^T over the whole K, times 2**-63 (float32,
    in the wgmma accumulator's layout). Rows from row_end on repeat the one before (callers drop them). x_rows:
    int64 [BLOCK_M] rows of x (stored in dot order), valid_m: which of them are real pairs."""
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, BLOCK_M, 16])
    dot: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    packed: gl.constexpr = _packed_layout(gl.to_linear_layout(dot, [BLOCK_N, BLOCK_K]), BLOCK_K)
    scale_layout: gl.constexpr = gl.SliceLayout(2, _in_groups(packed))  # [BLOCK_N, groups], as the decode wants
    BYTES: gl.constexpr = BLOCK_K // 2
    GROUPS: gl.constexpr = BLOCK_K // 32
    STEPS: gl.constexpr = K_BYTES // BYTES
    gl.static_assert(K_BYTES % (BYTES * SUB) == 0, "K must be a whole number of stages")

    # cp.async sources: 16 bytes of one row a thread (weights), 8 activations a thread
    w_copy: gl.constexpr = gl.BlockedLayout([1, 16], [32 * 16 // BYTES, BYTES // 16], [num_warps, 1], [1, 0])
    x_copy: gl.constexpr = gl.BlockedLayout([1, 8], [32 * 8 // BLOCK_K, BLOCK_K // 8], [num_warps, 1], [1, 0])
    w_rows = gl.minimum(row0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, w_copy)).to(gl.int64), row_end - 1)
    w_cols = gl.arange(0, BYTES, layout=gl.SliceLayout(0, w_copy))
    if PROBE:
        w_ptrs = w_blocks + row0 * K_BYTES + (w_rows - row0)[:, None] * BYTES + w_cols[None, :]
    else:
        w_ptrs = w_blocks + w_rows[:, None] * K_BYTES + w_cols[None, :]
    kl = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, x_copy))
    x_ptrs = x_ptr + gl.convert_layout(x_rows, gl.SliceLayout(1, x_copy))[:, None] * stride_x + kl[None, :]
    x_mask = gl.convert_layout(valid_m, gl.SliceLayout(1, x_copy))[:, None] & (kl[None, :] < BLOCK_K)
    s_rows = gl.minimum(row0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, scale_layout)).to(gl.int64),
                        row_end - 1)
    s_cols = gl.arange(0, GROUPS, layout=gl.SliceLayout(0, scale_layout))
    s_ptrs = w_scales + s_rows[:, None] * (K_BYTES // 16) + s_cols[None, :]

    w_ring = gl.allocate_shared_memory(gl.uint8, [STAGES * SUB, BLOCK_N, BYTES],
                                       gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0]))
    x_ring = gl.allocate_shared_memory(gl.bfloat16, [STAGES * SUB, BLOCK_M, BLOCK_K],
                                       gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_K], gl.bfloat16))
    gl.static_assert(num_warps == 4, "one warpgroup: it alone reads the ring, so its own wgmma waits free the slots")
    for st in gl.static_range(STAGES - 1):
        _load_stage(w_ring, x_ring, st, st, w_ptrs, x_ptrs, x_mask, BYTES, SUB, STEPS, PROBE)
    s0 = gl.load(s_ptrs)
    s1 = gl.load(s_ptrs + GROUPS)
    s2 = gl.load(s_ptrs + 2 * GROUPS)

    acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=mma)
    a_prev = gl.zeros([BLOCK_N, BLOCK_K], gl.bfloat16, layout=dot)  # the A operand of the wgmma in flight
    for stage in range(STEPS // SUB):
        slot = stage % STAGES
        async_copy.wait_group(STAGES - 2)  # this stage's copies (by this thread) have landed;
        fence_async_shared()  # its writes (generic proxy) made visible to wgmma's reads (async proxy), by the writer,
        gl.thread_barrier()  # then everyone's
        for sub in gl.static_range(SUB):
            step = stage * SUB + sub
            s_next = gl.load(s_ptrs + gl.minimum(step + 3, STEPS - 1) * GROUPS)
            codes = gl.reshape(w_ring.index(slot * SUB + sub).load(packed), [BLOCK_N, GROUPS, 16])
            codes, mult = gl.broadcast(codes, gl.expand_dims(_scale_bf16(s0), 2))
            low, high = _decode(codes, mult)
            w = gl.reshape(gl.join(low, high), [BLOCK_N, 4, BLOCK_K // 16, 2, 2])  # true K: (lane, chunk, h, nibble)
            w = gl.reshape(gl.permute(w, (0, 2, 4, 1, 3)), [BLOCK_N, BLOCK_K])  # dot order: (chunk, nibble, lane, h)
            a = gl.convert_layout(w, dot)  # the same registers, renamed (no data moves)
            acc = warpgroup_mma(a, x_ring.index(slot * SUB + sub).permute((1, 0)), acc, is_async=True)
            acc, a_prev = warpgroup_mma_wait(num_outstanding=1, deps=(acc, a_prev))  # the step before is done
            a_prev = a
            if sub == 0:  # so the stage before is done with: refill its slot
                _load_stage(w_ring, x_ring, stage + STAGES - 1, (stage + STAGES - 1) % STAGES, w_ptrs, x_ptrs,
                            x_mask, BYTES, SUB, STEPS, PROBE)
            s0, s1, s2 = s1, s2, s_next
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, a_prev))[0]
    async_copy.wait_group(0)
    return acc


@constexpr_function
def _epilogue_layout(BLOCK_M, num_warps, rank):
    """[rows, BLOCK_M] (rank 2) or [rows, BLOCK_M, 2] (rank 3: mlp1's gate and linear rows of one output)."""
    lanes_m = min(BLOCK_M, 32)
    if rank == 2:
        return gl.BlockedLayout([1, 1], [32 // lanes_m, lanes_m], [num_warps, 1], [1, 0])
    return gl.BlockedLayout([1, 1, 2], [32 // lanes_m, lanes_m, 1], [num_warps, 1, 1], [2, 1, 0])


@gluon.jit
def _dot_position(k, BLOCK_K: gl.constexpr):
    """dot_order in a kernel: where true K position k sits in the dot order of its BLOCK_K tile."""
    t = k % BLOCK_K
    rest = t % (BLOCK_K // 4)
    return k - t + 16 * (rest // 4) + 8 * (rest % 2) + 2 * (t // (BLOCK_K // 4)) + (rest // 2) % 2


@gluon.jit
def _tile(pair_ids_ptr, tile_expert_ptr, BLOCK_M: gl.constexpr, layout: gl.constexpr):
    """This program's tile: its expert (int64, -1 for a tile past the end) and its pair ids (-1 = padding).

    The grid's first (fastest) axis is the block of weight rows, so programs launched together read neighbouring
    rows of one expert: 1-2 % faster at 16-64 tokens than tiles first (BENCHMARKS.md run 38)."""
    tile = gl.program_id(1)
    expert = gl.load(tile_expert_ptr + tile).to(gl.int64)
    pairs = gl.load(pair_ids_ptr + tile * BLOCK_M + gl.arange(0, BLOCK_M, layout=layout)).to(gl.int64)
    return expert, pairs


@gluon.jit
def _mlp1_wgmma_kernel(x_ptr, pair_ids_ptr, tile_expert_ptr, w_blocks, w_scales, bias_ptr, h_ptr,
                       INTER: gl.constexpr, HIDDEN: gl.constexpr, TOPK: gl.constexpr, alpha, limit,
                       BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr,
                       SUB: gl.constexpr, num_warps: gl.constexpr, PROBE: gl.constexpr = False):
    """x [T, HIDDEN] in dot order -> h [pairs, INTER] = swiglu(W1 x + b1), in dot order too (for mlp2)."""
    pair3: gl.constexpr = _epilogue_layout(BLOCK_M, num_warps, 3)
    outs: gl.constexpr = gl.SliceLayout(2, pair3)  # [BLOCK_N / 2 outputs, BLOCK_M pairs]
    expert, pairs = _tile(pair_ids_ptr, tile_expert_ptr, BLOCK_M, gl.SliceLayout(0, outs))
    if expert >= 0:
        valid_m = pairs >= 0
        tokens = gl.where(valid_m, pairs // TOPK, 0)
        row0 = expert * (2 * INTER) + gl.program_id(0) * BLOCK_N  # rows 2i (gate) and 2i + 1 (linear)
        acc = _expert_wgmma(x_ptr, tokens, HIDDEN, valid_m, w_blocks, w_scales, row0, (expert + 1) * (2 * INTER),
                            HIDDEN // 2, BLOCK_N, BLOCK_M, BLOCK_K, STAGES, SUB, num_warps, PROBE)
        y = gl.permute(gl.reshape(acc, [BLOCK_N // 2, 2, BLOCK_M]), (0, 2, 1))  # [outputs, pairs, (gate, linear)]
        y = gl.convert_layout(y, pair3) * X_SHIFT
        i = gl.arange(0, BLOCK_N // 2, layout=gl.SliceLayout(1, outs))
        r = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(1, pair3)))
        local = gl.program_id(0) * BLOCK_N + 2 * gl.expand_dims(gl.expand_dims(i, 1), 2) \
            + gl.expand_dims(gl.expand_dims(r, 0), 1)  # the expert's row of each value
        bias = gl.load(bias_ptr + expert * (2 * INTER) + local, mask=local < 2 * INTER, other=0.0).to(gl.float32)
        gate, lin = gl.split(y + bias)
        gate = gl.minimum(gate, limit)
        lin = gl.minimum(gl.maximum(lin, -limit), limit)
        out = gate * (1.0 / (1.0 + gl.exp(-alpha * gate))) * (lin + 1.0)
        col = gl.program_id(0) * (BLOCK_N // 2) + i
        gl.store(h_ptr + pairs[None, :] * INTER + _dot_position(col, BLOCK_K)[:, None], out.to(h_ptr.dtype.element_ty),
                 mask=valid_m[None, :] & (col < INTER)[:, None])


@gluon.jit
def _mlp2_wgmma_kernel(h_ptr, pair_ids_ptr, tile_expert_ptr, route_w_ptr, w_blocks, w_scales, bias_ptr, out_ptr,
                       stride_out, HIDDEN: gl.constexpr, INTER: gl.constexpr, TOPK: gl.constexpr,
                       BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr,
                       SUB: gl.constexpr, num_warps: gl.constexpr, PROBE: gl.constexpr = False):
    """out [T, HIDDEN] (float32) += routing weight * (W2 h + b2) for each pair of the tile's expert."""
    epi: gl.constexpr = _epilogue_layout(BLOCK_M, num_warps, 2)
    expert, pairs = _tile(pair_ids_ptr, tile_expert_ptr, BLOCK_M, gl.SliceLayout(0, epi))
    if expert >= 0:
        valid_m = pairs >= 0
        safe = gl.where(valid_m, pairs, 0)
        row0 = expert * HIDDEN + gl.program_id(0) * BLOCK_N
        acc = _expert_wgmma(h_ptr, safe, INTER, valid_m, w_blocks, w_scales, row0, (expert + 1) * HIDDEN,
                            INTER // 2, BLOCK_N, BLOCK_M, BLOCK_K, STAGES, SUB, num_warps, PROBE)
        y = gl.convert_layout(acc, epi) * X_SHIFT
        n = gl.program_id(0) * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, epi))
        y = y + gl.load(bias_ptr + expert * HIDDEN + n, mask=n < HIDDEN, other=0.0).to(gl.float32)[:, None]
        y = y * gl.load(route_w_ptr + safe, mask=valid_m, other=0.0)[None, :]
        gl.atomic_add(out_ptr + (safe // TOPK)[None, :] * stride_out + n[:, None], y,
                      mask=valid_m[None, :] & (n[:, None] < HIDDEN), sem="relaxed")


def in_dot_order(x: torch.Tensor, block_k: int) -> torch.Tensor:
    """x [T, K] with each BLOCK_K tile's columns in dot order (one copy kernel; no index tensor, so nothing to
    upload or cache, and CUDA graphs capture it): true position lane * BLOCK_K/4 + 4 chunk + 2 h + nibble goes
    to 16 chunk + 8 nibble + 2 lane + h."""
    tokens, k = x.shape
    tiles = x.reshape(tokens, k // block_k, 4, block_k // 16, 2, 2)  # (lane, chunk, h, nibble) in true order
    return tiles.permute(0, 1, 3, 5, 2, 4).reshape(tokens, k)  # (chunk, nibble, lane, h)


def supports(hidden: int, inter: int, cfg: dict) -> bool:
    """Whether the shapes suit these kernels: K in whole stages (rows may end in a partial tile)."""
    stage_bytes = cfg["BLOCK_K"] // 2 * cfg["SUB"]
    return (hidden // 2) % stage_bytes == 0 and (inter // 2) % stage_bytes == 0


def moe_wgmma(x, expert_ids, expert_weights, mlp1_blocks, mlp1_scales, mlp1_bias, mlp2_blocks, mlp2_scales,
              mlp2_bias, swiglu_alpha: float = 1.702, swiglu_limit: float = 7.0, config: dict | None = None,
              residual=None, out=None):
    """moe_grouped's contract (bf16 x [T, H] on an sm90 GPU) on these kernels. config: BLOCK_M, BLOCK_N, BLOCK_K,
    STAGES, SUB, num_warps (moe_grouped passes the block table's moe_wgmma entry), PROBE (timing only)."""
    from kubrick.engine.kernels.moe_grouped import group_by_expert

    cfg = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, STAGES=2, SUB=5, num_warps=4) | (config or {})
    tokens, hidden = x.shape
    topk = expert_ids.shape[1]
    inter = mlp1_blocks.shape[1] // 2
    assert x.dtype == torch.bfloat16 and supports(hidden, inter, cfg)
    for t in (mlp1_blocks, mlp1_scales, mlp2_blocks, mlp2_scales, expert_weights):
        assert t.is_contiguous()
    pair_ids, tile_expert = group_by_expert(expert_ids, mlp1_blocks.shape[0], cfg["BLOCK_M"])
    tiles = tile_expert.numel()
    h = torch.empty(tokens * topk, inter, dtype=x.dtype, device=x.device)  # in dot order
    launch = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], STAGES=cfg["STAGES"],
                  SUB=cfg["SUB"], num_warps=cfg["num_warps"], PROBE=cfg.get("PROBE", False))
    x_dot = in_dot_order(x, cfg["BLOCK_K"])
    _mlp1_wgmma_kernel[(triton.cdiv(2 * inter, cfg["BLOCK_N"]), tiles)](
        x_dot, pair_ids, tile_expert, mlp1_blocks, mlp1_scales, mlp1_bias, h, INTER=inter, HIDDEN=hidden,
        TOPK=topk, alpha=swiglu_alpha, limit=swiglu_limit, **launch)
    accumulate = out is not None
    out = mlp2_sum(x, residual, out)
    _mlp2_wgmma_kernel[(triton.cdiv(hidden, cfg["BLOCK_N"]), tiles)](
        h, pair_ids, tile_expert, expert_weights, mlp2_blocks, mlp2_scales, mlp2_bias, out, out.stride(0),
        HIDDEN=hidden, INTER=inter, TOPK=topk, **launch)
    return out if accumulate else out.to(x.dtype)
