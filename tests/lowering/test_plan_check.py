"""Consistent edits of a manifest (root digest recomputed, as a deliberate editor would) are
refused by the schema and by the plan-vs-graph check, with an ArtifactError naming the part,
before any kernel runs: none of them may load and compute wrong numbers."""
from __future__ import annotations

import copy
import json
import shutil

import pytest

from graphir import DType, Graph, TensorType, Weight, ops
from graphir.lowering.artifact import ArtifactError, load_artifact, root_digest
from graphir.lowering.driver import compile_graph


def _graph() -> Graph:
    w = Weight("w", DType.float32, [8, 8])
    with Graph("pc", input_types=[TensorType(DType.float32, ["n", 8]),
                                  TensorType(DType.float32, ["n", 8])]) as g:
        x, y = g.inputs
        h = ops.matmul(x, w, transpose_b=True)
        a = ops.exp(h) + y
        b = ops.tanh(a) * ops.sigmoid(h)
        g.output(b.reshape([-1]), a)
    return g


@pytest.fixture(scope="module", params=["cpu", "cuda:sm_90"])
def built(request, tmp_path_factory):
    if request.param == "cpu":
        pytest.importorskip("mlir.ir")
    else:
        pytest.importorskip("triton")
    out = tmp_path_factory.mktemp("pc") / "a.gart"
    compile_graph(_graph(), request.param, out=out)
    return out


def _edit(built, tmp_path, fn):
    art = tmp_path / "e.gart"
    shutil.copytree(built, art)
    m = json.loads((art / "manifest.json").read_text())
    fn(m)
    m["root_digest"] = root_digest(m)
    (art / "manifest.json").write_text(json.dumps(m))
    return art


def _first_intermediates(m, k=2):
    return [v["id"] for v in m["plan"]["values"] if v["kind"] in ("intermediate", "output")][:k]


def _swap_steps(m):
    s = m["plan"]["steps"]
    s[0], s[-1] = s[-1], s[0]


def _same_slot(m):
    vals = [v for v in m["plan"]["values"] if v["slot"] is not None]
    slots = sorted({v["slot"] for v in vals})
    if len(slots) < 2:
        m["plan"]["n_slots"] += 1  # still an inconsistency the check must see
        return
    for v in vals:
        if v["slot"] == slots[1]:
            v["slot"] = slots[0]


EDITS = {
    "value shape": (lambda m: m["plan"]["values"][0].__setitem__("shape", ["n", "9"]), "value 0"),
    "value dtype": (lambda m: m["plan"]["values"][0].__setitem__("dtype", "bf16"), "value 0"),
    "value kind": (lambda m: m["plan"]["values"][0].__setitem__("kind", "weight"), "value 0"),
    "weight name": (lambda m: next(v for v in m["plan"]["values"] if v["kind"] == "weight")
                    .__setitem__("name", "other"), "is not the graph's"),
    "inputs swapped": (lambda m: m["plan"]["inputs"].reverse(), "inputs or outputs"),
    "outputs changed": (lambda m: m["plan"]["outputs"].pop(), "inputs or outputs"),
    "step reads a missing value": (lambda m: m["plan"]["steps"][0]["inputs"].append(9999),
                                   "do not exist"),
    "steps reordered": (_swap_steps, "before any step writes them"),
    "two live values, one slot": (_same_slot, "memory slots"),
    "slot count": (lambda m: m["plan"].__setitem__("n_slots", m["plan"]["n_slots"] + 3),
                   "memory slots"),
    "view of nothing": (lambda m: m["plan"]["values"][_first_intermediates(m)[0]]
                        .__setitem__("view_of", 9999), "view of a value that does not exist"),
    "view of itself": (lambda m: m["plan"]["values"][_first_intermediates(m)[0]]
                       .__setitem__("view_of", _first_intermediates(m)[0]), "cycle of views"),
    "two views of each other": (lambda m: [m["plan"]["values"][a].__setitem__("view_of", b)
                                           for a, b in [_first_intermediates(m),
                                                        _first_intermediates(m)[::-1]]],
                                "cycle of views"),
    "plan key removed": (lambda m: m["plan"].pop("n_slots"), "has keys"),
    "plan key added": (lambda m: m["plan"].__setitem__("symbols", 1), "has keys"),
    "step key flipped": (lambda m: m["plan"]["steps"][0].__setitem__(
        "symbo,s", m["plan"]["steps"][0].pop("attrs")), "step 0 is malformed"),
    "unknown manifest key": (lambda m: m.__setitem__("extra", 1), "unknown keys ['extra']"),
    "missing manifest key": (lambda m: m.pop("kernels"), "lacks ['kernels']"),
    "kernels wrong type": (lambda m: m.__setitem__("kernels", "k0"), "['kernels'] is a str"),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_consistent_edits_are_refused(built, tmp_path, edit):
    fn, msg = EDITS[edit]
    art = _edit(built, tmp_path, fn)
    with pytest.raises(ArtifactError, match="recompile") as e:
        load_artifact(art)
    assert msg in str(e.value), str(e.value)


def test_backend_tables_are_checked(built, tmp_path):
    m0 = json.loads((built / "manifest.json").read_text())
    if m0.get("backend") == "triton_gpu":
        key = next(k for k, v in m0["kernels"].items() if v.get("kind") != "cublaslt")
        fn = lambda m: m["kernels"][key].pop("params")  # noqa: E731
        msg = f"kernel {key!r} lacks ['params']"
    else:
        fn = lambda m: m.__setitem__("library", "cpu/other.so")  # noqa: E731
        msg = "library 'cpu/other.so' is not one of the artifact's files"
    with pytest.raises(ArtifactError, match="recompile") as e:
        load_artifact(_edit(built, tmp_path, fn))
    assert msg in str(e.value)


def test_the_untouched_artifact_loads(built):
    art = load_artifact(built)
    assert copy.deepcopy(art.manifest["plan"]) == art.manifest["plan"]
