"""Random inputs and the error measure shared by the kernel tests."""

from __future__ import annotations

import torch


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Norm-wise relative error; NaN or inf anywhere in `actual` gives inf, so it never passes a bound."""
    actual, expected = actual.double(), expected.double()
    if not torch.isfinite(actual).all():
        return float("inf")
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


# Whole-model logits after several layers of bf16 activations: the kernels round at other points than the
# reference, and on CPU the Triton interpreter truncates float32 -> bf16 instead of rounding. Measured on
# CPU (tiny): 1.2-4.2 % per step. Separately, a router near-tie can pick another expert for one token (seen:
# logits -0.200 vs -0.217 for experts 3 and 0), which moves that step's logits by ~25 %, and the step after it
# (that token's keys and values stay in the cache); so the typical step must be within TYPICAL_BOUND and only
# a few may exceed it.
TYPICAL_BOUND = 5e-2


def typical_steps_agree(errors: list[float]) -> bool:
    """No step off by half (NaN gives inf), and all but a few (a router near-tie and the step after) within
    TYPICAL_BOUND."""
    return max(errors) < 0.5 and sum(e < TYPICAL_BOUND for e in errors) >= len(errors) - max(2, len(errors) // 8)


def from_gemv_input(g) -> torch.Tensor:
    """The activations [T, K] (float32) a moe_gemv.GemvInput holds, read back from either layout."""
    tokens, k = g.data.shape[0], g.data[0].numel() * (2 if g.half else 1)
    if g.half:  # pair word j of word w: (x[8w + j], x[8w + j + 4]) times 2**e; mult is 2**(14 - e)
        pairs = g.data.view(torch.float16).view(tokens, 4, k // 8, 2).float() * (g.mult.view(-1, 1, 1, 1) / 2**14)
        return pairs.permute(0, 2, 3, 1).reshape(tokens, k)
    return g.data.permute(0, 2, 1).reshape(tokens, k) / 2.0**64


def poisoned(shape, dtype, device) -> torch.Tensor:
    """An output buffer full of NaN, so an element the kernel forgets to write shows up as an error."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def random_mxfp4(experts: int, rows: int, cols: int, gen: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed E2M1 blocks [E, rows, cols/32, 16] and E8M0 scales [E, rows, cols/32] like a gpt-oss checkpoint's."""
    blocks = torch.randint(0, 256, (experts, rows, cols // 32, 16), generator=gen, dtype=torch.uint8)
    # 2^(s-127) for s in 118..124: weights of a few hundredths, like trained ones.
    scales = torch.randint(118, 125, (experts, rows, cols // 32), generator=gen, dtype=torch.uint8)
    return blocks.to(device), scales.to(device)


def random_moe(tokens, hidden, inter, experts, topk, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w1b, w1s = random_mxfp4(experts, 2 * inter, hidden, gen, device)
    w2b, w2s = random_mxfp4(experts, hidden, inter, gen, device)
    b1 = (torch.randn(experts, 2 * inter, generator=gen) * 0.1).to(device=device, dtype=dtype)
    b2 = (torch.randn(experts, hidden, generator=gen) * 0.1).to(device=device, dtype=dtype)
    x = torch.randn(tokens, hidden, generator=gen).to(device=device, dtype=dtype)
    scores = torch.randn(tokens, experts, generator=gen)
    ids = scores.topk(topk, dim=-1).indices.to(torch.int32).to(device)
    weights = torch.softmax(torch.randn(tokens, topk, generator=gen), dim=-1).to(device)
    return x, ids, weights, (w1b, w1s, b1, w2b, w2s, b2)


def compiles_once_for_every_batch(kernels: tuple, call) -> bool:
    """Whether call(rows) at 1 … 64 rows compiles `kernels` (triton.jit functions) only on its first call: a
    compile mid-serving would stall every stream, so a batch size may change only the grid."""
    def compiled() -> tuple[int, ...]:
        return tuple(len(kernel.device_caches[torch.cuda.current_device()][0]) for kernel in kernels)

    call(1)
    after_first = compiled()
    for rows in (2, 5, 9, 17, 33, 64):
        call(rows)
        if compiled() != after_first:
            return False
    return True
