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
