"""GPTQ weights fixed at load reordered into column panels (lowering/mlir_cpu/pack_gptq.py): the
reorder against the layout's stated byte order, its refusals, which weights take it, and the
kernels reading it (row and tile paths, 4 and 8 bits, both zero-point forms) against the
interpreter; a weight given per call stays as stored and runs the same kernel unpanelled."""
import numpy as np
import pytest

from graphir import DType, Graph, TensorType, Weight, ops
from graphir.ops import QuantizationConfig
from graphir.ops.quant.gptq_layout import gptq_weight_rows
from graphir.runtime.interpreter import run

pytest.importorskip("mlir.ir")


def _weight(rng, k: int, n: int, group: int, bits: int) -> np.ndarray:
    """A GPTQ weight's bytes: random code words, then float16 scales of moderate size."""
    code_bytes = k * bits // 8 * n
    codes = rng.integers(0, 256, code_bytes, dtype=np.uint8)
    scales = rng.uniform(0.01, 0.1, (k // group, n)).astype(np.float16).view(np.uint8)
    return np.concatenate([codes, scales.reshape(-1)]).reshape(gptq_weight_rows(k, group, bits), n)


@pytest.mark.parametrize("bits", [4, 8])
def test_reorder_puts_each_panel_contiguous(bits):
    from graphir.lowering.mlir_cpu import pack_gptq
    from graphir.lowering.mlir_cpu.pack_layout import check_layout, pack_numpy, packed_shape

    rng = np.random.default_rng(bits)
    k, n, group, w = 64, 96, 16, 32
    a = _weight(rng, k, n, group, bits)
    lay = pack_gptq.layout_name(bits, w, k)
    check_layout(lay)
    assert pack_gptq.parse(lay) == (bits, w, k) and packed_shape(a.shape, lay) == list(a.shape)
    out = pack_numpy(a, lay)
    kw, groups = k * bits // 32, k // group
    words = a[:k * bits // 8].reshape(-1).view("<u4").reshape(kw, n)
    got_w = out.reshape(-1)[:kw * n * 4].view("<u4").reshape(n // w, kw, w)
    scales = a[k * bits // 8:].reshape(-1).view("<u2").reshape(groups, n)
    got_s = out.reshape(-1)[kw * n * 4:].view("<u2").reshape(n // w, groups, w)
    for p in range(n // w):
        for j in range(w):
            np.testing.assert_array_equal(got_w[p, :, j], words[:, p * w + j])
            np.testing.assert_array_equal(got_s[p, :, j], scales[:, p * w + j])


def test_reorder_refuses_what_does_not_fit():
    from graphir.lowering.mlir_cpu import pack_gptq

    a = _weight(np.random.default_rng(0), 64, 96, 16, 4)
    with pytest.raises(ValueError, match=r"N a multiple of 64, got shape \(40, 96\)"):
        pack_gptq.repack(a, "gptq4w64k64")
    with pytest.raises(ValueError, match=r"uint8 \[32 \+ 2 groups, N\]"):
        pack_gptq.repack(a[:32], "gptq4w32k64")
    with pytest.raises(ValueError, match="reorders uint8 GPTQ bytes, got int16"):
        pack_gptq.repack(a.astype(np.int16), "gptq4w32k64")
    with pytest.raises(ValueError, match="out must be C-contiguous uint8"):
        pack_gptq.repack(a, "gptq4w32k64", np.empty((40, 95), np.uint8))
    assert pack_gptq.parse("gptq5w32k64") is None and pack_gptq.parse("nk32") is None


def _graph(k, n, group, bits, sym, weight_input: bool):
    cfg = QuantizationConfig(bits=bits, group_size=group, sym=sym)
    types = [TensorType(DType.float32, ["m", k])]
    wt = TensorType(DType.uint8, [gptq_weight_rows(k, group, bits), n])
    zt = TensorType(DType.int32, [k // group, n * bits // 32])
    if weight_input:
        types += [wt] + ([] if sym else [zt])
    with Graph("gptq", input_types=types) as g:
        if weight_input:
            w, z = g.inputs[1], (None if sym else g.inputs[2])
        else:
            w = Weight("w", DType.uint8, list(wt.shape))
            z = None if sym else Weight("z", DType.int32, list(zt.shape))
        args = [g.inputs[0], w] + ([] if sym else [z])
        g.output(ops.qmatmul("GPTQ", cfg, *args))
    return g


@pytest.mark.parametrize("bits,sym,n,panel", [(4, True, 192, 64), (8, False, 96, 32),
                                              (8, True, 48, 16), (4, False, 40, None)])
def test_panelled_kernels_match_the_interpreter(bits, sym, n, panel):
    from graphir.lowering.mlir_cpu.backend import emit_module

    rng = np.random.default_rng(bits * 7 + n)
    k, group = 256, 64
    g = _graph(k, n, group, bits, sym, weight_input=False)
    _, _, plan = emit_module(g)
    (step,) = [s for s in plan.steps if s.op == "qmatmul"]
    want = [[1, f"gptq{bits}w{panel}k{k}"]] if panel else None
    assert step.attrs.get("prepack") == want
    weights = {"w": _weight(rng, k, n, group, bits)}
    if not sym:
        weights["z"] = rng.integers(-2**31, 2**31, (k // group, n * bits // 32), dtype=np.int64
                                    ).astype(np.int32)
    from graphir.runtime.session import InferenceSession

    model = InferenceSession().load(g, weights=weights)
    # one row and two take the row path, 37 rows the tile path and the row path for the rest
    for m in (1, 2, 37):
        x = rng.standard_normal((m, k)).astype(np.float32)
        ref = run(g, x, weights=weights)[0]
        got = model.execute(x)[0]
        np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5 * np.abs(ref).max(),
                                   err_msg=f"{m} rows")


def test_a_weight_given_per_call_stays_as_stored():
    from graphir.lowering.mlir_cpu.backend import emit_module

    rng = np.random.default_rng(3)
    k, n, group = 128, 64, 32
    g = _graph(k, n, group, 8, True, weight_input=True)
    _, _, plan = emit_module(g)
    assert all(not s.attrs.get("prepack") for s in plan.steps)
    x = rng.standard_normal((3, k)).astype(np.float32)
    w = _weight(rng, k, n, group, 8)
    from graphir.runtime.session import InferenceSession

    ref = run(g, x, w)[0]
    got = InferenceSession().load(g).execute(x, w)[0]
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5 * np.abs(ref).max())


def test_inspect_names_the_panels(tmp_path, monkeypatch):
    from graphir.lowering.driver import compile_graph
    from graphir.tools.inspect_cmd import format_summary, summarize

    monkeypatch.setenv("GRAPHIR_CACHE_DIR", str(tmp_path))
    art = compile_graph(_graph(128, 64, 32, 4, True, weight_input=False), "cpu")
    info = summarize(art)
    assert info["prepacked"] == {"k1_qmatmul": [[1, "gptq4w64k128"]]}
    assert "  k1_qmatmul  (operand 1 packed at load: gptq4w64k128)" in format_summary(info)


def test_a_manifest_naming_other_panels_is_refused(tmp_path, monkeypatch):
    """A manifest rewritten (its digest recomputed) to pass the weight in other panels than its
    kernel reads, or as stored, is refused at load rather than computing wrong numbers."""
    import json
    import shutil

    from graphir.lowering.artifact import ArtifactError, root_digest
    from graphir.lowering.driver import compile_graph
    from graphir.runtime.session import InferenceSession

    monkeypatch.setenv("GRAPHIR_CACHE_DIR", str(tmp_path / "cache"))
    k, n, group = 128, 64, 32
    good = compile_graph(_graph(k, n, group, 4, True, weight_input=False), "cpu",
                         out=tmp_path / "good.gart").path
    w = {"w": _weight(np.random.default_rng(5), k, n, group, 4)}
    for edit in ("gptq4w32k128", None):
        art = tmp_path / "edited.gart"
        shutil.rmtree(art, ignore_errors=True)
        shutil.copytree(good, art)
        m = json.loads((art / "manifest.json").read_text())
        (step,) = [s for s in m["plan"]["steps"] if s["op"] == "qmatmul"]
        if edit is None:
            del step["attrs"]["prepack"]
        else:
            step["attrs"]["prepack"] = [[1, edit]]
        m["root_digest"] = root_digest(m)
        (art / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(ArtifactError, match="its kernel was compiled for"):
            InferenceSession().load(art, weights=w)
