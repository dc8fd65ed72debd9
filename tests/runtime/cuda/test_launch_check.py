"""The cuda loader's check of launch data (runtime/cuda/launch_check.py), without a GPU: edited
launches are refused with an ArtifactError naming the step, the untouched plan passes."""
from __future__ import annotations

import copy

import pytest

pytest.importorskip("triton")

from graphir.examples.llama_attention import build_tiny  # noqa: E402
from graphir.lowering.artifact import ArtifactError  # noqa: E402
from graphir.lowering.driver import compile_graph  # noqa: E402
from graphir.runtime.cuda.launch_check import check_launch_data  # noqa: E402


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return compile_graph(build_tiny(), "cuda:sm_90",
                         out=tmp_path_factory.mktemp("lc") / "t.gart")


def _launch(m, op_name="fused_qkv_matmul"):
    step = next(s for s in m["plan"]["steps"] if s["op"] == op_name)
    return step, step["attrs"]["variants"][0]["ops"][0]


def _edit_arg_value(m):
    step, op = _launch(m)
    other = next(v["id"] for v in m["plan"]["values"]
                 if v["id"] not in step["inputs"] + step["outputs"])
    op["args"][0] = ["v", other, "0"]


EDITS = {
    "argument points at another value": (_edit_arg_value, "not one of its own inputs"),
    "unknown kernel": (lambda m: _launch(m)[1].__setitem__("launch", "evil"), "not a kernel"),
    "argument dropped": (lambda m: _launch(m)[1]["args"].pop(), "arguments to"),
    "code in a grid rule": (lambda m: _launch(m)[1]["grid"].__setitem__(
        0, "__import__('os').getpid()"), "bad grid size"),
    "unknown scratch": (lambda m: _launch(m)[1]["args"].__setitem__(0, ["s", "nope"]),
                        "does not allocate"),
    "malformed argument": (lambda m: _launch(m)[1]["args"].__setitem__(0, ["q", 1]),
                           "malformed argument"),
    "host step re-pointed": (lambda m: next(s for s in m["plan"]["steps"] if s["kernel"] == "host")
                             ["attrs"].__setitem__("node", 0), "which is not a gir.concat"),
    "variant keys": (lambda m: _launch(m)[0]["attrs"]["variants"][0].pop("scratch"),
                     "malformed variant"),
    # the upload kernel (no step launches it) must take what its launcher passes
    "upload kernel's parameters swapped": (lambda m: m["kernels"]["upload_staged"]["params"]
                                           .reverse(), "not the upload kernel's"),
    "upload kernel's block size": (lambda m: m["kernels"]["upload_staged"]["constexprs"]
                                   .__setitem__("WORDS", "1024"), "not the upload kernel's"),
    "upload kernel's entry": (lambda m: m["kernels"]["upload_staged"].pop("constexprs"),
                              "malformed entry"),
}


def test_the_compiled_plan_passes(art):
    check_launch_data(art.manifest, art.graph(), art.path)


@pytest.mark.parametrize("edit", list(EDITS))
def test_edited_launches_are_refused(art, edit):
    fn, msg = EDITS[edit]
    m = copy.deepcopy(art.manifest)
    fn(m)
    with pytest.raises(ArtifactError, match="recompile") as e:
        check_launch_data(m, art.graph(), art.path)
    assert msg in str(e.value), str(e.value)
