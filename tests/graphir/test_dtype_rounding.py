"""bf16 / float8 rounding on store, bit for bit against torch's casts."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from graphir import Graph, TensorType
from graphir.dtype import bf16_bits, bf16_from_bits, round_to_bf16, round_to_f8e4m3fn
from graphir.runtime.interpreter import run
from tests.ops.reference_harness import BF16


# -- rounding on store, bit for bit ----------------------------------------------------------------
def _edge_f32():
    specials = [0.0, -0.0, np.inf, -np.inf, np.nan, 1.0, -1.0, 3.0e38, -3.0e38,
                np.finfo(np.float32).max, np.finfo(np.float32).tiny, 1e-45, -1e-45, 1e-40,
                1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 1.0 + 2 ** -8 + 2 ** -23, 255.5, 256.5, 65504.0]
    bits = np.array([0x7F800001, 0xFF800001, 0x7FC00001, 0x3F808000, 0x3F818000, 0x3F80FFFF,
                     0x00008000, 0x80018000, 0x7F7F8000, 0x7F7F7FFF], np.uint32).view(np.float32)
    return np.concatenate([np.array(specials, np.float32), bits])


def _random_f32(n, seed):
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2 ** 32, size=n, dtype=np.uint64).astype(np.uint32)
    a = bits.view(np.float32)
    b = (rng.standard_normal(n) * 10.0 ** rng.integers(-8, 8, n)).astype(np.float32)
    # ties: a random bf16 value plus exactly half of its ulp
    ties = ((bits & 0xFFFF0000) | 0x8000).view(np.float32)
    return np.concatenate([a, b, ties])


@pytest.mark.parametrize("seed", [0, 1])
def test_round_to_bf16_bit_exact_vs_torch(seed):
    x = np.concatenate([_edge_f32(), _random_f32(20000, seed)])
    ours = round_to_bf16(x).view(np.uint32)
    theirs = torch.from_numpy(x).to(torch.bfloat16).to(torch.float32).numpy().view(np.uint32)
    nan = np.isnan(x)
    assert 0 < nan.sum() < len(x)
    np.testing.assert_array_equal(ours[~nan], theirs[~nan])
    # NaN (whatever its payload; torch keeps payload bits) stores as the canonical quiet NaN,
    # never as inf, which truncating a low payload would give.
    np.testing.assert_array_equal(ours[nan], np.full(nan.sum(), 0x7FC00000, np.uint32))
    assert np.isnan(theirs.view(np.float32)[nan]).all()
    np.testing.assert_array_equal(bf16_bits(x)[~nan], (theirs[~nan] >> 16).astype(np.uint16))
    np.testing.assert_array_equal(bf16_from_bits(bf16_bits(x)).view(np.uint32)[~nan], theirs[~nan])


def _bf16_exact_reference(x64: np.ndarray) -> np.ndarray:
    """Nearest-even bf16 of float64 values, written independently: the two bf16 neighbours are
    found by truncation, the nearer picked with exact float64 arithmetic."""
    out = np.empty(len(x64), np.float64)
    for k, v in enumerate(x64):
        t = np.float32(v)  # may round up or down; step to the bf16 at or below |v|
        tb = int(np.array([t], np.float32).view(np.uint32)[0]) & 0xFFFF0000
        lo = float(np.array([tb], np.uint32).view(np.float32)[0])
        if abs(lo) > abs(v):
            tb -= 0x10000
            lo = float(np.array([tb], np.uint32).view(np.float32)[0])
        hi = float(np.array([tb + 0x10000], np.uint32).view(np.float32)[0])
        dl, dh = abs(v - lo), abs(hi - v)
        out[k] = lo if dl < dh else hi if dh < dl else (lo if (tb >> 16) % 2 == 0 else hi)
    return out


def test_round_to_bf16_from_float64_rounds_once():
    rng = np.random.default_rng(7)
    base = rng.standard_normal(3000) * 10.0 ** rng.integers(-6, 6, 3000)
    # values a hair above / below bf16 ties: float64 -> float32 -> bf16 would round twice
    b = round_to_bf16(base).astype(np.float64)
    half_ulp = np.abs(b) * 2.0 ** -8
    near_ties = np.concatenate([b + half_ulp * (1 + 2.0 ** -40), b + half_ulp * (1 - 2.0 ** -40),
                                b - half_ulp * (1 + 2.0 ** -40)])
    x = np.concatenate([base, near_ties, [1.0 + 2 ** -8 + 2 ** -30]])
    got = round_to_bf16(x).astype(np.float64)
    np.testing.assert_array_equal(got, _bf16_exact_reference(x))
    assert round_to_bf16(np.array([1.0 + 2 ** -8 + 2 ** -30]))[0] == 1.0 + 2 ** -7


@pytest.mark.parametrize("seed", [0, 1])
def test_round_to_f8e4m3fn_bit_exact_vs_torch(seed):
    rng = np.random.default_rng(seed)
    grid = np.array([m * 2.0 ** e for e in range(-10, 9) for m in np.arange(8, 16) / 8], np.float32)
    mids = (grid[:-1] + grid[1:]) / 2  # exact ties between neighbouring codes
    x = np.concatenate([
        _edge_f32(), grid, -grid, mids, -mids, np.nextafter(mids, np.float32(0)),
        np.nextafter(mids, np.float32(np.inf)), np.array([447.0, 448.0, 460.0, 464.0, 470.0, 479.9,
                                                          480.0, 1e4, 2.0 ** -9, 2.0 ** -10,
                                                          3 * 2.0 ** -11, 2.0 ** -11], np.float32),
        (rng.standard_normal(20000) * 10.0 ** rng.integers(-4, 3, 20000)).astype(np.float32)])
    ours = round_to_f8e4m3fn(x)
    theirs = torch.from_numpy(x).to(torch.float8_e4m3fn).to(torch.float32).numpy()
    nan = np.isnan(x)
    assert np.isnan(ours[nan]).all() and np.isnan(theirs[nan]).all()
    np.testing.assert_array_equal(ours[~nan].view(np.uint32), theirs[~nan].view(np.uint32))


def test_round_to_f8e4m3fn_saturates_like_torch():
    x = np.array([448.0, 463.9, 464.0, 480.0, 1e6, np.inf, -np.inf, -1e6], np.float32)
    want = torch.from_numpy(x).to(torch.float8_e4m3fn).to(torch.float32).numpy()
    np.testing.assert_array_equal(round_to_f8e4m3fn(x), want)
    np.testing.assert_array_equal(round_to_f8e4m3fn(x), [448, 448, 448, 448, 448, 448, -448, -448])


def test_bf16_store_in_a_graph_rounds_each_op():
    """Values are rounded on every store: (x*3)*3 in bf16 is not x*9 rounded once."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal(4096).astype(np.float32)
    with Graph("twice", input_types=[TensorType(BF16, [4096])]) as g:
        g.output(g.inputs[0] * 3.0 * 3.0)
    (got,) = run(g, x)
    t = torch.from_numpy(x).to(torch.bfloat16)
    want = ((t * 3.0) * 3.0).to(torch.float32).numpy()  # torch bf16 ops round after each op
    np.testing.assert_array_equal(got, want)
    once = (t.to(torch.float64) * 9.0).to(torch.bfloat16).to(torch.float32).numpy()
    assert (got != once).any()
    assert math.isfinite(float(got.sum()))


def test_to_bits_and_from_bits_round_trip():
    from graphir.dtype import DType, from_bits, to_bits

    codes = np.arange(256, dtype=np.uint8)
    vals = from_bits(codes, DType.float8_e4m3fn)
    back = to_bits(vals, DType.float8_e4m3fn)
    finite = ~np.isnan(vals)
    np.testing.assert_array_equal(back[finite], codes[finite])  # incl. 0x80 (-0.0)
    assert np.isnan(from_bits(back[~finite], DType.float8_e4m3fn)).all()
    want = torch.tensor(vals[finite], dtype=torch.float32).to(torch.float8_e4m3fn)
    np.testing.assert_array_equal(back[finite], want.view(torch.uint8).numpy())
    x = np.random.default_rng(0).standard_normal(33).astype(np.float32)
    np.testing.assert_array_equal(to_bits(x, DType.bfloat16),
                                  torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16))
    assert to_bits(np.float32(1.5), DType.bfloat16).shape == ()  # rank 0 stays rank 0
    assert to_bits(np.float32(1.5), DType.float32).shape == ()
    assert to_bits(x, DType.float32) is x  # already in storage form: shared, not copied
