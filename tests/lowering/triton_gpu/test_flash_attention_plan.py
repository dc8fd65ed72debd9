"""flash_attention_ragged's prefill route through the cuda plan on the CPU: lower_prefill's
launch (grid over query blocks x heads x sequences, the cache's page count as an argument) run
by the plan executor through Triton's interpreter against the numpy interpreter, for each mask,
ragged batches with empty sequences and cached prefixes, pages smaller and larger than the key
block."""

import numpy as np
import pytest

from graphir.runtime.interpreter import run
from tests.lowering.triton_gpu import paged_case
from tests.lowering.triton_gpu.test_backend_interp import interp_executor

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim")

NH, NKV, D = 4, 2, 16


def build(page, mask, window):
    return paged_case.build("prefill", NH, NKV, D, page, mask, window)


def inputs(rng, page, new, cache):
    return paged_case.inputs(rng, NH, NKV, D, page, new, cache)


@pytest.mark.parametrize("mask,window,page", [("causal", None, 16), ("null", None, 64),
                                              ("sliding_window_causal", 50, 16),
                                              ("chunked_causal", 48, 64)])
def test_prefill_through_the_plan(mask, window, page):
    g = build(page, mask, window)
    ex, dev = interp_executor(g, {})
    rng = np.random.default_rng(page + len(mask))
    for new, cache in (([70, 0, 12], [30, 5, 0]), ([9, 130], [100, 0])):
        args = inputs(rng, page, new, cache)
        want = run(g, *[a.copy() for a in args])[0]
        dev.launched.clear()
        got = ex.execute(*[a.copy() for a in args])[0]
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
        assert dev.launched == [f"flash_attention_fp32_mask{ops_mask_id(mask)}"], dev.launched


def ops_mask_id(mask: str) -> int:
    from graphir.lowering.triton_gpu.kernels.paged import mask_id

    return mask_id(mask.upper())
