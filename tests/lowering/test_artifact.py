"""The `.gart` artifact: what the manifest holds, and every kind of damage load_artifact refuses."""
import ctypes
import hashlib
import json
import os
import pickle
import shutil

import numpy as np
import pytest

pytest.importorskip("mlir.ir")

from graphir import ops  # noqa: E402
from graphir import DeviceRef, DType, Graph, TensorType, Weight  # noqa: E402
from graphir.lowering.artifact import (FORMAT_VERSION, ArtifactError, load_artifact,  # noqa: E402
                                      root_digest)
from graphir.lowering.driver import compile_graph  # noqa: E402
from graphir.runtime.interpreter import run  # noqa: E402
from graphir.runtime.session import InferenceSession  # noqa: E402

SO = "cpu/kernels.so"


def _graph() -> Graph:
    cpu = DeviceRef.CPU()
    w = Weight("w", DType.float32, [6], cpu)
    with Graph("art", input_types=[TensorType(DType.float32, ["n", 6], cpu)]) as g:
        x = g.inputs[0]
        g.output(ops.tanh(x) * w - ops.exp(x))
    return g


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "good.gart"
    compile_graph(_graph(), "cpu", out=out)
    return out


@pytest.fixture
def art(built, tmp_path):
    """A private copy of the built artifact, free to damage."""
    dst = tmp_path / "copy.gart"
    shutil.copytree(built, dst)
    return dst


def _manifest(path):
    return json.loads((path / "manifest.json").read_text())


def _write_manifest(path, m):
    """Write an edited manifest with a matching root digest: the edit a deliberate tamperer
    makes, so the checks behind the digest are what must refuse it."""
    if isinstance(m, dict):
        m["root_digest"] = root_digest(m)
    (path / "manifest.json").write_text(json.dumps(m))


def _refused(path, *fragments):
    with pytest.raises(ArtifactError) as e:
        load_artifact(path)
    for f in fragments:
        assert f in str(e.value), str(e.value)
    return str(e.value)


def test_manifest_contents(art):
    a = load_artifact(art)
    m = a.manifest
    from graphir.lowering.mlir_cpu.cpu_target import host_target

    assert m["format_version"] == FORMAT_VERSION and m["target"] == str(host_target())
    assert m["cpu"]["target"] == m["target"] and m["cpu"]["required_flags"]
    gir = (art / "graph.gir").read_bytes()
    assert m["graph_hash"] == hashlib.sha256(gir).hexdigest()
    assert set(m["files"]) == {"graph.gir", SO}
    for rel, digest in m["files"].items():
        assert hashlib.sha256((art / rel).read_bytes()).hexdigest() == digest
    assert {"graphir", "python", "numpy", "machine"} <= set(m["tool_versions"])
    assert m["library"] == SO and m["kernels"] == ["k0_tanh", "k2_mul", "k3_exp", "k4_sub"]
    plan = m["plan"]
    kinds = [v["kind"] for v in plan["values"]]
    assert kinds.count("input") == 1 and kinds.count("weight") == 1 and kinds.count("output") == 1
    assert plan["n_slots"] >= 1 and len(plan["steps"]) == 4
    # A position-independent shared object: ELF type ET_DYN.
    head = (art / SO).read_bytes()[:18]
    assert head[:4] == b"\x7fELF" and int.from_bytes(head[16:18], "little") == 3
    assert a.graph().name == "art"


def test_one_byte_changed_in_the_so(art):
    data = bytearray((art / SO).read_bytes())
    data[len(data) // 2] ^= 0x01
    (art / SO).write_bytes(bytes(data))
    _refused(art, "cpu/kernels.so does not match its sha256", "tampered")


def test_one_byte_changed_in_the_graph(art):
    text = (art / "graph.gir").read_text()
    (art / "graph.gir").write_text(text.replace("gir.exp", "gir.log"))
    _refused(art, "graph.gir does not match its sha256")


def test_truncated_so(art):
    data = (art / SO).read_bytes()
    (art / SO).write_bytes(data[: len(data) // 3])
    _refused(art, "cpu/kernels.so does not match its sha256", "truncated")


def test_deleted_file(art):
    (art / SO).unlink()
    _refused(art, "cpu/kernels.so is missing")


def test_version_mismatch(art):
    m = _manifest(art)
    m["format_version"] = FORMAT_VERSION + 41
    _write_manifest(art, m)
    _refused(art, f"format version {FORMAT_VERSION + 41} is not supported", "recompile")


def test_tool_version_mismatch(art):
    m = _manifest(art)
    m["tool_versions"]["graphir"] = "0.0.0-elsewhere"
    _write_manifest(art, m)
    _refused(art, "built by graphir '0.0.0-elsewhere'", "recompile")


@pytest.mark.parametrize("where", ["parent", "absolute", "symlink"])
def test_path_outside_the_artifact(art, tmp_path, where):
    outside = tmp_path / "evil.so"
    shutil.copy(art / SO, outside)
    digest = hashlib.sha256(outside.read_bytes()).hexdigest()
    m = _manifest(art)
    if where == "parent":
        rel = "../evil.so"
    elif where == "absolute":
        rel = str(outside)
    else:
        rel = "cpu/link.so"
        os.symlink(outside, art / rel)
    m["files"][rel] = digest
    m["library"] = rel
    _write_manifest(art, m)
    _refused(art, f"file {rel!r} points outside the artifact")


def test_corrupt_manifest_json(art):
    text = (art / "manifest.json").read_text()
    (art / "manifest.json").write_text(text[: len(text) // 2])
    _refused(art, "corrupt manifest")


@pytest.mark.parametrize("content, msg", [("[1, 2]", "manifest has no format_version"),
                                          ("NOFILES", "malformed manifest: the manifest lacks ['files']"),
                                          (b"\xff\xfe\x00", "corrupt manifest")])
def test_malformed_manifest(art, content, msg):
    if content == "NOFILES":
        m = _manifest(art)
        del m["files"]
        _write_manifest(art, m)
    elif isinstance(content, bytes):
        (art / "manifest.json").write_bytes(content)
    else:
        (art / "manifest.json").write_text(content)
    _refused(art, msg)


def test_manifest_with_wrongly_typed_fields(art):
    m = _manifest(art)
    m["tool_versions"] = "graphir 0.1.0"
    _write_manifest(art, m)
    _refused(art, "tool_versions")


def test_not_an_artifact(tmp_path):
    _refused(tmp_path, "not a graphir artifact (no manifest.json)")


def test_graph_hash_checked_even_when_the_file_hash_was_updated(art):
    gir = art / "graph.gir"
    gir.write_text(gir.read_text().replace("gir.exp", "gir.log"))
    m = _manifest(art)
    m["files"]["graph.gir"] = hashlib.sha256(gir.read_bytes()).hexdigest()
    _write_manifest(art, m)
    _refused(art, "graph.gir does not match the manifest's graph hash")


def test_wrong_target(art):
    with pytest.raises(ArtifactError, match=r"built for 'cpu:[a-z0-9-]+:[\w+]+', not 'cuda:sm_90'"):
        load_artifact(art, expect_target="cuda:sm_90")


def test_tampered_so_is_never_loaded(art, monkeypatch):
    opened = []
    real = ctypes.CDLL

    def spy(path, *a, **k):
        opened.append(str(path))
        return real(path, *a, **k)
    monkeypatch.setattr(ctypes, "CDLL", spy)
    data = bytearray((art / SO).read_bytes())
    data[100] ^= 0xFF
    (art / SO).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match its sha256"):
        InferenceSession().load(str(art), weights={"w": np.ones(6, np.float32)})
    assert not any(str(art) in p for p in opened)


def test_nothing_is_unpickled(art, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("something was unpickled")
    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    rng = np.random.default_rng(1)
    w = rng.standard_normal(6).astype(np.float32)
    x = rng.standard_normal((3, 6)).astype(np.float32)
    (y,) = InferenceSession().load(str(art), weights={"w": w}).execute(x)
    np.testing.assert_allclose(y, np.tanh(x) * w - np.exp(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y, run(_graph(), x, weights={"w": w})[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("edit", ["flip a key", "change the plan", "add a key"])
def test_any_manifest_edit_without_the_digest_is_refused(art, edit):
    text = (art / "manifest.json").read_text()
    if edit == "flip a key":
        text = text.replace('"steps"', '"step,"', 1)   # the one-bit flip that once segfaulted
    elif edit == "change the plan":
        m = json.loads(text)
        m["plan"]["n_slots"] += 1
        text = json.dumps(m)
    else:
        m = json.loads(text)
        m["extra"] = 1
        text = json.dumps(m)
    (art / "manifest.json").write_text(text)
    _refused(art, "manifest.json was changed after the artifact was written")


def test_a_file_larger_than_the_hash_chunk_is_hashed_whole(art):
    # sha256 is read in 1 MiB chunks; a change past the first chunk must still be caught.
    big = art / SO
    data = bytearray(big.read_bytes())
    data += bytes(3 << 20)
    m = _manifest(art)
    big.write_bytes(bytes(data))
    m["files"][SO] = hashlib.sha256(bytes(data)).hexdigest()
    _write_manifest(art, m)
    load_artifact(art)  # consistent: accepted
    data[-1] ^= 0x01       # one bit, 3 MiB past the start
    big.write_bytes(bytes(data))
    _refused(art, "cpu/kernels.so does not match its sha256")
