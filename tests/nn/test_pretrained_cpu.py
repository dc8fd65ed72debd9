"""from_pretrained compiled for the CPU: a Gemma 2 sliding layer (window and logit softcap)
through InferenceSession against Hugging Face, and the softcapped flash attention kernel on
both of its paths (queries along the lanes, per query vector) against the interpreter."""
from __future__ import annotations

import numpy as np
import pytest

from graphir import DType, Graph, TensorType, ops
from graphir.runtime.interpreter import run
from tests.nn.test_pretrained_hf import CASES, run_against_hf, save_tiny

pytest.importorskip("mlir.ir")


def cpu_executor(graph, weights):
    from graphir.runtime.session import InferenceSession

    return InferenceSession().load(graph, weights=weights).execute


def test_gemma2_sliding_layer_compiled_matches_hf(tmp_path):
    make, layer, _, _ = CASES["gemma2_sliding"]
    config = make()
    save_tiny(config, tmp_path, seed=21)
    attn = run_against_hf(tmp_path, config, layer, executor=cpu_executor)
    assert attn.softcap == 1.5 and attn.sliding_window == 4


def test_softcapped_flash_attention_both_kernel_paths():
    from tests.backends.test_cpu_attention import NH, NKV, D, _meta_types, _ragged

    rng = np.random.default_rng(8)
    types = [TensorType(DType.float32, ["t", NH * D])] + _meta_types()
    with Graph("fa_softcap", input_types=types) as g:
        q, blocks, offs, clen, lut = g.inputs
        g.output(*[ops.flash_attention_ragged(q, blocks, offs, clen, lut, n_heads=NH,
                                              n_kv_heads=NKV, head_dim=D, layer_idx=1,
                                              mask_variant=m, window=w, scale=0.7, softcap=2.0)
                   for m, w in (("causal", None), ("sliding_window_causal", 5))])
    assert "softcap = 2.0" in str(g)
    counts, cached = [35, 1, 17], [6, 10, 0]  # full blocks, tails and a decode row
    blocks, offs, clen, lut = _ragged(rng, counts, cached)
    x = rng.standard_normal((sum(counts), NH * D)).astype(np.float32)
    want = run(g, x, blocks.copy(), offs, clen, lut)
    got = cpu_executor(g, {})(x, blocks, offs, clen, lut)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    with Graph("fa_plain", input_types=types) as g2:
        q, bl, of, cl, lt = g2.inputs
        g2.output(ops.flash_attention_ragged(q, bl, of, cl, lt, n_heads=NH, n_kv_heads=NKV,
                                             head_dim=D, layer_idx=1, scale=0.7))
    (plain,) = run(g2, x, blocks.copy(), offs, clen, lut)
    assert np.abs(plain - want[0]).max() > 0.1  # the cap matters at these magnitudes


def _softcap_graph(device):
    from graphir import BufferType, DeviceRef

    dev = DeviceRef.GPU() if device == "gpu" else DeviceRef.CPU()
    u32, f32 = DType.uint32, DType.float32
    types = [TensorType(f32, ["t", 64], dev), BufferType(f32, ["p", 2, 2, 16, 2, 16], dev),
             TensorType(u32, ["b + 1"], dev), TensorType(u32, ["b"], dev),
             TensorType(u32, ["b", "m"], dev)]
    with Graph("softcap", input_types=types) as g:
        q, bl, o, c, lt = g.inputs
        g.output(ops.flash_attention_ragged(q, bl, o, c, lt, n_heads=4, n_kv_heads=2, head_dim=16,
                                            layer_idx=1, softcap=3.0))
    return g


def test_softcap_round_trips_and_is_checked():
    from graphir.parser import parse

    text = str(_softcap_graph("cpu"))
    assert "softcap = 3.0" in text and str(parse(text)) == text
    bad = text.replace("softcap = 3.0", "softcap = -3.0")
    with pytest.raises(ValueError, match="softcap must be None or a float > 0"):
        parse(bad)


def test_gemma2_style_layer_compiles_for_cuda_with_kernels_only(tmp_path):
    # A Gemma 2 sliding layer (window, logit softcap, scale) compiled offline for sm_90: the
    # softcap is a constexpr of the prefill and decode kernels, nothing runs on the host.
    pytest.importorskip("triton")
    from graphir.lowering.artifact import load_artifact
    from graphir.lowering.driver import compile_graph
    from tests.gpu import family

    g, _ = family.build("gemma2_softcap", DType.bfloat16)
    compile_graph(g, "cuda:sm_90", out=tmp_path / "gemma2.gart")
    m = load_artifact(tmp_path / "gemma2.gart", expect_target="cuda:sm_90").manifest
    steps = m["plan"]["steps"]
    assert not [s["op"] for s in steps if s["kernel"] == "host_runtime"]
    (attn,) = [s for s in steps if s["op"] == "flash_attention_ragged"]
    launched = {op["launch"] for var in attn["attrs"]["variants"] for op in var["ops"]
                if "launch" in op}
    specs = {m["kernels"][k]["spec"] for k in launched}
    assert any(s.startswith("flash_attention_bf16_mask2") and s.endswith("_softcap")
               for s in specs), specs
    assert any(s.startswith("paged_decode_partial_bf16_mask2") and s.endswith("_softcap")
               for s in specs), specs
    assert all(m["kernels"][k]["cubin"].endswith(".cubin") for k in launched)
