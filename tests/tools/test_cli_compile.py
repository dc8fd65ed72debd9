"""`graphir compile / run / inspect / dump --stage mlir|llvm / demo` through tools.cli.main."""
import json
import shutil

import numpy as np
import pytest

pytest.importorskip("mlir.ir")

from graphir.dtype import DType, round_to  # noqa: E402
from graphir.tools import demo as demo_mod  # noqa: E402
from graphir.tools.cli import main  # noqa: E402

SRC = '''
from graphir import ops
from graphir import DeviceRef, DType, Graph, TensorType, Weight


def build():
    cpu = DeviceRef.CPU()
    w = Weight("scale", DType.float32, [8], cpu)
    with Graph("ew", input_types=[TensorType(DType.float32, ["n", 8], cpu),
                                  TensorType(DType.bfloat16, ["n", 8], cpu)],
               input_names=["x", "y"]) as g:
        x, y = g.inputs
        h = ops.exp(x) * w + y.cast(DType.float32)
        g.output(h, ops.sigmoid(h).cast(DType.bfloat16))
    return g
'''


def _numpy(x, y, w):
    h = np.exp(x.astype(np.float64)) * w + round_to(y, DType.bfloat16)
    return h, 1 / (1 + np.exp(-h))


def cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The builder file and its artifact, compiled once through the CLI."""
    d = tmp_path_factory.mktemp("cli")
    (d / "ew.py").write_text(SRC)
    rc = main(["compile", str(d / "ew.py"), "--target", "cpu", "-o", str(d / "ew.gart")])
    assert rc == 0
    return d


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHIR_CACHE_DIR", str(tmp_path / "cache"))


def test_compile_prints_progress_and_stage_times(capsys, tmp_path, work):
    rc, out, err = cli(capsys, "compile", f"{work / 'ew.py'}:build", "-o", tmp_path / "a.gart")
    assert rc == 0
    from graphir.lowering.mlir_cpu.cpu_target import host_target

    assert f"wrote {tmp_path / 'a.gart'} ({host_target()}, 6 kernels)" in out
    stages = [ln for ln in out.splitlines() if ln.startswith("stages: ")]
    assert len(stages) == 1
    for name in ("running passes", "emitting MLIR", "compiling to native code", "writing artifact", "total"):
        assert f"{name} " in stages[0]
    # Progress on stderr (one line per stage when stderr is not a terminal).
    assert "] running passes" in err and "] compiling to native code" in err
    assert (tmp_path / "a.gart" / "cpu" / "kernels.so").is_file()
    rc, out, err = cli(capsys, "compile", work / "ew.py", "-o", tmp_path / "b.gart", "-q")
    assert rc == 0 and out == "" and err == ""


def test_inspect(capsys, work):
    rc, out, _ = cli(capsys, "inspect", work / "ew.gart")
    assert rc == 0
    m = json.loads((work / "ew.gart" / "manifest.json").read_text())
    for text in (f"format    version {m['format_version']}, target cpu",
                 f"graph     @ew  sha256 {m['graph_hash']}",
                 "  %x: tensor<[n, 8], f32, cpu:0>", "  %y: tensor<[n, 8], bf16, cpu:0>",
                 "  1: tensor<[n, 8], bf16, cpu:0>", "  scale: tensor<[8], f32, cpu:0>",
                 "kernels   6", "  k5_sigmoid", "memory plan: 6 steps (6 kernel calls",
                 "  slot 0: [n, 8] f32", "files     2, every sha256 verified"):
        assert text in out, text
    assert out.count("  OK") == 2
    rc, out, _ = cli(capsys, "inspect", work / "ew.gart", "--json")
    info = json.loads(out)
    assert info["target"] == m["target"] and m["target"].startswith("cpu:")
    assert info["graph_hash"] == m["graph_hash"]
    assert {f: v["sha256"] for f, v in info["files"].items()} == m["files"]
    assert info["kernels"] == sorted(m["kernels"]) and info["memory_plan"]["kernel_calls"] == 6


def test_inspect_refuses_a_tampered_artifact(capsys, work, tmp_path):
    bad = tmp_path / "bad.gart"
    shutil.copytree(work / "ew.gart", bad)
    gir = bad / "graph.gir"
    gir.write_text(gir.read_text() + " ")
    for cmd in ("inspect", "run"):
        rc, out, err = cli(capsys, cmd, bad)
        assert rc == 1 and out == ""
        assert err.startswith(f"graphir {cmd}: error: ") and "graph.gir does not match its sha256" in err
    rc, _, err = cli(capsys, "inspect", tmp_path)
    assert rc == 1 and "not a graphir artifact" in err


def test_run_random_with_check(capsys, work):
    rc, out, err = cli(capsys, "run", work / "ew.gart", "--dim", "n=5", "--check", "--seed", "3")
    assert rc == 0, err
    assert "inputs: random (seed 3); dims n=5" in out and "weights: random (1 arrays)" in out
    assert "output 0: [5, 8] f32  sum=" in out and "output 1: [5, 8] bf16  sum=" in out
    assert out.count("vs interpreter  OK") == 2 and out.rstrip().endswith("OK")
    rc, out2, _ = cli(capsys, "run", work / "ew.gart")  # default dims
    assert rc == 0 and "dims n=4 (default)" in out2 and "output 0: [4, 8] f32" in out2


def test_run_given_inputs_and_weights(capsys, work, tmp_path):
    rng = np.random.default_rng(11)
    x = rng.standard_normal((3, 8)).astype(np.float32)
    y = rng.standard_normal((3, 8)).astype(np.float32)
    w = rng.standard_normal(8).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x, y=y)
    np.savez(tmp_path / "pos.npz", x, y)  # arr_0, arr_1
    np.savez(tmp_path / "w.npz", scale=w)
    from safetensors.numpy import save_file

    save_file({"scale": w}, str(tmp_path / "w.safetensors"))
    want_h, want_s = _numpy(x, y, w)
    for inputs in ("in.npz", "pos.npz"):
        for weights in ("w.npz", "w.safetensors"):
            out_npz = tmp_path / f"out-{inputs}-{weights}.npz"
            rc, out, err = cli(capsys, "run", work / "ew.gart", "--inputs", tmp_path / inputs,
                               "--weights", tmp_path / weights, "--save", out_npz, "--check")
            assert rc == 0, err
            want_sum = f"sum={want_h.sum():.6e}"[:10]  # the checksum printed agrees with numpy
            assert want_sum in out
            with np.load(out_npz) as z:
                np.testing.assert_allclose(z["out0"], want_h, rtol=1e-5, atol=1e-5)
                np.testing.assert_allclose(z["out1"], want_s, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("argv, msg", [
    (["--dim", "n"], "--dim expects NAME=INT, got 'n'"),
    (["--dim", "m=3"], "--dim ['m']: not a symbolic dim of the inputs (they have ['n'])"),
    (["--inputs", "MISSING"], "inputs ['y'] are missing"),
    (["--weights", "NOPE.npz"], "no such weights file"),
    (["--weights", "W_WRONG"], "weight 'scale': expected shape [8], got [3]"),
    (["--weights", "CUT.safetensors"], "cut.safetensors: cannot read the .safetensors file "
                                       "(truncated or corrupt?)"),
])
def test_run_errors(capsys, work, tmp_path, argv, msg):
    np.savez(tmp_path / "missing.npz", x=np.ones((2, 8), np.float32))
    np.savez(tmp_path / "wrong.npz", scale=np.ones(3, np.float32))
    from safetensors.numpy import save_file

    save_file({"scale": np.ones(8, np.float32)}, str(tmp_path / "cut.safetensors"))
    data = (tmp_path / "cut.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:len(data) - 5])   # the file cut short
    subst = {"MISSING": tmp_path / "missing.npz", "NOPE.npz": tmp_path / "nope.npz",
             "W_WRONG": tmp_path / "wrong.npz", "CUT.safetensors": tmp_path / "cut.safetensors"}
    rc, out, err = cli(capsys, "run", work / "ew.gart", *[subst.get(a, a) for a in argv])
    assert rc == 1 and err.startswith("graphir run: error: ") and msg in err, err


def test_run_check_reports_a_mismatch(capsys, work, monkeypatch):
    from graphir.runtime import cpu_executor

    real = cpu_executor.CpuModel.execute
    monkeypatch.setattr(cpu_executor.CpuModel, "execute",
                        lambda self, *a: [o * 1.01 for o in real(self, *a)])
    rc, out, err = cli(capsys, "run", work / "ew.gart", "--check")
    assert rc == 1 and "MISMATCH" in out and "differ from the interpreter" in err


@pytest.mark.parametrize("stage, words", [("mlir", ["func.func @k0_exp", "linalg."]),
                                          ("bufferized", ["memref<"]),
                                          ("llvm", ["llvm.func @k0_exp", "llvm.emit_c_interface"]),
                                          ("llvmir", ["define ", "@_mlir_ciface_k0_exp"])])
def test_dump_cpu_stages(capsys, work, stage, words):
    rc, out, err = cli(capsys, "dump", work / "ew.py", "--stage", stage)
    assert rc == 0, err
    for w in words:
        assert w in out, (stage, w)


def test_dump_help_lists_the_stages(capsys):
    with pytest.raises(SystemExit):
        main(["dump", "--help"])
    out = capsys.readouterr().out
    for s in ("mlir", "scheduled", "bufferized", "llvm", "llvmir"):
        assert s in out


def test_compile_without_a_lowering_is_a_clear_error(capsys, work, tmp_path, monkeypatch):
    from graphir.lowering.mlir_cpu import backend

    monkeypatch.setattr(backend, "lowering_for", lambda op, b: None)
    rc, out, err = cli(capsys, "compile", work / "ew.py", "-o", tmp_path / "x.gart", "-q")
    assert rc == 1 and "graphir compile: error: cannot compile" in err
    assert "has no CPU lowering" in err and "Traceback" not in err
    rc, out, err = cli(capsys, "dump", work / "ew.py", "--stage", "mlir")
    assert rc == 1 and "graphir dump: error: cannot lower graph @ew for the CPU" in err


def test_demo(capsys):
    rc, out, err = cli(capsys, "demo", "--quiet", "--prefill", "2,9,1", "--decode-steps", "2")
    assert rc == 0, out + err
    assert "graph @" not in out
    rows = [ln.split()[0] for ln in out.splitlines() if ln[:1].isalpha()]
    assert "demo: OK" in out and "MISMATCH" not in out
    assert "3 sequences, 2+9+1 tokens" in out and "kv cache: 4, 11, 3 tokens cached in" in out
    assert "checked 6 results (3 steps: outputs and the whole KV cache)" in out
    if demo_mod.cpu_gaps(demo_mod._example("llama_attention").build_tiny()):
        assert "no CPU lowering yet for" in out and "interpreter (unfused layer)" in out
        want = ["build", "passes", "prefill", "decode"]
    else:
        assert "of the compiled CPU code against the interpreter" in out
        want = ["build", "passes", "compile", "load", "prefill", "decode"]
    assert [r for r in rows if r in want + ["compile", "load"]] == want


def test_demo_prints_the_ir(capsys):
    rc, out, _ = cli(capsys, "demo", "--decode-steps", "0")
    assert rc == 0 and "== @llama_tiny_attention after the default passes ==" in out
    assert "gir.rope_split_store(" in out and "dense<[128, 16] : [...]>" in out


def test_demo_reports_a_mismatch(capsys, monkeypatch):
    real = demo_mod._compile_and_load

    def off_by_a_little(*args):
        fn = real(*args)
        return lambda *a: [o + 1e-2 for o in fn(*a)]
    monkeypatch.setattr(demo_mod, "_compile_and_load", off_by_a_little)
    rc, out, _ = cli(capsys, "demo", "--quiet", "--decode-steps", "1")
    assert rc == 1 and "MISMATCH in prefill 1 output" in out and "demo: MISMATCH" in out


def test_demo_never_says_ok_without_compiled_code(capsys, monkeypatch):
    monkeypatch.setattr(demo_mod, "cpu_gaps", lambda g: ["gir.rope"])
    rc, out, err = cli(capsys, "demo", "--quiet")
    assert rc == 1 and "demo: OK" not in out and "no lowering for gir.rope" in err


@pytest.mark.parametrize("argv, msg", [(["--prefill", "3,x"], "--prefill expects comma-separated"),
                                       (["--prefill", "3,0"], "token counts must be positive"),
                                       (["--decode-steps", "-1"], "--decode-steps must be >= 0")])
def test_demo_bad_arguments(capsys, argv, msg):
    rc, _, err = cli(capsys, "demo", "--quiet", *argv)
    assert rc == 1 and msg in err


def test_demo_compiled_path_pieces(work, capsys):
    """The compiled path of the demo (compile through the cache, load from disk, execute) on a
    graph that compiles today; the attention layer takes it once its ops are lowered."""
    import argparse

    from graphir.tools.loader import load_graph

    g = load_graph(str(work / "ew.py"))
    rng = np.random.default_rng(2)
    w = {"scale": rng.standard_normal(8).astype(np.float32)}
    args = argparse.Namespace(quiet=True, no_cache=False, device="cpu")
    report = demo_mod.Report()
    execute = demo_mod._compile_and_load(g, w, args, report)
    assert [r[0] for r in report.rows] == ["compile", "load"]
    assert "6 kernels" in report.rows[1][2]
    x, y = rng.standard_normal((3, 8)).astype(np.float32), rng.standard_normal((3, 8)).astype(np.float32)
    h, s = execute(x, y)
    want_h, want_s = _numpy(x, y, w["scale"])
    np.testing.assert_allclose(h, want_h, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s, want_s, rtol=1e-2, atol=1e-2)
    report = demo_mod.Report()
    demo_mod._compile_and_load(g, w, args, report)  # the second time: a cache hit
    assert "(cache hit)" in report.rows[0][2]
