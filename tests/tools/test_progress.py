"""Progress bars (graphir.progress): who sees them, what they name, and that they never change
results: compile + load of the tiny Llama layer, the tuner over candidates, the CLI."""
from __future__ import annotations

import io

import numpy as np
import pytest

from graphir import progress
from graphir.tools.cli import main


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHIR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(progress.ENV, raising=False)


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_rules_off_wins_then_env_then_on_then_auto(monkeypatch):
    assert not progress.enabled()  # library use (and pytest): nothing
    assert progress.bar(3, desc="x") is progress.NULL
    items = [1, 2]
    assert progress.iterate(items, desc="x") is items
    with progress.scope("on"):
        assert progress.enabled()
        with progress.scope(None):  # None keeps the enclosing choice
            assert progress.enabled()
        with progress.scope(False):
            assert not progress.enabled()
    with progress.scope("auto"):
        assert not progress.enabled()  # captured stderr is not a terminal
        monkeypatch.setattr("sys.stderr", _Tty())
        assert progress.enabled()
    monkeypatch.setenv(progress.ENV, "0")
    with progress.scope("on"):
        assert not progress.enabled()
    monkeypatch.setenv(progress.ENV, "1")
    assert progress.enabled()
    with progress.scope("off"):  # -q beats GRAPHIR_PROGRESS=1
        assert not progress.enabled()
    with pytest.raises(ValueError, match="progress mode must be"):
        with progress.scope("loud"):
            pass


def _run(model, weights_seed=1):
    from graphir.runtime.kv_cache import PagedKVCacheManager

    g = model.graph
    kv = dict(zip(("num_layers", "page_size", "n_kv_heads", "head_dim"),
                  [int(d) for d in g.inputs[2].type.shape[2:]]))
    mgr = PagedKVCacheManager(**kv, total_num_pages=8, dtype=np.float32)
    rng = np.random.default_rng(weights_seed)
    mgr.blocks[...] = rng.standard_normal(mgr.blocks.shape)
    step = mgr.prepare_step([mgr.claim(), mgr.claim()], [3, 2])
    x = rng.standard_normal((5, int(g.inputs[0].type.shape[1]))).astype(np.float32)
    (y,) = model.execute(x, step.input_row_offsets, mgr.blocks, step.cache_lengths,
                         step.lookup_table, step.max_lengths)
    return y, mgr.blocks.copy()


def _compile_and_load(tmp_path, name):
    from graphir.examples.llama_attention import build_tiny
    from graphir.lowering.driver import compile_graph
    from graphir.runtime.session import InferenceSession
    from graphir.tools import numerics

    g = build_tiny()
    weights = numerics.random_weights(g, np.random.default_rng(0))
    art = compile_graph(g, "cpu", out=tmp_path / f"{name}.gart")
    return art, InferenceSession().load(art, weights=weights)


def test_compile_and_load_show_their_phases_only_when_on(tmp_path, capfd, monkeypatch):
    pytest.importorskip("mlir.ir")
    art_off, off = _compile_and_load(tmp_path, "off")
    assert capfd.readouterr().err == ""  # default under pytest: silent
    monkeypatch.setenv(progress.ENV, "1")
    art_on, on = _compile_and_load(tmp_path, "on")
    err = capfd.readouterr().err
    for text in (f"compile {art_on.target}", "running passes", "emitting MLIR",
                 "compiling to native code", "writing artifact", "4/4", "load weights",
                 "binding 4 weights", "packing and load-time steps", "%|"):
        assert text in err, text
    # Bars only observe: the same code and the same numbers.
    assert art_on.manifest["root_digest"] == art_off.manifest["root_digest"]
    for a, b in zip(_run(on), _run(off)):
        np.testing.assert_array_equal(a, b)


def test_load_progress_argument_opts_in_and_out(tmp_path, capfd, monkeypatch):
    pytest.importorskip("mlir.ir")
    from graphir.examples.llama_attention import build_tiny
    from graphir.runtime.session import InferenceSession
    from graphir.tools import numerics

    g = build_tiny()
    w = numerics.random_weights(g, np.random.default_rng(0))
    InferenceSession().load(g, weights=w, progress=True)
    err = capfd.readouterr().err
    assert "running passes" in err and "binding 4 weights" in err
    monkeypatch.setenv(progress.ENV, "1")
    InferenceSession().load(g, weights=w, progress=False)  # cache hit, then binding: silent
    assert capfd.readouterr().err == ""


def test_tuner_bar_counts_every_candidate(capfd):
    pytest.importorskip("triton")
    from graphir.lowering.triton_gpu import tuning
    from graphir.lowering.triton_gpu.kernels import matmul_configs as mc
    from tests.lowering.triton_gpu.test_tuning import FACTS, FakeMeasure, table

    def tune(mode):
        sel = tuning.Selector([("default table", table({}))])
        sel.choose("matmul", FACTS, size=1)
        with progress.scope(mode):
            return tuning.tune(sel.sites, FakeMeasure(fail={"gemv32x256_w4_s1"}), "Fake GPU")

    quiet = tune(None)
    assert capfd.readouterr().err == ""
    shown = tune("on")
    err = capfd.readouterr().err
    n = len(mc.candidates("m1", "bf16", 6144, 4096))
    assert "tune: 100%" in err and f"{n}/{n}" in err and "matmul N=6144,K=4096 m1" in err
    assert shown == quiet


def _builder(tmp_path):
    f = tmp_path / "ew.py"
    f.write_text("from graphir import DType, Graph, TensorType, DeviceRef, ops\n"
                 "def build():\n"
                 "    t = TensorType(DType.float32, ['n', 8], DeviceRef.CPU())\n"
                 "    with Graph('ew', input_types=[t]) as g:\n"
                 "        g.output(ops.exp(g.inputs[0]))\n"
                 "    return g\n")
    return f


def test_cli_compile_bar_replaces_stage_lines_and_q_silences_it(tmp_path, capsys, monkeypatch):
    pytest.importorskip("mlir.ir")
    f = _builder(tmp_path)
    monkeypatch.setenv(progress.ENV, "1")
    assert main(["compile", str(f), "-o", str(tmp_path / "a.gart")]) == 0
    out, err = capsys.readouterr()
    assert "compiling to native code" in err and "%|" in err
    assert "] running passes" not in err  # the bar names the stages; no StageTimer lines too
    assert "stages: running passes" in out
    assert main(["compile", str(f), "-o", str(tmp_path / "b.gart"), "-q"]) == 0
    assert capsys.readouterr() == ("", "")


def test_demo_shows_compile_load_and_check_bars_when_forced(capsys, monkeypatch):
    pytest.importorskip("mlir.ir")
    monkeypatch.setenv(progress.ENV, "1")
    assert main(["demo", "--decode-steps", "1", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert "demo: OK" in out
    assert err == ""  # -q: no stage lines, no bars
    monkeypatch.setenv(progress.ENV, "1")
    assert main(["demo", "--decode-steps", "1", "--no-cache"]) == 0
    out, err = capsys.readouterr()
    assert "demo: OK" in out
    for text in ("compiling to native code", "load weights", "run + check", "2/2"):
        assert text in err, text


def test_candidate_compiles_are_counted(capfd, monkeypatch):
    pytest.importorskip("triton")
    from graphir.lowering.triton_gpu import tuning_gpu

    monkeypatch.setattr(tuning_gpu, "_job", lambda spec: spec)
    monkeypatch.setattr(tuning_gpu, "_compile_job",
                        lambda job, arch: (_ for _ in ()).throw(RuntimeError("bad")) if job == "b"
                        else job.upper())
    want = {"k1": "a", "k2": "b", "k3": "c"}
    quiet = tuning_gpu.compile_specs(want, 90, workers=1)
    assert capfd.readouterr().err == ""
    with progress.scope("on"):
        shown = tuning_gpu.compile_specs(want, 90, workers=1)
    err = capfd.readouterr().err
    assert "compile candidates" in err and "3/3" in err
    assert {k: str(v) for k, v in shown.items()} == {k: str(v) for k, v in quiet.items()} \
        == {"k1": "A", "k2": "bad", "k3": "C"}
