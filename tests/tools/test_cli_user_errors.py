"""The CLI's surface for users: every mistake is one line on stderr with a non-zero exit; `cache`,
`python -m graphir`, `dump --unfused`, elided constants, and `run --check` on a paged-attention
artifact with the random (valid) metadata it builds itself."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from graphir.tools.cli import main

ROOT = Path(__file__).resolve().parents[2]
LLAMA = str(ROOT / "examples" / "llama_attention.py")


def cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(capsys, *argv, frag: str):
    rc, _, err = cli(capsys, *argv)
    assert rc != 0, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"graphir {argv[0]}: error: "), err
    assert frag in lines[0], lines[0]


def test_user_errors_are_one_line(capsys, tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def build(:\n")
    one_line_error(capsys, "dump", bad, frag="bad.py:1: syntax error")
    one_line_error(capsys, "dump", tmp_path / "missing.py", frag="hint: check the path")
    one_line_error(capsys, "dump", f"{LLAMA}:nope", frag="has no function 'nope'")
    gir = tmp_path / "g.gir"
    gir.write_text("graph @g() {\n  gir.output\n}\n")
    one_line_error(capsys, "dump", gir, "--unfused", frag="apply to FILE.py builders")
    one_line_error(capsys, "run", tmp_path, frag="not a graphir artifact")
    one_line_error(capsys, "inspect", tmp_path / "nope.gart", frag="not a graphir artifact")
    one_line_error(capsys, "compile", LLAMA, "-o", tmp_path / "a.gart", "--target", "tpu",
                   frag="tpu")
    one_line_error(capsys, "compile", LLAMA, "-o", tmp_path / "a.gart", "--tune",
                   frag="--tune applies to cuda targets")
    one_line_error(capsys, "keygen", bad, frag="exists")
    one_line_error(capsys, "demo", "--prefill", "0,1", frag="token counts must be positive")


def test_internal_errors_name_the_type_and_ask_for_the_traceback(capsys, monkeypatch):
    import graphir.tools.cli as c

    def boom(args):
        raise KeyError("x")
    monkeypatch.setattr(c, "_cmd_opt", boom)
    rc, _, err = cli(capsys, "opt", "whatever.gir")
    assert rc == 1 and err.count("\n") == 1 and "KeyError" in err and "rerun with -v" in err
    rc, _, err = cli(capsys, "-v", "opt", "whatever.gir")
    assert rc == 1 and "Traceback" in err


def test_cache_info_and_clear(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHIR_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "cache" / "a.gart").mkdir(parents=True)
    (tmp_path / "cache" / "a.gart" / "x").write_bytes(b"1" * 2048)
    rc, out, _ = cli(capsys, "cache", "info")
    assert rc == 0 and "1 artifacts" in out and str(tmp_path / "cache") in out
    rc, out, _ = cli(capsys, "cache", "clear")
    assert rc == 0 and "removed 1" in out and not list((tmp_path / "cache").iterdir())


def test_python_dash_m_graphir():
    p = subprocess.run([sys.executable, "-m", "graphir", "--version"], capture_output=True,
                       text=True, cwd="/")
    assert p.returncode == 0 and p.stdout.startswith("graphir ")


def test_dump_unfused_shows_the_fusion_and_elides_constants(capsys):
    rc, out, _ = cli(capsys, "dump", LLAMA, "--stage", "passes", "--unfused")
    assert rc == 0
    built, _, after = out.partition("// -----// IR after fuse-rope-split-store //----- //")
    assert "gir.kv_cache_store" in built and "gir.rope_split_store" not in built
    assert "gir.rope_split_store" in after and "gir.kv_cache_store" not in after
    assert max(len(line) for line in out.splitlines()) < 2000
    rc, out, _ = cli(capsys, "dump", LLAMA)
    assert rc == 0 and "dense<" in out


def test_elided_constants_and_the_full_flag(capsys, tmp_path):
    src = tmp_path / "c.py"
    src.write_text("import numpy as np\nfrom graphir import DType, Graph, TensorType, ops\n"
                   "def build():\n    with Graph('c', input_types=[TensorType(DType.float32, [200])])"
                   " as g:\n        g.output(g.inputs[0] + ops.constant(np.arange(200.0), "
                   "DType.float32))\n    return g\n")
    rc, out, _ = cli(capsys, "dump", src)
    assert rc == 0 and "dense<[200] : ...200 values...>" in out
    rc, out, _ = cli(capsys, "dump", src, "--full-constants")
    assert rc == 0 and "199.0" in out


def test_run_check_on_a_paged_attention_artifact(capsys, tmp_path):
    pytest.importorskip("mlir.ir")
    art = tmp_path / "tiny.gart"
    assert cli(capsys, "compile", f"{LLAMA}:build_tiny", "-o", art, "-q")[0] == 0
    rc, out, err = cli(capsys, "run", art, "--check", "--dim", "batch=3", "--seed", "4")
    assert rc == 0, err
    assert "check output 0" in out and "OK" in out and "nan" not in out.lower()
    # Random inputs too big to allocate are the user's dims (it was a MemoryError reported as a
    # bug to file).
    one_line_error(capsys, "run", art, "--dim", "batch=100000000000",
                   frag="more memory than this machine can allocate; pass smaller --dim")
