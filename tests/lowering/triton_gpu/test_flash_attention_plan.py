"""flash_attention_ragged's prefill route through the cuda plan on the CPU: lower_prefill's
launch (grid over query blocks x heads x sequences, the cache's page count as an argument) run
by the plan executor through Triton's interpreter against the numpy interpreter, for each mask,
ragged batches with empty sequences and cached prefixes, pages smaller and larger than the key
block."""

import numpy as np
import pytest

from graphir import BufferType, DType, Graph, TensorType, ops
from graphir.runtime.interpreter import run
from tests.lowering.triton_gpu.test_backend_interp import interp_executor

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim")

U32, F32 = DType.uint32, DType.float32
NH, NKV, D, L = 4, 2, 16, 2


def build(page, mask, window):
    types = [TensorType(F32, ["t", NH * D]), BufferType(F32, ["p", 2, L, page, NKV, D]),
             TensorType(U32, ["b + 1"]), TensorType(U32, ["b"]), TensorType(U32, ["b", "m"])]
    with Graph("prefill", input_types=types) as g:
        q, bl, o, c, lt = g.inputs
        g.output(ops.flash_attention_ragged(q, bl, o, c, lt, n_heads=NH, n_kv_heads=NKV,
                                            head_dim=D, layer_idx=1, mask_variant=mask,
                                            window=window))
    return g


def inputs(rng, page, new, cache):
    total = [c + n for c, n in zip(cache, new)]
    need = [-(-t // page) for t in total]
    pages = sum(need) + 1
    order = rng.permutation(pages)
    lut = np.full((len(new), max(need) + 1), order[-1], np.uint32)
    k = 0
    for b, n in enumerate(need):
        lut[b, :n] = order[k:k + n]
        k += n
    blocks = rng.standard_normal((pages, 2, L, page, NKV, D)).astype(np.float32)
    q = rng.standard_normal((sum(new), NH * D)).astype(np.float32)
    offs = np.concatenate([[0], np.cumsum(new)]).astype(np.uint32)
    return [q, blocks, offs, np.asarray(cache, np.uint32), lut]


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
