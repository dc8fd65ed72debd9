"""The roofline chart the benchmark scripts write beside their tables."""
from __future__ import annotations

import pytest

from graphir.tools.roofline import Point, plot


def test_points_and_chart(tmp_path):
    p = Point("matmul", flops=2 * 512 * 4096 * 4096, nbytes=4 * (512 * 4096 * 2 + 4096 * 4096),
              seconds=0.1)
    assert p.intensity == pytest.approx(p.flops / p.nbytes) and p.rate == pytest.approx(p.flops / 0.1)
    pytest.importorskip("matplotlib")
    out = plot([p, Point("torch", p.flops, p.nbytes, 0.08, ours=False)], bandwidth=50e9,
               peak=240e9, out=tmp_path / "r.png", title="test")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_layer_work_counts_causal_pairs_and_bytes():
    from graphir.tools.roofline import attention_layer_work

    # 1 sequence, 2 cached + 3 new tokens: query i sees 2 + i + 1 keys -> 3 + 4 + 5 = 12 pairs.
    nh, nkv, d, hidden = 4, 2, 8, 32
    flops, nbytes = attention_layer_work(1, 2, 3, nh, nkv, d, hidden, 2)
    weights = ((nh + 2 * nkv) * d + nh * d) * hidden
    assert flops == 2 * 3 * weights + 4 * nh * d * 12
    assert nbytes == 2 * (weights + 5 * 2 * nkv * d + 3 * 2 * nkv * d + 2 * 3 * hidden)


def test_gpu_bench_chart_points_from_its_results(tmp_path):
    """bench_gpu.py turns its result dict into chart points without a GPU: the layer cases,
    every peer that ran, and a case that failed left out."""
    pytest.importorskip("torch")
    import importlib.util
    import sys
    from pathlib import Path

    from graphir.tools.roofline import write_chart

    path = Path(__file__).resolve().parents[2] / "tools" / "bench_gpu.py"
    spec = importlib.util.spec_from_file_location("bench_gpu_under_test", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench   # its dataclasses look their module up
    try:
        spec.loader.exec_module(bench)
    finally:
        sys.modules.pop(spec.name, None)
    res = {"device": "test", "copy_GB/s": 4000.0, "gemm_TFLOP/s": 700.0,
           "rope_split_store": {"tokens": 16384, "ms": 0.05, "torch_ms": 0.4, "GB/s": 3900.0},
           "layer": {"decode B64 ctx4096": {"batch": 64, "cached": 4096, "new": 1,
                                            "graphir_ms": 0.3, "eager_ms": 0.6,
                                            "reduce-overhead": {"ms": 0.37}},
                     "prefill B4x2048": {"error": "boom"}}}
    pts = bench.roofline_points(res)
    names = [p.name for p in pts]
    assert names[:2] == ["rope_split_store", "torch split+rope+store"]
    assert "decode B64 ctx4096" in names and "decode B64 ctx4096 eager" in names
    assert "decode B64 ctx4096 reduce" in names and not any("prefill" in n for n in names)
    ours = [p for p in pts if p.ours]
    assert [p.name for p in ours] == ["rope_split_store", "decode B64 ctx4096"]
    # The B64 decode step reads ~1.07 GB of K/V plus ~0.08 GB of weights per call.
    step = next(p for p in pts if p.name == "decode B64 ctx4096")
    assert 1.1e9 < step.nbytes < 1.2e9 and step.intensity < 10
    line = write_chart(pts, 4000e9, 700e12, tmp_path / "r.png", "t")
    assert line.startswith("roofline chart")
