"""The warp-MMA nib kernel's inline PTX (kernels/quant_nib_mma.py `mma_block_asm`), run over a
whole warp by the numpy emulator (ptx_emulator.py, whose mma.sync follows the PTX ISA's fragment
layout): on the GPU it replaces the plain-op stand-in Triton's interpreter runs, so here each
variant (bfloat16 / float16 X; affine, symmetric and Q6_K codes) is checked against the sums the
kernel means: lane (r, q) holds the code words of weight rows r and r + 8 at word column q (nibble
i: value 8 q + i of the block), X row r's values 8 q + 0..7 as pairs (i, i + 4), and gets back
rows r / r + 8 times X rows 2 q / 2 q + 1, each weight value s c + m rounded once to X's type."""
import numpy as np
import pytest

from graphir.lowering.triton_gpu.kernels import quant_nib_mma as mm
from tests.lowering.triton_gpu import ptx_emulator as emu

U32 = np.uint32


def _f32(v):
    return np.asarray(v, np.float32).view(U32)


def _halves(bits, ty):
    return emu._halves(bits, ty)


def _decode(word, crumbs, i, s, m, kind, ty):
    """Nibble i of `word` as the kernel's weight value, rounded once to ty (s, m rounded first)."""
    rnd = emu._bf16_round if ty == "bf16x2" else emu._f16_round
    back = (lambda b: (b << U32(16)).view(np.float32).astype(np.float64)) if ty == "bf16x2" \
        else (lambda b: b.astype(np.uint16).view(np.float16).astype(np.float64))
    s16, m16 = back(rnd(s.astype(np.float64))), back(rnd(m.astype(np.float64)))
    c = ((word >> U32(4 * i)) & U32(15)).astype(np.float64)
    if kind == 3:
        return c - 8          # exact; the kernel scales the sums
    if kind == 0:
        v = s16 * c + m16
    elif kind == 1:
        v = s16 * (c - 8)
    else:
        v = s16 * (c + 16 * ((crumbs >> U32(2 * i)) & U32(3)).astype(np.float64) - 32)
    return back(rnd(v))


@pytest.mark.parametrize("ty,magic", [("bf16x2", 0x4300), ("f16x2", 0x6400)])
@pytest.mark.parametrize("kind", [0, 1, 2, 3])
def test_mma_block_matches_the_sums(ty, magic, kind):
    rng = np.random.default_rng(3 * kind + len(ty))
    reps, lanes = 16, 32
    shape = (reps, lanes)
    words = [rng.integers(0, 2**32, shape, dtype=np.uint64).astype(U32) for _ in range(2)]
    crumbs = [rng.integers(0, 2**16, shape, dtype=np.uint64).astype(U32) for _ in range(2)]
    scales = [(rng.uniform(1e-3, 1e-1, shape) * rng.choice([-1, 1], shape)).astype(np.float32)
              for _ in range(2)]
    offsets = [rng.uniform(-0.5, 0.5, shape).astype(np.float32) for _ in range(2)]
    rnd = emu._bf16_round if ty == "bf16x2" else emu._f16_round
    xbits = rnd(rng.standard_normal(shape + (8,)))              # 8 X values a lane
    pairs = [xbits[..., j] | (xbits[..., j + 4] << U32(16)) for j in range(4)]
    acc = rng.standard_normal((4,) + shape).astype(np.float32)
    args = [np.zeros(shape, U32) for _ in range(4)] + words + [_f32(s) for s in scales] \
        + [_f32(m) for m in offsets] + crumbs + pairs + [_f32(a) for a in acc]
    got = [emu.run(mm.mma_block_asm(ty, magic, kind), args)[i].view(np.float32) for i in range(4)]

    xv = np.stack([_halves(xbits[..., i], ty)[0] for i in range(8)], -1)   # [reps, 32, 8]
    for half in range(2):                 # weight rows r (fragments 0, 1) and r + 8 (2, 3)
        w = np.stack([_decode(words[half], crumbs[half], i, scales[half], offsets[half], kind, ty)
                      for i in range(8)], -1)                    # [reps, 32 lanes, 8]
        for lane in range(32):
            r, q = lane // 4, lane % 4
            for e in range(2):
                # Weight row r (the lanes (r, q')) times X row n = 2 q + e (the lanes (n, q')).
                n = 2 * q + e
                dot = sum((w[:, 4 * r + qq] * xv[:, 4 * n + qq]).sum(-1) for qq in range(4))
                if kind == 3:
                    dot = dot * scales[half][:, lane].astype(np.float64)
                np.testing.assert_allclose(got[2 * half + e][:, lane],
                                           acc[2 * half + e][:, lane] + dot, rtol=1e-5, atol=1e-5,
                                           err_msg=f"lane {lane} fragment {2 * half + e}")


def test_emulated_mma_follows_the_fragment_layout():
    # A = identity-like pattern checks the emulator itself: lane (g, t)'s a0 low half is A[g, 2t].
    lanes = np.arange(32, dtype=U32)
    one = U32(0x3F80)                                           # bfloat16 1.0
    a = [np.where(lanes % 4 == 0, one, U32(0))[None] if i == 0 else np.zeros((1, 32), U32)
         for i in range(4)]
    b = [(emu._bf16_round((lanes // 4).astype(np.float64)) * U32(0x10001))[None],
         np.zeros((1, 32), U32)]
    c = [np.zeros((1, 32), U32) for _ in range(4)]
    asm = ("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {$0, $1, $2, $3}, "
           "{$4, $5, $6, $7}, {$8, $9}, {$10, $11, $12, $13};")
    d = emu.run(asm, c + a + b + c)
    # A[g, 0] = 1 for every row g < 8; B[0, n] = n: D[g, n] = n.
    lane = np.arange(32)
    np.testing.assert_array_equal(d[0][0].view(np.float32), 2 * (lane % 4))
    np.testing.assert_array_equal(d[1][0].view(np.float32), 2 * (lane % 4) + 1)
    np.testing.assert_array_equal(d[2][0].view(np.float32), 0)


@pytest.mark.parametrize("kind", [0, 2, 3])
def test_two_sets_of_rows_share_the_decode(kind):
    # xn = 2: the second set's MMAs take the same decoded tile against another 8 rows of X;
    # each set's fragments equal what the one-set asm gives for it.
    rng = np.random.default_rng(40 + kind)
    shape = (4, 32)
    ty, magic = "bf16x2", 0x4300
    words = [rng.integers(0, 2**32, shape, dtype=np.uint64).astype(U32) for _ in range(2)]
    crumbs = [rng.integers(0, 2**16, shape, dtype=np.uint64).astype(U32) for _ in range(2)]
    terms = [_f32(rng.uniform(-0.1, 0.1, shape)) for _ in range(4)]
    pairs = [emu._bf16_round(rng.standard_normal(shape)) | (emu._bf16_round(
        rng.standard_normal(shape)) << U32(16)) for _ in range(8)]
    acc = [_f32(rng.standard_normal(shape)) for _ in range(8)]
    zeros = [np.zeros(shape, U32) for _ in range(8)]
    both = emu.run(mm.mma_block_asm(ty, magic, kind, 2),
                   zeros + words + terms + crumbs + pairs + acc)[:8]
    for j in range(2):
        one = emu.run(mm.mma_block_asm(ty, magic, kind, 1),
                      zeros[:4] + words + terms + crumbs + pairs[4 * j:4 * j + 4]
                      + acc[4 * j:4 * j + 4])[:4]
        for i in range(4):
            np.testing.assert_array_equal(both[4 * j + i], one[i], err_msg=f"set {j} fragment {i}")
