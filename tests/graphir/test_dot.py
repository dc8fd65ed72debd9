"""Pictures of graphs and plans: the DOT text's structure for the example layers, the CLI's
--format options, and an SVG rendered when Graphviz is present (skipped otherwise)."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from graphir.dot import graph_to_dot
from graphir.examples.llama_attention import build_tiny
from graphir.passes import run_passes
from graphir.tools.cli import main

ROOT = Path(__file__).resolve().parents[2]


def _nodes(dot: str) -> dict[str, str]:
    return dict(re.findall(r"^\s+(\w+) \[label=(\".*?\"), ", dot, re.M))


def test_dot_of_the_fused_layer():
    g = build_tiny()
    dot = graph_to_dot(g, "tiny")
    nodes = _nodes(dot)
    ops = [n for n in g.nodes if n.op != "chain"]
    assert len(nodes) == len(ops) + len(g.inputs) + len(g.outputs)
    fused = [line for line in dot.splitlines() if "bbf7d0" in line]
    assert len(fused) == 2 and any("rope_split_store" in f for f in fused) \
        and any("fused_qkv_matmul" in f for f in fused)
    assert "cylinder" in next(line for line in dot.splitlines() if "%kv_blocks" in line)
    assert dot.count("box3d") == 4  # q, k, v, o weights
    assert 'label="chain"' in dot  # the store's chain edge to the attention
    assert "subgraph cluster_0" in dot and "fused elementwise kernel" in dot
    assert "attention_with_rope.py" in dot  # source lines


def test_the_fusion_shows_in_the_pictures():
    g = build_tiny(fuse_rope_and_store=False)
    before = graph_to_dot(g)
    assert "rope_split_store" not in before and before.count("kv_cache_store") == 2
    run_passes(g)
    after = graph_to_dot(g)
    assert "rope_split_store" in after and "kv_cache_store" not in after


def test_cli_writes_one_picture_per_changing_pass(tmp_path, capsys):
    out = tmp_path / "p.dot"
    rc = main(["dump", f"{ROOT}/examples/llama_attention.py:build_tiny", "--stage", "passes",
               "--unfused", "--format", "dot", "-o", str(out)])
    assert rc == 0
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files[0] == "p-00-built.dot" and any("fuse-rope-split-store" in f for f in files)
    assert "rope_split_store" in (tmp_path / next(f for f in files if "fuse-rope" in f)).read_text()


def test_missing_graphviz_is_one_clear_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    rc = main(["dump", f"{ROOT}/examples/mlp.py", "--format", "svg", "-o", str(tmp_path / "a.svg")])
    err = capsys.readouterr().err
    assert rc == 1 and "apt-get install graphviz" in err and err.count("\n") == 1


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot program is not installed")
def test_svg_of_the_layer_and_of_its_plan(tmp_path, capsys):
    svg = tmp_path / "g.svg"
    assert main(["dump", f"{ROOT}/examples/llama_attention.py:build_tiny", "--format", "svg",
                 "-o", str(svg)]) == 0
    text = svg.read_text()
    assert text.lstrip().startswith("<?xml") and "rope_split_store" in text
    pytest.importorskip("mlir.ir")
    art = tmp_path / "t.gart"
    assert main(["compile", f"{ROOT}/examples/llama_attention.py:build_tiny", "-o", str(art),
                 "-q"]) == 0
    plan = tmp_path / "plan.svg"
    assert main(["inspect", str(art), "--format", "svg", "-o", str(plan)]) == 0
    assert "k8_rope_split_store" in plan.read_text() and "slot 0" in plan.read_text()
