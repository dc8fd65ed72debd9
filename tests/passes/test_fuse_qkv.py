"""fuse-qkv: three projections of one input become concat(weights) + fused_qkv_matmul + split;
numbers against the unfused graph on the interpreter, goldens, and the cases it must not touch."""
from __future__ import annotations

import numpy as np
import pytest

from graphir import ops
from graphir import Dim, DType, Graph, TensorType, Weight, parse
from graphir.passes import PASSES, run_passes
from graphir.runtime.interpreter import run
from tests.passes.golden import check_golden, golden_path

HIDDEN, NH, NKV, D = 8, 4, 2, 4
OUTS = (NH * D, NKV * D, NKV * D)
F32 = DType.float32
T = Dim("total_seq_len")


def _proj(x, name, out, bias, form="transpose_b", dtype=F32):
    w = Weight(f"{name}.weight", dtype, [out, HIDDEN])
    if form == "transpose_b":
        y = ops.matmul(x, w, transpose_b=True)
    elif form == "permute":
        y = x @ w.T
    elif form == "clamped":  # a computed weight (as clip_qkv makes)
        y = ops.matmul(x, ops.clamp(w, -1.0, 1.0), transpose_b=True)
    else:
        y = ops.matmul(x, Weight(f"{name}.wt", dtype, [HIDDEN, out]))
    return y + Weight(f"{name}.bias", dtype, [out]) if bias else y


def build(*, bias=(False, False, False), forms=("transpose_b",) * 3, n=3, two_inputs=False,
          rank3=False, dtype=F32, early_use=False, raw_use=False):
    xt = TensorType(dtype, [2, T, HIDDEN] if rank3 else [T, HIDDEN])
    with Graph("qkv", input_types=[xt, xt], input_names=["x", "x2"]) as g:
        x, x2 = g.inputs
        outs = []
        for i in range(n):
            name = ("q_proj", "k_proj", "v_proj", "extra_proj")[i]
            src = x2 if two_inputs and i == 2 else x
            y = _proj(src, name, OUTS[min(i, 2)], bias[min(i, 2)], forms[min(i, 2)], dtype)
            outs.append(y)
            if early_use and i == 0:
                outs.append(y * 2.0)  # a use of q before k's and v's weights exist (or are computed)
        if raw_use:
            outs.append(outs[0].node.operands[0] * 1.5)  # q's pre-bias product used elsewhere
        g.output(*outs)
    return g


def _weights(g, rng):
    return {n: rng.standard_normal(tuple(int(d) for d in v.type.shape)).astype(np.float32)
            for n, v in g.weights.items()}


def _check_numbers(ref, fused, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((5, HIDDEN)).astype(np.float32)
    w = _weights(ref, rng)
    want = run(ref, x, x, weights=w)
    got = run(fused, x, x, weights=w)
    assert len(want) == len(got)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def _ops(g):
    return [n.op for n in g.nodes]


@pytest.mark.parametrize("bias", [(False,) * 3, (True,) * 3])
@pytest.mark.parametrize("form", ["transpose_b", "permute"])
def test_fuses(bias, form):
    g = build(bias=bias, forms=(form,) * 3)
    assert PASSES["fuse-qkv"](g)
    assert _ops(g).count("fused_qkv_matmul") == 1 and "matmul" not in _ops(g)
    assert "add" not in _ops(g) and "permute" not in _ops(g)
    (fused,) = [n for n in g.nodes if n.op == "fused_qkv_matmul"]
    assert len(fused.operands) == (3 if bias[0] else 2)
    cat = fused.operands[1].node
    assert cat.op == "concat" and [v.node.attrs["name"] for v in cat.operands] == \
        ["q_proj.weight", "k_proj.weight", "v_proj.weight"]
    (split,) = [n for n in g.nodes if n.op == "split"]
    assert [int(s) for s in split.attrs["sizes"]] == list(OUTS) and split.attrs["axis"] == 1
    assert g.outputs == split.results
    _check_numbers(build(bias=bias, forms=(form,) * 3), g, seed=int(bias[0]) * 2 + (form == "permute"))


def test_weights_defined_late_are_hoisted():
    g = build(early_use=True, forms=("transpose_b", "transpose_b", "clamped"))
    assert not PASSES["fuse-qkv"](g)  # v's weight is computed after q's use: pinned
    g = build(early_use=True)
    assert PASSES["fuse-qkv"](g)
    assert _ops(g)[:4] == ["weight"] * 3 + ["concat"]
    _check_numbers(build(early_use=True), g, seed=13)


def test_partial_bias_keeps_the_adds():
    g = build(bias=(True, True, False))
    assert PASSES["fuse-qkv"](g)
    (fused,) = [n for n in g.nodes if n.op == "fused_qkv_matmul"]
    assert len(fused.operands) == 2 and _ops(g).count("add") == 2
    _check_numbers(build(bias=(True, True, False)), g, seed=11)


def test_bias_not_folded_when_product_used_elsewhere():
    g = build(bias=(True,) * 3, raw_use=True)
    assert PASSES["fuse-qkv"](g)
    (fused,) = [n for n in g.nodes if n.op == "fused_qkv_matmul"]
    assert len(fused.operands) == 2 and _ops(g).count("add") == 3
    _check_numbers(build(bias=(True,) * 3, raw_use=True), g, seed=12)


NEGATIVE = {
    "two-projections": dict(n=2),
    "four-projections": dict(n=4),
    "different-inputs": dict(two_inputs=True),
    "not-transposed-weight": dict(forms=("transpose_b", "plain", "transpose_b")),
    "batched-input": dict(rank3=True),
    "integer-dtype": dict(dtype=DType.int32),
    "q-used-before-computed-v-weight": dict(early_use=True, forms=("transpose_b",) * 2 + ("clamped",)),
}


@pytest.mark.parametrize("case", list(NEGATIVE))
def test_does_not_fire(case):
    g = build(**NEGATIVE[case])
    before = str(g)
    assert PASSES["fuse-qkv"](g) is False
    assert str(g) == before


def test_goldens(update_goldens):
    g = build(bias=(True,) * 3)
    check_golden("fuse_qkv_bias.before.gir", str(g), update_goldens)
    run_passes(g, ["fuse-qkv"])
    check_golden("fuse_qkv_bias.after.gir", str(g), update_goldens)
    if not update_goldens:
        with open(golden_path("fuse_qkv_bias.before.gir")) as f:
            parsed = parse(f.read())
        run_passes(parsed, ["fuse-qkv"])
        with open(golden_path("fuse_qkv_bias.after.gir")) as f:
            assert str(parsed) == f.read()


def test_pipeline_fuses_projections_then_rope_split_store():
    """Three Linear-style projections + split-free rope/store: fuse-qkv makes the split that
    fuse-rope-split-store then consumes."""
    from graphir import BufferType
    from graphir.ops.rope_math import rope_freqs_cis

    u32 = DType.uint32
    b = Dim("batch")
    types = [TensorType(F32, [T, HIDDEN]), TensorType(F32, [32, D]), TensorType(u32, [b + 1]),
             TensorType(u32, [b]), TensorType(u32, [b, "max_pages"]),
             BufferType(F32, [5, 2, 2, 4, NKV, D])]

    def make():
        with Graph("layer", input_types=types,
                   input_names=["x", "freqs", "offs", "clen", "lut", "blocks"]) as g:
            x, f, offs, clen, lut, blocks = g.inputs
            q, k, v = (_proj(x, n, o, True) for n, o in zip(("q_proj", "k_proj", "v_proj"), OUTS))
            qr = ops.rope(q, f, offs, clen, head_dim=D, interleaved=False)
            kr = ops.rope(k, f, offs, clen, head_dim=D, interleaved=False)
            ops.kv_cache_store(kr, blocks, offs, clen, lut, kind=0, layer_idx=1)
            ops.kv_cache_store(v, blocks, offs, clen, lut, kind=1, layer_idx=1)
            g.output(ops.flash_attention_ragged(qr, blocks, offs, clen, lut, n_heads=NH,
                                                n_kv_heads=NKV, head_dim=D, layer_idx=1))
        return g

    ref, opt = make(), run_passes(make())
    assert _ops(opt).count("rope_split_store") == 1 and _ops(opt).count("fused_qkv_matmul") == 1
    assert not {"matmul", "rope", "kv_cache_store", "split", "add"} & set(_ops(opt))
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, HIDDEN)).astype(np.float32)
    offs = np.array([0, 1, 4], np.uint32)
    clen = np.array([2, 3], np.uint32)
    lut = np.array([[0, 1], [2, 3]], np.uint32)
    blocks = rng.standard_normal((5, 2, 2, 4, NKV, D)).astype(np.float32)
    w = _weights(ref, rng)
    args = [x, rope_freqs_cis(D, 16, 10000.0), offs, clen, lut]
    b_ref, b_opt = blocks.copy(), blocks.copy()
    (want,) = run(ref, *args, b_ref, weights=w)
    (got,) = run(opt, *args, b_opt, weights=w)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(b_opt, b_ref, rtol=1e-5, atol=1e-5)
    assert not np.allclose(b_ref, blocks)
