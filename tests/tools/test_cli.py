"""The `graphir` command line, through tools.cli.main(argv) (and once as the installed script)."""
import os
import shutil
import subprocess
import sys

import pytest

import graphir
from graphir import parse
from graphir.tools.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MLP = os.path.join(ROOT, "examples", "mlp.py")
ATTN = os.path.join(ROOT, "examples", "softmax_attention.py")


def cli(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"graphir {graphir.__version__}"


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for word in ("usage: graphir", "dump", "opt", "demo", "--version"):
        assert word in out
    rc, out, _ = cli(capsys)  # no command: the help, exit 0
    assert rc == 0 and "usage: graphir" in out


@pytest.mark.parametrize("sub, words", [("dump", ["FILE.py[:FUNC]", "--stage", "graph,passes", "mlir", "triton"]),
                                        ("opt", ["--print-after-all", "-p PASSES"])])
def test_subcommand_help(capsys, sub, words):
    with pytest.raises(SystemExit):
        main([sub, "--help"])
    out = capsys.readouterr().out
    for w in words:
        assert w in out


def test_dump_graph(capsys):
    rc, out, err = cli(capsys, "dump", MLP)
    assert rc == 0 and err == ""
    assert out.startswith("graph @mlp(%arg0: tensor<[tokens, 64], f32, cpu:0>) {\n")
    assert 'gir.weight {device = cpu:0, dtype = f32, name = "gate.weight", shape = [128, 64]}' in out
    assert "gir.rms_norm(%arg0, %0) {epsilon = 1e-06}" in out
    assert str(parse(out)) == out


def test_dump_func_with_colon(capsys, tmp_path):
    src = tmp_path / "two.py"
    src.write_text("from graphir import ops\nfrom graphir import DType, Graph, TensorType\n\n"
                   "def other():\n    with Graph('other', input_types=[TensorType(DType.float32, [3])]) as g:\n"
                   "        g.output(ops.exp(g.inputs[0]))\n    return g\n")
    rc, out, _ = cli(capsys, "dump", f"{src}:other")
    assert rc == 0 and out.startswith("graph @other(") and "gir.exp(%arg0)" in out


def test_dump_stage_passes(capsys):
    rc, out, _ = cli(capsys, "dump", ATTN, "--stage", "passes", "-p", "canonicalize,cse,dce")
    assert rc == 0
    headers = [ln for ln in out.splitlines() if ln.startswith("//")]
    assert headers == ["// -----// IR as built //----- //",
                       "// -----// IR after canonicalize (no change) //----- //",
                       "// -----// IR after cse (no change) //----- //",
                       "// -----// IR after dce (no change) //----- //"]
    assert out.count("graph @causal_attention(") == 4
    rc, out, _ = cli(capsys, "dump", ATTN, "--stage", "passes")  # default pipeline
    assert rc == 0 and "IR after canonicalize" in out and "IR after dce" in out


GIR = """graph @g(%x: tensor<[n, 4], f32, cpu:0>) {
  %0 = gir.exp(%x) : tensor<[n, 4], f32, cpu:0>
  %1 = gir.exp(%x) : tensor<[n, 4], f32, cpu:0>
  %2 = gir.constant {device = cpu:0, dtype = f32, value = dense<[] : [1.0]>} : tensor<[], f32, cpu:0>
  %3 = gir.mul(%1, %2) : tensor<[n, 4], f32, cpu:0>
  %4 = gir.add(%0, %3) : tensor<[n, 4], f32, cpu:0>
  %5 = gir.neg(%x) : tensor<[n, 4], f32, cpu:0>
  gir.output %4
}
"""

OPTIMIZED = """graph @g(%x: tensor<[n, 4], f32, cpu:0>) {
  %0 = gir.exp(%x) : tensor<[n, 4], f32, cpu:0>
  %1 = gir.add(%0, %0) : tensor<[n, 4], f32, cpu:0>
  gir.output %1
}
"""


def test_opt_gir_file(capsys, tmp_path):
    f = tmp_path / "g.gir"
    f.write_text(GIR)
    rc, out, _ = cli(capsys, "opt", str(f), "-p", "canonicalize,cse,dce")
    assert rc == 0 and out == OPTIMIZED
    rc, out, _ = cli(capsys, "opt", str(f), "-p", "canonicalize,cse,dce", "--print-after-all")
    assert rc == 0
    assert [ln for ln in out.splitlines() if ln.startswith("//")] == [
        "// -----// IR after canonicalize //----- //", "// -----// IR after cse //----- //",
        "// -----// IR after dce //----- //"]
    assert out.endswith(OPTIMIZED)
    assert out.count("graph @g(") == 3


def test_demo(capsys):
    # The main job: the Llama-style layer compiled for the CPU, checked step by step.
    pytest.importorskip("mlir.ir")
    rc, out, _ = cli(capsys, "demo", "--quiet")
    assert rc == 0, out
    assert "demo: OK" in out and "MISMATCH" not in out
    assert "graph @" not in out


@pytest.mark.parametrize("argv, msg", [
    (["dump", MLP + ":nope"], "has no function 'nope' (functions: ['build'])"),
    (["dump", "missing_file.py"], "no such file 'missing_file.py'"),
    (["dump", "notes.txt"], "is neither a .py graph builder nor a .gir file"),
    (["opt", "missing.gir"], "No such file"),
    (["opt", "BAD", "-p", "dce"], None),
    (["opt", "GOOD", "-p", "canonicalize,frobnicate"], "unknown pass(es) ['frobnicate']"),
])
def test_errors_exit_1_with_a_message(capsys, tmp_path, argv, msg):
    bad, good = tmp_path / "bad.gir", tmp_path / "good.gir"
    bad.write_text("graph @g(%x: tensor<[4], f32, cpu:0>) {\n  %0 = gir.nope(%x)\n}\n")
    good.write_text(GIR)
    argv = [str(bad) if a == "BAD" else str(good) if a == "GOOD" else a for a in argv]
    rc, out, err = cli(capsys, *argv)
    assert rc == 1 and out == ""
    assert err.startswith(f"graphir {argv[0]}: error: ")
    assert (msg or "line 2, column 8: unknown op 'gir.nope'") in err
    assert "Traceback" not in err


def test_bad_usage_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["dump", MLP, "--stage", "bytecode"])
    assert e.value.code == 2
    assert "invalid choice: 'bytecode'" in capsys.readouterr().err


def test_installed_console_script():
    exe = shutil.which("graphir", path=os.path.dirname(sys.executable)) or shutil.which("graphir")
    if exe is None:
        pytest.skip("the graphir console script is not installed")
    r = subprocess.run([exe, "dump", MLP], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("graph @mlp(")
    r = subprocess.run([exe, "dump", MLP + ":nope"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 1 and "has no function 'nope'" in r.stderr
