"""The paged decode's split launches on the GPU in both forms: partials then the reduce kernel,
and MERGE configs whose last program per (sequence, KV-head group) merges the partials after
an atomic ticket (its counters must be back at zero for the next launch and for every replay
of a captured CUDA graph). A decode-attention graph compiled for cuda:sm_90 with the shipped
decode choices or every one of them in its MERGE form, through steps that split and steps that
do not, each step run three times (the later runs replay the captured graph), against the
reference interpreter (the kernels' fp32 dots run in TF32 here)."""

import json

import numpy as np
import pytest

from tests.gpu.requires import skip_unless_gpu, sm90  # noqa: F401 (the fixture)

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("sm90"),
              pytest.mark.filterwarnings("ignore:Conversion of an array")]
skip_unless_gpu()

from graphir.lowering.driver import compile_graph  # noqa: E402
from graphir.lowering.triton_gpu import tuning  # noqa: E402
from graphir.runtime.cuda import executor  # noqa: E402
from graphir.runtime.interpreter import run  # noqa: E402
from tests.lowering.triton_gpu import paged_case  # noqa: E402
from tests.lowering.triton_gpu.test_paged_decode_plan import STEPS, merging_table  # noqa: E402

NH, NKV, D = 8, 2, 16
TOL = 1e-2   # norm-relative; a lost or doubled partition is off by O(1)


def rel_err(got, want):
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.mark.parametrize("merge", [False, True], ids=["reduce_kernel", "merged"])
@pytest.mark.parametrize("page", [16, 64])
def test_split_decode_steps_and_replays_match_the_interpreter(page, merge, monkeypatch,
                                                               tmp_path):
    g = paged_case.build("decode", NH, NKV, D, page)
    if merge:
        # The backend reads the shipped table (and keys its cache on it): point it at one whose
        # fp32 decode choices all merge.
        path = tmp_path / "tuning_defaults.json"
        path.write_text(json.dumps(merging_table()))
        monkeypatch.setattr(tuning, "DEFAULTS_PATH", path)
    art = compile_graph(g, "cuda:sm_90")
    one_token = [b["winner"] for st in art.manifest["tuning"]["steps"]
                 if st["family"] == "decode" and st["facts"]["q"] == 1 for b in st["buckets"]]
    assert any(w.endswith("_m") for w in one_token) == merge, one_token
    model = executor.load(art, {})
    rng = np.random.default_rng(page)
    for new, cache, _ in STEPS:
        args = paged_case.inputs(rng, NH, NKV, D, page, new, cache)
        want = run(g, *[a.copy() for a in args])[0]
        for rep in range(3):
            got = np.asarray(model.execute(*[a.copy() for a in args])[0])
            assert np.isfinite(got).all(), (new, cache, rep)
            assert rel_err(got, want) <= TOL, (new, cache, rep, rel_err(got, want))
