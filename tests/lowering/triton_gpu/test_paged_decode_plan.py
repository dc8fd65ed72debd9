"""flash_attention_ragged's cuda plan on the CPU: the decode variants (direct write, split plus
reduce, or split with the partials merged by the kernel's last program of each group for MERGE
configs; one kernel per query-tile height) and the prefill fallback, run by the plan executor
through Triton's interpreter against the numpy interpreter. The steps share the executor's
scratch, so a group counter a merge left non-zero would break the next split step."""

import json

import numpy as np
import pytest

from graphir.lowering.triton_gpu import tuning
from graphir.runtime.interpreter import run
from tests.lowering.triton_gpu import paged_case
from tests.lowering.triton_gpu.test_backend_interp import interp_executor

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim")

NH, NKV, D = 8, 2, 16


def build(page, mask="causal", window=None):
    return paged_case.build("decode", NH, NKV, D, page, mask, window)


def step(rng, page, new, cache):
    return paged_case.inputs(rng, NH, NKV, D, page, new, cache)


# (new tokens, cache lengths) -> kernels launched; group 4 builds decode kernels for up to 4
# (16-row tile, no name suffix) and 8 (32 rows, `_q8`) new tokens per sequence. One-token tiles
# of few sequences take the shipped table's 128-key partitions (bucket u16_k2048), so even a
# 256-key context splits in two; the 4-token tile of the third step writes directly.
RED = "paged_decode_reduce_fp32"
STEPS = [
    ([1, 1, 0], [40, 200, 7], ["paged_decode_partial_fp32_mask1", RED]),
    ([1, 1, 1], [300, 5, 0], ["paged_decode_partial_fp32_mask1", RED]),
    ([3, 1, 4], [20, 0, 33], ["paged_decode_partial_fp32_mask1"]),
    ([6, 2, 1], [290, 17, 64], ["paged_decode_partial_fp32_mask1_q8", RED]),
    ([1, 1, 1], [300, 5, 0], ["paged_decode_partial_fp32_mask1", RED]),
    ([9, 1, 1], [3, 50, 0], ["flash_attention_fp32_mask1"]),
]


def merging_table() -> dict:
    """The shipped decode choices for fp32 (one-token tiles), each in its MERGE form."""
    table = json.loads(json.dumps(tuning.load_table()))
    fam = table["families"]["decode"]
    fam["fp32"] = {key: {b: name if name.endswith("_m") else name + "_m"
                         for b, name in buckets.items()}
                   for key, buckets in fam["fp32"].items()}
    return table


@pytest.mark.parametrize("merge", [False, True], ids=["reduce_kernel", "merged"])
@pytest.mark.parametrize("page", [16, 64])
def test_decode_variants_match_the_interpreter(page, merge):
    g = build(page)
    if merge:
        with tuning.using(tuning.Selector([("test", merging_table())])):
            ex, dev = interp_executor(g, {})
    else:
        ex, dev = interp_executor(g, {})
    rng = np.random.default_rng(page)
    parts = []
    launch = dev.launch

    def recording(key, grid, args):
        names = [n for n, _ in dev.specs[key].runtime_params()]
        parts.append(dict(zip(names, args)).get("num_parts"))
        launch(key, grid, args)
    dev.launch = recording
    for new, cache, kernels in STEPS:
        args = step(rng, page, new, cache)
        want = run(g, *[a.copy() for a in args])[0]
        dev.launched.clear()
        parts.clear()
        got = ex.execute(*[a.copy() for a in args])[0]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        split = RED in kernels
        if merge and not kernels[0].endswith("_q8"):  # the taller tile's default: a reduce
            kernels = [k for k in kernels if k != RED]
        assert dev.launched == kernels, (new, cache)
        if kernels[0].startswith("paged_decode"):
            assert (parts[0] > 1) == split, (new, cache, parts)


def test_sliding_window_decode_through_the_plan():
    g = build(16, "sliding_window_causal", 40)
    ex, dev = interp_executor(g, {})
    rng = np.random.default_rng(5)
    args = step(rng, 16, [2, 1], [280, 90])
    want = run(g, *[a.copy() for a in args])[0]
    np.testing.assert_allclose(ex.execute(*[a.copy() for a in args])[0], want, rtol=1e-5,
                               atol=1e-5)
    assert dev.launched[0] == "paged_decode_partial_fp32_mask2"
