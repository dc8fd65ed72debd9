"""Shared pieces of the nn tests: building a layer graph over the paged cache and stepping it
through runtime.kv_cache with the reference interpreter."""
from __future__ import annotations

import numpy as np

from graphir import DeviceRef, DType, Graph, TensorType
from nn import AttentionWithRope, KVCacheParams, PagedCacheValues, RotaryEmbedding
from runtime.interpreter import run
from runtime.kv_cache import PagedKVCacheManager

HIDDEN, NH, NKV, D = 64, 4, 2, 16
PAGE, LAYERS, LAYER = 4, 2, 1  # the layer writes cache layer 1 of 2: layer 0 must stay untouched


def layer_graph(attn, rope, kv_params: KVCacheParams, *, name="layer", layer=LAYER,
                device=DeviceRef.CPU()) -> Graph:
    """Inputs: x, input_row_offsets, blocks, cache_lengths, lookup_table, max_lengths."""
    types = [TensorType(DType.float32, ["total_seq_len", attn.hidden_size], device),
             TensorType(DType.uint32, ["batch + 1"], device)] + kv_params.input_types(device)
    with Graph(name, input_types=types) as g:
        x, offs, blocks, clen, lut, maxl = g.inputs
        g.output(attn(layer, x, PagedCacheValues(blocks, clen, lut, maxl), rope.freqs_cis, offs))
    return g



def manager(n_kv_heads: int = NKV, pages: int = 24) -> PagedKVCacheManager:
    m = PagedKVCacheManager(num_layers=LAYERS, n_kv_heads=n_kv_heads, head_dim=D, page_size=PAGE,
                            total_num_pages=pages)
    # Fresh random contents everywhere: a kernel reading a slot it should not would show.
    m.blocks[...] = np.random.default_rng(99).standard_normal(m.blocks_shape).astype(np.float32)
    return m


def step(graph, m: PagedKVCacheManager, seq_ids, counts, x: np.ndarray, weights) -> np.ndarray:
    """Run one step of `graph` for sequences `seq_ids` with `counts` new rows in x."""
    st = m.prepare_step(seq_ids, counts)
    (y,) = run(graph, x, st.input_row_offsets, m.blocks, st.cache_lengths, st.lookup_table,
               st.max_lengths, weights=weights)
    m.commit_step(st)
    return y


# A ragged batch of 3 prefilled, 4 decode steps, then a second prefill chunk for sequence 1
# batched with a decode of sequence 2 (rows in a different order than claimed).
PREFILL = [5, 9, 3]
SCHEDULE = [([0, 1, 2], PREFILL)] + [([0, 1, 2], [1, 1, 1])] * 4 + [([2, 1], [1, 6])]


def attention(**opts):
    """(rope, kv_params, layer) of the test size; `il` picks interleaved RoPE, `cls` the class."""
    rope = RotaryEmbedding(HIDDEN, NH, 10000.0, 64, head_dim=D, interleaved=opts.pop("il", True))
    kvp = KVCacheParams(dtype=DType.float32, n_kv_heads=NKV, head_dim=D, num_layers=LAYERS,
                        page_size=PAGE)
    cls = opts.pop("cls", AttentionWithRope)
    return rope, kvp, cls(rope=rope, num_attention_heads=NH, num_key_value_heads=NKV,
                          hidden_size=HIDDEN, kv_params=kvp, **opts)
