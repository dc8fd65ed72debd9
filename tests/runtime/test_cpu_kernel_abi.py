"""A CPU library declares what its kernels were compiled to expect (their pre-packed operands),
and loading holds the manifest's steps to it: a manifest rewritten with a consistent digest
but a lost or changed "prepack" would otherwise pass a kernel the wrong bytes in silence."""
import hashlib
import json
import shutil
import subprocess

import numpy as np
import pytest

pytest.importorskip("mlir.ir")

from graphir import DeviceRef, DType, Graph, TensorType, Weight, ops  # noqa: E402
from graphir.lowering.artifact import ArtifactError  # noqa: E402
from graphir.lowering.driver import compile_graph  # noqa: E402
from graphir.lowering.mlir_cpu.toolchain import _abi_source, _cc  # noqa: E402
from graphir.runtime.cpu import CpuLibrary  # noqa: E402
from graphir.runtime.interpreter import run  # noqa: E402
from graphir.runtime.session import InferenceSession  # noqa: E402
from tests.lowering.test_artifact import SO, _manifest, _write_manifest  # noqa: E402


def _graph() -> Graph:
    cpu = DeviceRef.CPU()
    w = Weight("w", DType.float32, [32, 8], cpu)
    b = Weight("b", DType.float32, [32], cpu)
    with Graph("abi", input_types=[TensorType(DType.float32, ["n", 8], cpu)]) as g:
        g.output(ops.tanh(ops.matmul(g.inputs[0], w, transpose_b=True)) + b)
    return g


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("abi") / "good.gart"
    compile_graph(_graph(), "cpu", out=out)
    return out


@pytest.fixture
def art(built, tmp_path):
    dst = tmp_path / "copy.gart"
    shutil.copytree(built, dst)
    return dst


def _weights():
    r = np.random.default_rng(3)
    return {"w": r.standard_normal((32, 8)).astype(np.float32),
            "b": r.standard_normal(32).astype(np.float32)}


def _load(path):
    return InferenceSession().load(path, weights=_weights())


def _step(m, op):
    (s,) = [s for s in m["plan"]["steps"] if s["op"] == op]
    return s


def test_the_library_declares_the_manifests_packed_operands(art):
    m = _manifest(art)
    packed = _step(m, "matmul")["attrs"]["prepack"]
    assert packed and packed[0][0] == 1     # W, packed at load
    assert CpuLibrary(art / SO).abi() == {_step(m, "matmul")["kernel"]: packed}
    x = np.random.default_rng(4).standard_normal((5, 8)).astype(np.float32)
    (got,) = _load(art).execute(x)
    (want,) = run(_graph(), x, weights=_weights())
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("edit", ["lost", "other layout", "added"])
def test_a_step_at_odds_with_its_kernel_is_refused(art, edit):
    m = _manifest(art)
    s = _step(m, "matmul")
    if edit == "lost":
        del s["attrs"]["prepack"]
    elif edit == "other layout":
        i, layout = s["attrs"]["prepack"][0]
        s["attrs"]["prepack"] = [[i, "nk8" if layout != "nk8" else "nk16"]]
    else:  # the add's second operand is the bias weight: a load-time value
        s = _step(m, "add")
        s["attrs"]["prepack"] = [[1, "nk8"]]
    _write_manifest(art, m)
    with pytest.raises(ArtifactError, match=f"step [0-9]+ \\({s['kernel']}\\) passes pre-packed "
                                            f"operands .*, its kernel was compiled for"):
        _load(art)


def _swap_library(art, tmp_path, c_source):
    """Replace kernels.so by a library built from c_source, with the manifest's file hash and
    digest updated (the declaration is read before any kernel is looked up)."""
    src = tmp_path / "extra.c"
    src.write_text(c_source)
    out = tmp_path / "swapped.so"
    subprocess.run([_cc(), "-shared", "-fPIC", "-o", str(out), str(src)], check=True)
    shutil.copyfile(out, art / SO)
    m = _manifest(art)
    m["files"][SO] = hashlib.sha256((art / SO).read_bytes()).hexdigest()
    _write_manifest(art, m)


def test_a_library_that_declares_nothing_is_refused(art, tmp_path):
    _swap_library(art, tmp_path, "int graphir_unrelated;\n")
    with pytest.raises(ArtifactError, match="does not declare its kernels' operand layouts"):
        _load(art)


def test_a_library_whose_declaration_is_not_json_is_refused(art, tmp_path):
    _swap_library(art, tmp_path, _abi_source("[1, 2"))
    with pytest.raises(ArtifactError, match="graphir_abi"):
        _load(art)


def test_any_text_survives_the_declaration(tmp_path):
    text = json.dumps({"k1_\"odd\\name\n": [[1, "nk16"]], "é": []})
    src = tmp_path / "a.c"
    src.write_text(_abi_source(text))
    so = tmp_path / "a.so"
    subprocess.run([_cc(), "-shared", "-fPIC", "-o", str(so), str(src)], check=True)
    assert CpuLibrary(so).abi() == json.loads(text)
