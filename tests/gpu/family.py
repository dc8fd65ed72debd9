"""The AttentionWithRope family at test size, in any dtype, with random weights: shared by
the GPU tests (tests/gpu) and the interpreter-driven backend tests (tests/lowering/triton_gpu).

`CASES` name the layer configurations; `build(case, dtype, fuse)` returns the layer's graph
(inputs x, input_row_offsets, blocks, cache_lengths, lookup_table, max_lengths) and its weights;
`run_schedule(execute, graph, weights, dtype)` steps a ragged prefill, decodes and a chunked
prefill through the paged cache and returns every step's output and the final blocks.
"""
from __future__ import annotations

import numpy as np

from graphir import DeviceRef, DType, Graph, TensorType
from graphir.dtype import round_to, round_to_f8e4m3fn
from graphir.nn import (AttentionWithRope, AttentionWithRopeNoOpaque, Float8Config, KVCacheParams,
                PagedCacheValues, RotaryEmbedding)
from graphir.runtime.kv_cache import PagedKVCacheManager

HIDDEN, NH, NKV, D, PAGE, LAYERS, LAYER = 64, 4, 2, 16, 4, 2, 1
PREFILL = [5, 9, 3]
SCHEDULE = [([0, 1, 2], PREFILL)] + [([0, 1, 2], [1, 1, 1])] * 3 + [([2, 1], [1, 6])]

CASES = {
    "default": {},
    "bias_qk_norm": {"has_bias": True, "use_qk_norm": True},
    "stacked_clip_interleaved": {"stacked_qkv": True, "clip_qkv": 0.2, "il": True},
    "sliding_window": {"mask_variant": "sliding_window_causal", "sliding_window": 4},
    "null_mask": {"mask_variant": "null"},
    "no_opaque": {"cls": AttentionWithRopeNoOpaque},
    "float8_dynamic": {"float8_config": "dynamic"},
    # Gemma 2's sliding layer: scores of std ~4 against a cap of 1.5, so the cap matters.
    "gemma2_softcap": {"mask_variant": "sliding_window_causal", "sliding_window": 4,
                       "scale": 1.0, "softcap": 1.5},
}


def build(case: str, dtype: DType = DType.bfloat16, fuse: bool = True, seed: int = 0,
          device: DeviceRef | None = None):
    """(graph, weights) of one family member."""
    opts = dict(CASES[case])
    dev = device or DeviceRef.CPU()
    rope = RotaryEmbedding(HIDDEN, NH, 10000.0, 64, head_dim=D, interleaved=opts.pop("il", False),
                           device=dev)
    kvp = KVCacheParams(dtype=dtype, n_kv_heads=NKV, head_dim=D, num_layers=LAYERS,
                        page_size=PAGE, devices=(dev,))
    cls = opts.pop("cls", AttentionWithRope)
    f8 = opts.pop("float8_config", None)
    if f8 is not None:
        opts["float8_config"] = Float8Config.dynamic() if f8 == "dynamic" else Float8Config.static()
    if cls is AttentionWithRope:
        opts["_fuse_rope_and_store"] = fuse
    opts["dtype"] = dtype
    opts["devices"] = [dev]
    attn = cls(rope=rope, num_attention_heads=NH, num_key_value_heads=NKV, hidden_size=HIDDEN,
               kv_params=kvp, **opts)
    types = [TensorType(dtype, ["total_seq_len", HIDDEN], dev),
             TensorType(DType.uint32, ["batch + 1"], dev)] + kvp.input_types(dev)
    with Graph(f"family_{case}", input_types=types) as g:
        x, offs, blocks, clen, lut, maxl = g.inputs
        kv = PagedCacheValues(blocks, clen, lut, maxl)
        if cls is AttentionWithRope:
            g.output(attn(LAYER, x, kv, rope.freqs_cis, offs))
        else:
            g.output(attn(LAYER, x, kv, offs))
    return g, random_weights(g, seed, f8 is not None)


def random_weights(graph, seed: int, float8: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, v in graph.weights.items():
        shape = v.type.static_shape()
        if name.endswith("input_scale"):
            out[name] = np.full(shape, 4.0 / 448, np.float32)
        elif name.endswith("weight_scale"):
            out[name] = rng.uniform(0.002, 0.004, shape).astype(np.float32)
        elif v.type.dtype is DType.float8_e4m3fn:
            out[name] = round_to_f8e4m3fn(rng.standard_normal(shape) * 40)
        else:
            std = 1.0 / np.sqrt(shape[-1]) if len(shape) == 2 else 1.0
            base = 1.0 if name.endswith("norm.weight") else 0.0
            out[name] = (base + rng.standard_normal(shape) * std).astype(np.float32)
    return out


def manager(dtype: DType, pages: int = 24) -> PagedKVCacheManager:
    m = PagedKVCacheManager(num_layers=LAYERS, n_kv_heads=NKV, head_dim=D, page_size=PAGE,
                            total_num_pages=pages)
    # Fresh random contents everywhere: reading a slot that should not be read shows.
    m.blocks[...] = round_to(np.random.default_rng(99).standard_normal(m.blocks_shape), dtype)
    for _ in PREFILL:
        m.claim()
    return m


def run_schedule(execute, dtype: DType, seed: int = 1, schedule=SCHEDULE):
    """Step `execute(x, offs, blocks, clen, lut, maxl) -> y` through the schedule."""
    m = manager(dtype)
    rng = np.random.default_rng(seed)
    outs = []
    for ids, counts in schedule:
        x = round_to(rng.standard_normal((sum(counts), HIDDEN)), dtype)
        st = m.prepare_step(ids, counts)
        outs.append(np.asarray(execute(x, st.input_row_offsets, m.blocks, st.cache_lengths,
                                       st.lookup_table, st.max_lengths)))
        m.commit_step(st)
    return outs, m.blocks.copy()


def rel_err(got, want) -> float:
    """Norm-relative error (bf16 acceptance: <= 2e-2)."""
    return float(np.linalg.norm(np.asarray(got, np.float64) - want)
                 / max(np.linalg.norm(np.asarray(want, np.float64)), 1e-30))
