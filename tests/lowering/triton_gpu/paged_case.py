"""A flash_attention_ragged graph over a paged cache and its inputs, for the cuda plan tests on
the CPU (test_flash_attention_plan.py, test_paged_decode_plan.py)."""

import numpy as np

from graphir import BufferType, DType, Graph, TensorType, ops

U32, F32 = DType.uint32, DType.float32
LAYERS = 2


def build(name, nh, nkv, d, page, mask="causal", window=None):
    """Graph over q [t, nh * d], the blocks [p, 2, LAYERS, page, nkv, d] (layer 1 attended),
    row offsets, cache lengths and the lookup table."""
    types = [TensorType(F32, ["t", nh * d]), BufferType(F32, ["p", 2, LAYERS, page, nkv, d]),
             TensorType(U32, ["b + 1"]), TensorType(U32, ["b"]), TensorType(U32, ["b", "m"])]
    with Graph(name, input_types=types) as g:
        q, bl, o, c, lt = g.inputs
        g.output(ops.flash_attention_ragged(q, bl, o, c, lt, n_heads=nh, n_kv_heads=nkv,
                                            head_dim=d, layer_idx=1, mask_variant=mask,
                                            window=window))
    return g


def inputs(rng, nh, nkv, d, page, new, cache):
    """[q, blocks, offsets, cache lengths, lookup table] for sequences of `new` tokens over
    `cache` cached ones: fresh random pages in shuffled order, a spare page past every
    sequence's own ones in its table."""
    total = [c + n for c, n in zip(cache, new)]
    need = [-(-t // page) for t in total]
    pages = sum(need) + 1
    order = rng.permutation(pages)
    lut = np.full((len(new), max(need) + 1), order[-1], np.uint32)
    k = 0
    for b, n in enumerate(need):
        lut[b, :n] = order[k:k + n]
        k += n
    blocks = rng.standard_normal((pages, 2, LAYERS, page, nkv, d)).astype(np.float32)
    q = rng.standard_normal((sum(new), nh * d)).astype(np.float32)
    offs = np.concatenate([[0], np.cumsum(new)]).astype(np.uint32)
    return [q, blocks, offs, np.asarray(cache, np.uint32), lut]
