"""C = A @ B^T (+ bias) through TMA: device-side tensor descriptors, optionally persistent.

The descriptors are built in the kernel (`tl.make_tensor_descriptor`, 128 bytes of Triton's
global scratch per descriptor and program, which runtime/cuda/kernel.py allocates), so the
launcher passes plain pointers. TMA moves whole tiles into shared memory asynchronously and fills
out-of-range rows and K columns with zeros, and its stores clip at the tensor edge: no masks and
no address arithmetic in the loop, which leaves the warps free for wgmma. The descriptors need
16-byte aligned rows: K and N multiples of 8 for 16-bit types (4 for fp32); `matmul_configs`
offers these candidates only then.

The tile loop runs `for tile in range(pid, tiles, num_programs)`: launched with one program per
tile it is the classic grid; launched with one program per SM it is persistent, and with
FLATTEN the compiler pipelines across tile boundaries (the next tile's loads overlap this tile's
epilogue). What Hopper GEMMs need for their last 10% (Triton tutorial 09's persistent kernel):
- EPILOGUE_SUBTILE stores the output tile as two [BLOCK_M, BLOCK_N / 2] halves, halving the
  shared-memory staging of the epilogue; that room buys a 4th pipeline stage at 128x256x64.
- WARP_SPECIALIZE asks Triton 3.6's Hopper warp specialization to split the K loop into a TMA
  producer warp group and two wgmma consumer warp groups (with num_warps=4 the kernel runs 12
  warps, registers moved to the consumers by setmaxnreg), as cuBLAS's and FA3's Hopper
  kernels do. Checked offline for sm_90: it applies to the inner K loop only (on the outer
  persistent loop the pass leaves the kernel unchanged), it excludes FLATTEN, and with
  EPILOGUE_SUBTILE the pass fails: configs never combine them.
- The epilogue recomputes its tile coordinates from its own counter (`tile_c`), which keeps
  the prologue's values out of the epilogue so the pipeliner does not carry them across
  iterations.
"""

from __future__ import annotations

import triton
import triton.language as tl

from graphir.lowering.triton_gpu.kernels.matmul import tile_ids
from graphir.lowering.triton_gpu.kernels.pdl import pdl_wait


@triton.jit
def matmul_tma_kernel(a_ptr, b_ptr, bias_ptr, c_ptr, M, N, K, HAS_BIAS: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr, FLATTEN: tl.constexpr,
                      EPILOGUE_SUBTILE: tl.constexpr = False,
                      WARP_SPECIALIZE: tl.constexpr = False):
    pdl_wait()
    C_BLOCK_N: tl.constexpr = BLOCK_N // 2 if EPILOGUE_SUBTILE else BLOCK_N
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[K, 1],
                                       block_shape=[BLOCK_M, BLOCK_K])
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[K, 1],
                                       block_shape=[BLOCK_N, BLOCK_K])
    c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[N, 1],
                                       block_shape=[BLOCK_M, C_BLOCK_N])
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    step = tl.num_programs(0)
    tile_c = tl.program_id(0) - step
    for tile in tl.range(tl.program_id(0), tiles, step, flatten=FLATTEN):
        pid_m, pid_n = tile_ids(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kk in tl.range(k_tiles, warp_specialize=WARP_SPECIALIZE):
            a = a_desc.load([off_m, kk * BLOCK_K])
            b = b_desc.load([off_n, kk * BLOCK_K])
            acc = tl.dot(a, b.T, acc)
        tile_c += step
        pid_m, pid_n = tile_ids(tile_c, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        if HAS_BIAS:
            rn = off_n + tl.arange(0, BLOCK_N)
            acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        if EPILOGUE_SUBTILE:
            halves = tl.permute(tl.reshape(acc, (BLOCK_M, 2, C_BLOCK_N)), (0, 2, 1))
            lo, hi = tl.split(halves)
            c_desc.store([off_m, off_n], lo.to(c_ptr.dtype.element_ty))
            c_desc.store([off_m, off_n + C_BLOCK_N], hi.to(c_ptr.dtype.element_ty))
        else:
            c_desc.store([off_m, off_n], acc.to(c_ptr.dtype.element_ty))
