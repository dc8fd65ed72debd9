"""The content-addressed compile cache: hits, damaged entries, concurrent writers, its location."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mlir.ir")

from graphir import ops  # noqa: E402
from graphir import DeviceRef, DType, Graph, TensorType  # noqa: E402
from graphir.lowering import cache  # noqa: E402
from graphir.lowering.artifact import load_artifact  # noqa: E402
from graphir.lowering.driver import compile_graph  # noqa: E402
from graphir.lowering.mlir_cpu import backend  # noqa: E402
from graphir.runtime.session import InferenceSession  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

GRAPH_SRC = '''
from graphir import ops
from graphir import DeviceRef, DType, Graph, TensorType


def build(scale=3.0):
    t = TensorType(DType.float32, ["n", 5], DeviceRef.CPU())
    with Graph("cached", input_types=[t]) as g:
        x = g.inputs[0]
        g.output(ops.sin(x) * scale + ops.abs(x))
    return g
'''


def _graph(scale: float = 3.0) -> Graph:
    t = TensorType(DType.float32, ["n", 5], DeviceRef.CPU())
    with Graph("cached", input_types=[t]) as g:
        x = g.inputs[0]
        g.output(ops.sin(x) * scale + ops.abs(x))
    return g


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("GRAPHIR_CACHE_DIR", str(d))
    return d


@pytest.fixture
def builds(monkeypatch):
    """Counts the backend compiles (a cache hit must not reach the backend)."""
    calls = []
    real = backend.build

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)
    monkeypatch.setattr(backend, "build", counting)
    return calls


def _entries(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.name.endswith(".gart"))


def _check_runs(art, scale=3.0):
    x = np.random.default_rng(5).standard_normal((4, 5)).astype(np.float32)
    (y,) = InferenceSession().load(art).execute(x)
    np.testing.assert_allclose(y, np.sin(x) * scale + np.abs(x), rtol=1e-5, atol=1e-5)


def test_cache_dir_from_env(cache_dir):
    assert cache.cache_dir() == cache_dir
    art = compile_graph(_graph(), "cpu")
    assert art.path.parent == cache_dir and art.path.name.endswith(".gart")
    assert _entries(cache_dir) == [art.path]


def test_default_cache_dir_is_under_home(tmp_path, monkeypatch):
    monkeypatch.delenv("GRAPHIR_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache.cache_dir() == tmp_path / ".cache" / "graphir"


def test_hit_returns_the_same_artifact_without_recompiling(cache_dir, builds):
    # A hit is judged by the backend not being called, never by timing: a timed assertion
    # failed CI on a loaded 2-core runner (a 3 ms hit took 210 ms there).
    first = compile_graph(_graph(), "cpu")
    second = compile_graph(_graph(), "cpu")
    assert len(builds) == 1, "the cache hit went to the backend"
    assert second.path == first.path and second.manifest == first.manifest
    _check_runs(second)
    other = compile_graph(_graph(scale=2.0), "cpu")  # a different graph: a different entry
    assert other.path != first.path and len(builds) == 2
    assert len(_entries(cache_dir)) == 2
    compile_graph(_graph(), "cpu", use_cache=False)  # asked to recompile: it does
    assert len(builds) == 3


def test_a_recompile_replaces_the_entry_it_skipped(cache_dir, monkeypatch):
    """use_cache=False returns, and leaves in the cache, what it built now, not the entry of
    an earlier build of the same key (a lowering changed since, which the key cannot see)."""
    real = backend.build
    n = []

    def marked(*a, **k):
        payload, extra = real(*a, **k)
        n.append(1)
        return {**payload, "build.txt": f"build {len(n)}".encode()}, extra
    monkeypatch.setattr(backend, "build", marked)
    first = compile_graph(_graph(), "cpu")
    again = compile_graph(_graph(), "cpu", use_cache=False)
    assert again.path == first.path and again.file("build.txt").read_text() == "build 2"
    assert load_artifact(again.path).file("build.txt").read_text() == "build 2"
    assert compile_graph(_graph(), "cpu").file("build.txt").read_text() == "build 2"
    _check_runs(again)


def test_damaged_entry_is_rebuilt(cache_dir, builds):
    first = compile_graph(_graph(), "cpu")
    so = first.path / "cpu" / "kernels.so"
    data = bytearray(so.read_bytes())
    data[len(data) // 2] ^= 0x10
    so.write_bytes(bytes(data))
    again = compile_graph(_graph(), "cpu")
    assert len(builds) == 2, "a damaged entry must be recompiled, not used"
    assert again.path == first.path
    load_artifact(again.path)  # valid again
    _check_runs(again)
    assert len(_entries(cache_dir)) == 1


def test_entry_missing_a_file_is_rebuilt(cache_dir, builds):
    first = compile_graph(_graph(), "cpu")
    (first.path / "graph.gir").unlink()
    again = compile_graph(_graph(), "cpu")
    assert len(builds) == 2
    load_artifact(again.path)


def test_two_processes_compile_the_same_graph_at_once(cache_dir, tmp_path):
    (tmp_path / "graph_def.py").write_text(GRAPH_SRC)
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(f'''
        import sys, time
        from pathlib import Path
        sys.path[:0] = [{str(ROOT)!r}, {str(tmp_path)!r}]
        from graph_def import build
        from graphir.lowering.driver import compile_graph
        g = build()
        me, barrier = sys.argv[1], Path({str(barrier)!r})
        (barrier / me).touch()
        deadline = time.time() + 60
        while len(list(barrier.iterdir())) < 2 and time.time() < deadline:
            time.sleep(0.01)  # start compiling together
        art = compile_graph(g, "cpu")
        print(art.path)
    '''))
    env = dict(os.environ, GRAPHIR_CACHE_DIR=str(cache_dir))
    procs = [subprocess.Popen([sys.executable, str(script), str(i)], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    for out, err, rc in results:
        assert rc == 0, err
    paths = {out.strip() for out, _, _ in results}
    assert len(paths) == 1, paths
    # Beside the one entry: the CPU backend's parallel runtime, built once for both
    # (lowering/mlir_cpu/toolchain.py), no temp file left in it either.
    assert sorted(p.name for p in cache_dir.iterdir()) == sorted(
        [Path(paths.pop()).name, "cpu_rt"]), "exactly one entry and no temp dirs left behind"
    assert all(".tmp" not in p.name for p in (cache_dir / "cpu_rt").iterdir())
    art = load_artifact(_entries(cache_dir)[0])
    _check_runs(art)
