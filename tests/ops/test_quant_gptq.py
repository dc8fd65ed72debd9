"""GPTQ 4- and 8-bit decoding against an independent quantizer + packer written here."""

from __future__ import annotations

import re

import numpy as np
import pytest

from graphir.ops.quant.gptq import (
    dequantize_gptq,
    g_idx_to_perm,
    resolve_group_size,
    unpack_cols,
    unpack_int4_cols,
    unpack_int4_rows,
    unpack_rows,
)
from graphir.ops.quant.gptq_layout import (
    gptq_weight_bytes,
    gptq_weight_rows,
    pack_rows,
    reorder_gptq_rows,
    split_gptq_weight_bytes,
)

IN, OUT = 256, 24


def _to_int32(words: np.ndarray) -> np.ndarray:
    """uint32 values held in int64 -> the int32 with the same bits (as checkpoints store them)."""
    words = np.asarray(words, dtype=np.int64)
    return np.where(words >= 2**31, words - 2**32, words).astype(np.int32)


def _pack_along_in(q: np.ndarray, bits: int = 4) -> np.ndarray:
    """[in, out] codes -> int32 [in/p, out] (p = 32/bits); row p i + k goes to bits
    bits*k.. of word i, i.e. it adds code * 2**(bits*k)."""
    n, m = q.shape
    p = 32 // bits
    words = np.zeros((n // p, m), dtype=np.int64)
    for i in range(n // p):
        for k in range(p):
            words[i] += q[p * i + k].astype(np.int64) * 2 ** (bits * k)
    return _to_int32(words)


def _pack_along_out(z: np.ndarray, bits: int = 4) -> np.ndarray:
    """[groups, out] codes -> int32 [groups, out/p]; column p j + k goes to bits bits*k.."""
    g, m = z.shape
    p = 32 // bits
    words = np.zeros((g, m // p), dtype=np.int64)
    for j in range(m // p):
        for k in range(p):
            words[:, j] += z[:, p * j + k].astype(np.int64) * 2 ** (bits * k)
    return _to_int32(words)


def _random_g_idx(rng: np.random.Generator, n: int, group: int) -> np.ndarray:
    """desc_act assignment: rows taken in a random order, consecutive `group` of them per group."""
    g_idx = np.empty(n, dtype=np.int32)
    g_idx[rng.permutation(n)] = np.arange(n) // group
    return g_idx


def _fake_quantize(rng, group_size, symmetric, desc_act, v1, bits=4):
    """Quantize random weights per (group, column); returns the checkpoint tensors and the exact
    float64 weights they decode to."""
    top, mid = 2**bits - 1, 2 ** (bits - 1)
    group = IN if group_size == -1 else group_size
    w = rng.standard_normal((IN, OUT)) * np.exp(rng.uniform(-3, 3, (1, OUT)))
    g_idx = _random_g_idx(rng, IN, group) if desc_act else np.arange(IN, dtype=np.int32) // group
    n_groups = IN // group
    scales = np.empty((n_groups, OUT), np.float16)
    zeros = np.empty((n_groups, OUT), np.int64)
    q = np.empty((IN, OUT), np.int64)
    for g in range(n_groups):
        rows = g_idx == g
        block = w[rows]
        if symmetric:
            scale = (np.abs(block).max(axis=0) / (mid - 1)).astype(np.float16)
            zero = np.full(OUT, mid)
        else:
            lo, hi = block.min(axis=0), block.max(axis=0)
            scale = ((hi - lo) / top).astype(np.float16)
            zero = np.clip(np.round(-lo / scale.astype(np.float64)), 1 if v1 else 0, top)
        scales[g], zeros[g] = scale, zero
        q[rows] = np.clip(np.round(block / scale.astype(np.float64)) + zero, 0, top)
    exact = (q - zeros[g_idx]) * scales[g_idx].astype(np.float64)
    qzeros = None if symmetric else _pack_along_out(zeros - 1 if v1 else zeros, bits)
    return _pack_along_in(q, bits), scales, qzeros, g_idx, exact, q


def test_unpack_matches_packer() -> None:
    rng = np.random.default_rng(0)
    q = rng.integers(0, 16, (64, 16))
    assert np.array_equal(unpack_int4_rows(_pack_along_in(q)), q)
    assert np.array_equal(unpack_int4_cols(_pack_along_out(q)), q)
    assert unpack_int4_rows(_pack_along_in(q)).dtype == np.uint8
    # uint32 storage (same bits) is accepted too
    assert np.array_equal(unpack_int4_rows(_pack_along_in(q).view(np.uint32)), q)


@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("desc_act", [False, True])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("bits", [4, 8])
def test_dequantize_reproduces_fake_quantized(group_size, symmetric, desc_act, fmt, bits) -> None:
    rng = np.random.default_rng([group_size % 1000, symmetric, desc_act, len(fmt), bits])
    qweight, scales, qzeros, g_idx, exact, q = _fake_quantize(
        rng, group_size, symmetric, desc_act, v1=fmt == "gptq", bits=bits
    )
    assert qweight.shape == (IN * bits // 32, OUT)
    assert len(np.unique(q)) > 2**bits // 2  # the codes really span the range
    out = dequantize_gptq(
        qweight, scales, qzeros, g_idx if desc_act else None, group_size, checkpoint_format=fmt,
        bits=bits,
    )
    assert out.dtype == np.float32 and out.shape == (IN, OUT)
    assert np.array_equal(out.astype(np.float64), exact)
    if not desc_act:  # the trivial g_idx is the same as none
        same = dequantize_gptq(qweight, scales, qzeros, g_idx, group_size, checkpoint_format=fmt,
                               bits=bits)
        assert np.array_equal(same, out)


@pytest.mark.parametrize("bits", [4, 8])
def test_unpack_and_layout_round_trip(bits: int) -> None:
    rng = np.random.default_rng(bits)
    q = rng.integers(0, 2**bits, (64, 16))
    assert np.array_equal(unpack_rows(_pack_along_in(q, bits), bits), q)
    assert np.array_equal(unpack_cols(_pack_along_out(q, bits), bits), q)
    assert np.array_equal(pack_rows(q.astype(np.uint8), bits), _pack_along_in(q, bits))
    qweight, scales = _pack_along_in(q, bits), rng.standard_normal((2, 16)).astype(np.float16)
    w = gptq_weight_bytes(qweight, scales)
    assert w.shape == (gptq_weight_rows(64, 32, bits), 16) == (64 * bits // 8 + 4, 16)
    back_q, back_s = split_gptq_weight_bytes(w, 64, 32, bits)
    assert np.array_equal(back_q, qweight) and np.array_equal(back_s.view(np.uint16),
                                                              scales.view(np.uint16))
    perm = rng.permutation(64)
    assert np.array_equal(unpack_rows(reorder_gptq_rows(qweight, perm, bits), bits), q[perm])


def test_v1_8bit_stored_255_means_zero_256() -> None:
    qweight = _pack_along_in(np.full((4, 4), 200), 8)
    qzeros = _pack_along_out(np.full((1, 4), 255), 8)
    scales = np.full((1, 4), 0.5, np.float16)
    v1 = dequantize_gptq(qweight, scales, qzeros, None, -1, checkpoint_format="gptq", bits=8)
    v2 = dequantize_gptq(qweight, scales, qzeros, None, -1, checkpoint_format="gptq_v2", bits=8)
    sym = dequantize_gptq(qweight, scales, None, None, -1, bits=8)
    assert np.all(v1 == (200 - 256) * 0.5) and np.all(v2 == (200 - 255) * 0.5)
    assert np.all(sym == (200 - 128) * 0.5)


def test_symmetric_v1_zeros_equal_no_zeros() -> None:
    rng = np.random.default_rng(1)
    qweight, scales, _, _, exact, _ = _fake_quantize(rng, 64, True, False, v1=True)
    sevens = _pack_along_out(np.full((IN // 64, OUT), 7))  # v1 stores zero - 1
    out = dequantize_gptq(qweight, scales, sevens, None, 64, checkpoint_format="gptq")
    assert np.array_equal(out.astype(np.float64), exact)


def test_v1_stored_15_means_zero_16() -> None:
    qweight = _pack_along_in(np.full((8, 8), 3))
    qzeros = _pack_along_out(np.full((1, 8), 15))
    scales = np.full((1, 8), 0.25, np.float16)
    v1 = dequantize_gptq(qweight, scales, qzeros, None, -1, checkpoint_format="gptq")
    v2 = dequantize_gptq(qweight, scales, qzeros, None, -1, checkpoint_format="gptq_v2")
    assert np.all(v1 == (3 - 16) * 0.25) and np.all(v2 == (3 - 15) * 0.25)


@pytest.mark.parametrize("group_size", [32, 128, -1])
def test_g_idx_to_perm(group_size: int) -> None:
    rng = np.random.default_rng(2)
    group = IN if group_size == -1 else group_size
    g_idx = _random_g_idx(rng, IN, group)
    perm = g_idx_to_perm(g_idx, group_size)
    assert perm.dtype == np.int32 and sorted(perm.tolist()) == list(range(IN))
    assert np.array_equal(g_idx[perm], np.arange(IN) // group)
    for g in range(IN // group):  # stable: rows of one group keep their order
        chunk = perm[g * group : (g + 1) * group]
        assert np.all(np.diff(chunk) > 0)
    # the desc_act contract: gathering x by perm and the weight rows by perm keeps x @ W
    qweight, scales, qzeros, g_idx, exact, _ = _fake_quantize(rng, group_size, False, True, False)
    w = dequantize_gptq(qweight, scales, qzeros, g_idx, group_size, checkpoint_format="gptq_v2")
    perm = g_idx_to_perm(g_idx, group_size)
    x = rng.standard_normal((3, IN)).astype(np.float32)
    np.testing.assert_allclose(x[:, perm] @ w[perm], x.astype(np.float64) @ exact, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize(
    "g_idx,group_size,message",
    [
        (np.array([0, 0, 1, 2]), 2, "g_idx[3] = 2 is not a group id: 4 rows in groups of 2 give ids 0..1"),
        (np.array([0, -1, 1, 1]), 2, "g_idx[1] = -1 is not a group id"),
        (np.array([0, 0, 0, 1]), 2, "g_idx assigns 3 rows to group 0; every group must have exactly group_size=2 rows"),
        (np.array([0, 1, 1, 1]), 2, "g_idx assigns 1 rows to group 0"),
        (np.array([0, 0, 0, 0, 0, 0]), 4, "in_features=6 is not divisible by group_size=4"),
        (np.array([0.0, 0.0]), 2, "g_idx must be a 1-D integer array, got float64 (2,)"),
        (np.zeros((2, 2), np.int32), 2, "g_idx must be a 1-D integer array"),
        ([0, 0], 2, "g_idx must be a numpy array, got list"),
        (np.array([0, 0]), 0, "group_size must be positive or -1 (one group), got 0"),
    ],
)
def test_bad_g_idx(g_idx, group_size: int, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        g_idx_to_perm(g_idx, group_size)


def test_dequantize_rejects_bad_g_idx() -> None:
    rng = np.random.default_rng(3)
    qweight, scales, qzeros, g_idx, _, _ = _fake_quantize(rng, 64, False, True, False)
    bad = g_idx.copy()
    bad[np.flatnonzero(bad == 0)[0]] = 1  # group 0 loses a row to group 1
    with pytest.raises(ValueError, match="g_idx assigns 63 rows to group 0"):
        dequantize_gptq(qweight, scales, qzeros, bad, 64, checkpoint_format="gptq_v2")
    with pytest.raises(ValueError, match=re.escape("g_idx has shape (255,), expected (256,)")):
        dequantize_gptq(qweight, scales, qzeros, g_idx[:-1], 64, checkpoint_format="gptq_v2")


def _ok():
    qweight, scales, qzeros, _, _, _ = _fake_quantize(np.random.default_rng(4), 64, False, False, True)
    return qweight, scales, qzeros


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda a: {**a, "qweight": a["qweight"].astype(np.float32)}, "qweight must have dtype int32 (8 packed 4-bit values), got float32"),
        (lambda a: {**a, "qweight": a["qweight"][None]}, "qweight must be 2-D, got shape (1, 32, 24)"),
        (lambda a: {**a, "qweight": a["qweight"][:12]}, "in_features=96 is not divisible by group_size=64"),
        (lambda a: {**a, "scales": a["scales"][:3]}, "scales has shape (3, 24), expected (4, 24) for in_features=256, group_size=64"),
        (lambda a: {**a, "scales": a["scales"].astype(np.float64)}, "scales must be a float16 or float32 numpy array, got float64"),
        (lambda a: {**a, "qzeros": a["qzeros"][:, :2]}, "qzeros has shape (4, 2), expected (4, 3)"),
        (lambda a: {**a, "qzeros": a["qzeros"].astype(np.int64)}, "qzeros must have dtype int32"),
        (lambda a: {**a, "group_size": 0}, "group_size must be positive or -1 (one group), got 0"),
        (lambda a: {**a, "group_size": 48}, "in_features=256 is not divisible by group_size=48"),
        (lambda a: {**a, "checkpoint_format": "awq"}, "checkpoint_format must be one of ('gptq', 'gptq_v2'), got 'awq'"),
        (
            lambda a: {**a, "qweight": a["qweight"][:, :20], "scales": a["scales"][:, :20]},
            "out_features=20 must be a multiple of 8 to pack 4-bit qzeros",
        ),
    ],
)
def test_dequantize_bad_input(mutate, message: str) -> None:
    qweight, scales, qzeros = _ok()
    args = mutate(
        {"qweight": qweight, "scales": scales, "qzeros": qzeros, "group_size": 64, "checkpoint_format": "gptq"}
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        dequantize_gptq(
            args["qweight"],
            args["scales"],
            args["qzeros"],
            None,
            args["group_size"],
            checkpoint_format=args["checkpoint_format"],
        )


def test_bad_bits() -> None:
    qweight, scales, _ = _ok()
    with pytest.raises(ValueError, match=re.escape("GPTQ bits must be one of (4, 8), got 3")):
        dequantize_gptq(qweight, scales, None, None, 64, bits=3)
    with pytest.raises(ValueError, match=re.escape("qweight must have dtype int32 (4 packed 8-bit "
                                                   "values), got int64")):
        unpack_rows(qweight.astype(np.int64), 8)
    with pytest.raises(ValueError, match=re.escape("values 0..255")):
        pack_rows(np.full((4, 2), 256), 8)


def test_resolve_group_size() -> None:
    assert resolve_group_size(-1, 96) == 96
    assert resolve_group_size(32, 96) == 32
    with pytest.raises(ValueError, match="group_size must be an int"):
        resolve_group_size(32.0, 96)
