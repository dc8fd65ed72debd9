"""A Llama-3 attention layer over the paged KV cache: the 8B shape and a tiny one for tests.

Graph inputs: x [total_seq_len, hidden], input_row_offsets u32 [batch + 1], kv blocks (buffer)
[total_num_pages, 2, num_layers, page_size, n_kv_heads, head_dim], cache_lengths u32 [batch],
lookup_table u32 [batch, max_num_pages], max_lengths u32 [steps_remaining, 2]. Weights bind by
name (q_proj.weight, k_proj.weight, v_proj.weight, o_proj.weight).
"""
from __future__ import annotations

import numpy as np

from graphir import DeviceRef, DType, Graph, TensorType
from graphir.nn import (AttentionWithRope, KVCacheParams, Llama3RopeScalingParams, PagedCacheValues,
                RotaryEmbedding)


def _build(name: str, *, hidden: int, n_heads: int, n_kv_heads: int, head_dim: int,
           page_size: int, num_layers: int, layer_idx: int, max_seq_len: int, theta: float,
           scaling: Llama3RopeScalingParams | None, dtype: DType, device: DeviceRef,
           fuse_rope_and_store: bool) -> Graph:
    rope = RotaryEmbedding(hidden, n_heads, theta, max_seq_len, head_dim=head_dim,
                           interleaved=False, scaling_params=scaling, device=device)
    kv_params = KVCacheParams(dtype=dtype, n_kv_heads=n_kv_heads, head_dim=head_dim,
                              num_layers=num_layers, page_size=page_size, devices=(device,))
    attn = AttentionWithRope(rope=rope, num_attention_heads=n_heads,
                             num_key_value_heads=n_kv_heads, hidden_size=hidden,
                             kv_params=kv_params, devices=[device], dtype=dtype,
                             _fuse_rope_and_store=fuse_rope_and_store)
    blocks_t, clen_t, lut_t, maxl_t = kv_params.input_types(device)
    types = [TensorType(dtype, ["total_seq_len", hidden], device),
             TensorType(DType.uint32, ["batch + 1"], device), blocks_t, clen_t, lut_t, maxl_t]
    names = ["x", "input_row_offsets", "kv_blocks", "cache_lengths", "lookup_table",
             "max_lengths"]
    with Graph(name, input_types=types, input_names=names) as g:
        x, offs, blocks, clen, lut, maxl = g.inputs
        kv = PagedCacheValues(blocks, clen, lut, maxl)
        g.output(attn(layer_idx, x, kv, rope.freqs_cis, offs))
    return g


def build(*, dtype: DType = DType.bfloat16, device: DeviceRef | None = None,
          fuse_rope_and_store: bool = True) -> Graph:
    """Layer 0 of a Llama-3-8B-shaped model: hidden 4096, 32 heads, 8 KV heads, head_dim 128,
    page_size 128, rope theta 500000 with Llama-3.1 scaling, max_seq_len 8192."""
    return _build("llama3_8b_attention", hidden=4096, n_heads=32, n_kv_heads=8, head_dim=128,
                  page_size=128, num_layers=1, layer_idx=0, max_seq_len=8192, theta=500000.0,
                  scaling=Llama3RopeScalingParams(8.0, 1.0, 4.0, 8192), dtype=dtype,
                  device=device or DeviceRef.CPU(), fuse_rope_and_store=fuse_rope_and_store)


def build_tiny(*, dtype: DType = DType.float32, device: DeviceRef | None = None,
               fuse_rope_and_store: bool = True) -> Graph:
    """The same layer at test size: hidden 64, 4 heads, 2 KV heads, head_dim 16, page_size 4,
    2 cache layers (the graph is layer 1), max_seq_len 64."""
    return _build("llama_tiny_attention", hidden=64, n_heads=4, n_kv_heads=2, head_dim=16,
                  page_size=4, num_layers=2, layer_idx=1, max_seq_len=64, theta=10000.0,
                  scaling=Llama3RopeScalingParams(8.0, 1.0, 4.0, 32), dtype=dtype,
                  device=device or DeviceRef.CPU(), fuse_rope_and_store=fuse_rope_and_store)


def random_weights(graph: Graph, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 arrays (std 1/sqrt(fan_in)) for every weight of `graph`."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, v in graph.weights.items():
        shape = v.type.static_shape()
        std = 1.0 / np.sqrt(shape[-1]) if len(shape) == 2 else 1.0
        out[name] = (rng.standard_normal(shape) * std).astype(np.float32)
    return out
