"""Count the SASS instructions per 4-bit code in the main loop of an MXFP4 MoE kernel, offline (no GPU needed).

The MoE kernels are bound by instruction issue as much as by bytes (ncu), so the loop's instructions per code
is a figure worth watching while changing them on a machine without a GPU. The kernel is compiled for sm_90 with
Triton's own ptxas and disassembled with its nvdisasm; the innermost backward branch is taken as the K loop.

    python scripts/sass_per_code.py gemv-mlp1 [--half]
    python scripts/sass_per_code.py grouped-mlp2 --block 64,64,64 --w-first
    python scripts/sass_per_code.py wgmma-mlp2 [--block 16,64,64 --stages 2 --sub 5]   (sm90's Gluon MoE)
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # compile, do not interpret (read when the kernel modules are imported)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

HIDDEN = INTER = 2880
NVDISASM = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"


def compile_sm90(fn, signature: dict, constexprs: dict, num_warps: int = 4, num_stages: int = 3):
    attrs = {(i,): [["tt.divisibility", 16]] for i, kind in enumerate(signature.values()) if kind.startswith("*")}
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps,
                                                                                  num_stages=num_stages))


def compile_gluon_sm90(fn, signature: dict, constexprs: dict):
    from triton.experimental.gluon._runtime import GluonASTSource

    attrs = {(i,): [["tt.divisibility", 16]] for i, kind in enumerate(signature.values()) if kind.startswith("*")}
    source = GluonASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=constexprs["num_warps"]))


def wgmma_kernel_and_codes(args):
    """sm90's Gluon MoE: its K loop runs a stage of SUB steps, each BLOCK_N rows x BLOCK_K codes."""
    from kubrick.engine.kernels import moe_wgmma

    block_m, block_n, block_k = (int(v) for v in args.block.split(","))
    tiles = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, STAGES=args.stages, SUB=args.sub,
                 num_warps=args.warps, PROBE=False)
    names = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "STAGES", "SUB", "num_warps", "PROBE")
    if args.kernel == "wgmma-mlp1":
        signature = {"x_ptr": "*bf16", "pair_ids_ptr": "*i32", "tile_expert_ptr": "*i32", "w_blocks": "*u8",
                     "w_scales": "*u8", "bias_ptr": "*bf16", "h_ptr": "*bf16", "INTER": "constexpr",
                     "HIDDEN": "constexpr", "TOPK": "constexpr", "alpha": "fp32", "limit": "fp32",
                     **{name: "constexpr" for name in names}}
        kernel = compile_gluon_sm90(moe_wgmma._mlp1_wgmma_kernel, signature,
                                    dict(INTER=INTER, HIDDEN=HIDDEN, TOPK=4, **tiles))
    else:
        signature = {"h_ptr": "*bf16", "pair_ids_ptr": "*i32", "tile_expert_ptr": "*i32", "route_w_ptr": "*fp32",
                     "w_blocks": "*u8", "w_scales": "*u8", "bias_ptr": "*bf16", "out_ptr": "*fp32",
                     "stride_out": "i32", "HIDDEN": "constexpr", "INTER": "constexpr", "TOPK": "constexpr",
                     **{name: "constexpr" for name in names}}
        kernel = compile_gluon_sm90(moe_wgmma._mlp2_wgmma_kernel, signature,
                                    dict(HIDDEN=HIDDEN, INTER=INTER, TOPK=4, **tiles))
    return kernel, args.sub * block_n * block_k


def kernel_and_codes(args):
    """(compiled kernel, 4-bit codes one iteration of its K loop covers)."""
    from kubrick.engine.kernels import moe_gemv, moe_grouped

    if args.kernel == "gemv-mlp1":
        block_i, block_k = 4, 512
        layout = "*i32" if args.half else "*fp32"
        signature = {"xt_ptr": layout, "x_mult_ptr": "*fp32", "ids_ptr": "*i32", "w_blocks": "*i32",
                     "w_scales": "*u8", "bias_ptr": "*bf16", "ht_ptr": layout, "INTER": "constexpr",
                     "HIDDEN": "constexpr", "TOPK": "constexpr", "alpha": "fp32", "limit": "fp32",
                     "BLOCK_I": "constexpr", "BLOCK_K": "constexpr", "H_DTYPE": "constexpr", "HALF": "constexpr",
                     "H_EXP": "constexpr", "PDL": "constexpr"}
        constexprs = dict(INTER=INTER, HIDDEN=HIDDEN, TOPK=4, BLOCK_I=block_i, BLOCK_K=block_k, H_DTYPE=tl.bfloat16,
                          HALF=args.half, H_EXP=8, PDL=False)
        return compile_sm90(moe_gemv._mlp1_swiglu_gemv_kernel, signature, constexprs), 2 * block_i * block_k
    if args.kernel == "gemv-mlp2":
        block_n, block_k = 16, 512
        signature = {"ht_ptr": "*i32" if args.half else "*fp32", "ids_ptr": "*i32", "route_w_ptr": "*fp32", "w_blocks": "*i32",
                     "w_scales": "*u8", "bias_ptr": "*bf16", "out_ptr": "*fp32", "HIDDEN": "constexpr",
                     "INTER": "constexpr", "TOPK": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr",
                     "K_PER_SPLIT": "constexpr", "HALF": "constexpr", "H_EXP": "constexpr", "PDL": "constexpr"}
        constexprs = dict(HIDDEN=HIDDEN, INTER=INTER, TOPK=4, BLOCK_N=block_n, BLOCK_K=block_k, K_PER_SPLIT=1024,
                          HALF=args.half, H_EXP=8, PDL=False)
        return compile_sm90(moe_gemv._mlp2_combine_gemv_kernel, signature, constexprs), block_n * block_k
    block_m, block_n, block_k = (int(v) for v in args.block.split(","))
    signature = {"h_ptr": "*bf16", "pair_ids_ptr": "*i32", "tile_expert_ptr": "*i32", "route_w_ptr": "*fp32",
                 "w_blocks": "*u8", "w_scales": "*u8", "bias_ptr": "*bf16", "out_ptr": "*fp32", "stride_out": "i32",
                 **{name: "constexpr" for name in ("HIDDEN", "INTER", "TOPK", "BLOCK_M", "BLOCK_N", "BLOCK_K",
                                                   "DOT_DTYPE", "DOT_PRECISION", "DOT_SCALED", "FAST_FP4", "W_FIRST")}}
    constexprs = dict(HIDDEN=HIDDEN, INTER=INTER, TOPK=4, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                      DOT_DTYPE=tl.bfloat16, DOT_PRECISION=None, DOT_SCALED=args.dot_scaled,
                      FAST_FP4=not args.dot_scaled, W_FIRST=args.w_first)
    kernel = compile_sm90(moe_grouped._mlp2_combine_grouped_kernel, signature, constexprs, args.warps, args.stages)
    return kernel, block_n * block_k


def loop_instructions(sass: str) -> list[str]:
    """The instructions of the last loop (backward branch) in the disassembly: the K loop of these kernels."""
    labels, pending, instructions = {}, [], []
    for line in sass.splitlines():
        label = re.match(r"\s*\.L_x_(\d+):", line)
        if label:
            pending.append(label.group(1))
            continue
        found = re.search(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if found:
            address = int(found.group(1), 16)
            for name in pending:
                labels[name] = address
            pending = []
            instructions.append((address, found.group(2)))
    loops = []
    for address, text in instructions:
        target = re.search(r"BRA.*\.L_x_(\d+)", text)
        if target and labels.get(target.group(1), address + 1) <= address:
            start = labels[target.group(1)]
            loops.append([t for a, t in instructions if start <= a <= address])
    if not loops:
        sys.exit("sass_per_code: no loop found in the kernel")
    return max(loops, key=len)


def opcode(text: str) -> str:
    parts = text.split()
    if parts[0].startswith("@"):  # predicated
        parts = parts[1:]
    return parts[0].split(".")[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kernel", choices=["gemv-mlp1", "gemv-mlp2", "grouped-mlp2", "wgmma-mlp1", "wgmma-mlp2"])
    parser.add_argument("--block", default="16,256,64", help="grouped: BLOCK_M,BLOCK_N,BLOCK_K (default: the sm90 "
                        "small table's mlp2 tile)")
    parser.add_argument("--warps", type=int, default=4)
    parser.add_argument("--stages", type=int, default=None, help="pipeline stages (grouped: 3, wgmma: 2)")
    parser.add_argument("--sub", type=int, default=5, help="wgmma: steps a stage")
    parser.add_argument("--w-first", action="store_true", help="grouped: the weights as the dot's first operand")
    parser.add_argument("--half", action="store_true", help="gemv: the half layout (fp16 activation pairs)")
    parser.add_argument("--dot-scaled", action="store_true", help="grouped: tl.dot_scaled instead of FAST_FP4")
    args = parser.parse_args()
    if args.kernel.startswith("wgmma"):
        args.block = args.block if args.block != "16,256,64" else "16,64,64"
        args.stages = args.stages or 2
        kernel, codes = wgmma_kernel_and_codes(args)
    else:
        args.stages = args.stages or 3
        kernel, codes = kernel_and_codes(args)
    cubin = Path(os.environ.get("TMPDIR", "/tmp")) / f"sass_per_code_{os.getpid()}.cubin"
    cubin.write_bytes(kernel.asm["cubin"])
    try:
        sass = subprocess.run([str(NVDISASM), "-c", str(cubin)], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([str(NVDISASM.parent / "cuobjdump"), "--dump-resource-usage", str(cubin)],
                               capture_output=True, text=True).stdout
    finally:
        cubin.unlink()
    loop = loop_instructions(sass)
    threads = 32 * (4 if args.kernel.startswith("gemv") else args.warps)
    registers = re.search(r"REG:(\d+)", usage)
    print(f"registers a thread: {registers.group(1) if registers else '?'}")
    print(f"{args.kernel}: {len(loop)} instructions a loop iteration a thread, {codes} codes an iteration over "
          f"{threads} threads: {len(loop) * threads / codes:.2f} instructions a code")
    tally = collections.Counter(map(opcode, loop))
    print("  most used:", ", ".join(f"{name} {n}" for name, n in tally.most_common(10)))
    print(f"  shared-memory stores (STS) in the loop: {tally['STS']}")  # a layout change through shared memory


if __name__ == "__main__":
    main()
