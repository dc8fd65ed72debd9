"""The tensor-core nib kernel's inline PTX decoders (kernels/quant_nib_tc.py), run by a numpy
emulator of their instructions (ptx_emulator.py): on the GPU they replace the plain-op stand-in
that Triton's interpreter runs, so here each is checked against the decode it must produce, value
for value and bit for bit: plane i of word columns j, j + 1 packed low / high, s c + m (affine),
s (c - 8) (symmetric) or s (c6 - 32) with q6_k's crumbs, rounded once to bfloat16 / float16."""
import numpy as np
import pytest

from graphir.lowering.triton_gpu.kernels import quant_nib_tc as tc
from tests.lowering.triton_gpu import ptx_emulator as emu

U32 = np.uint32


def _bits(rng, n, ty):
    """n random 16-bit floats (scales / offsets of both signs, 1e-3..1e-1) as (bits, float64)."""
    v = rng.uniform(1e-3, 1e-1, n) * rng.choice([-1, 1], n)
    b = emu._bf16_round(v) if ty == "bf16x2" else emu._f16_round(v)
    back = ((b << U32(16)).view(np.float32) if ty == "bf16x2"
            else b.astype(np.uint16).view(np.float16)).astype(np.float64)
    return b, back


def _round(x, ty):
    return emu._bf16_round(x) if ty == "bf16x2" else emu._f16_round(x)


@pytest.mark.parametrize("ty,magic", [("bf16x2", 0x4300), ("f16x2", 0x6400)])
@pytest.mark.parametrize("kind", ["affine", "sym", "q6"])
def test_decoder_matches_the_codes(ty, magic, kind):
    rng = np.random.default_rng(len(ty) + len(kind))
    n = 4096
    w = rng.integers(0, 2**32, (2, n), dtype=np.uint64).astype(U32)
    crumbs = rng.integers(0, 2**32, n, dtype=np.uint64).astype(U32)
    (s_lo, sl), (s_hi, sh) = _bits(rng, n, ty), _bits(rng, n, ty)
    (m_lo, ml), (m_hi, mh) = _bits(rng, n, ty), _bits(rng, n, ty)
    s_pair, m_pair = s_lo | (s_hi << U32(16)), m_lo | (m_hi << U32(16))
    outs = [np.zeros(n, U32) for _ in range(8)]
    if kind == "q6":
        asm = tc._q6_planes_asm(ty, magic)
        got = emu.run(asm, outs + [w[0], w[1], crumbs, crumbs, s_pair])[:8]
    else:
        asm = tc._planes_asm(ty, magic, sym=kind == "sym")
        got = emu.run(asm, outs + [w[0], w[1], s_pair, m_pair])[:8]
    for i in range(8):
        want = []
        for h, (s, m) in enumerate(((sl, ml), (sh, mh))):
            c = ((w[h] >> U32(4 * i)) & U32(15)).astype(np.float64)
            if kind == "affine":
                v = s * c + m
            elif kind == "sym":
                v = s * (c - 8)
            else:
                hi = ((crumbs >> U32(16 * h + 2 * i)) & U32(3)).astype(np.float64)
                v = s * (c + 16 * hi - 32)
            want.append(_round(v, ty))
        np.testing.assert_array_equal(got[i], want[0] | (want[1] << U32(16)), err_msg=f"plane {i}")


def test_emulator_rounds_to_nearest_even():
    # 1 + 2**-8 is a tie between bfloat16's 1 and 1 + 2**-7: even is 1.
    assert emu._bf16_round(np.array([1 + 2.0**-8]))[0] == 0x3F80
    assert emu._bf16_round(np.array([1 + 3 * 2.0**-8]))[0] == 0x3F82
