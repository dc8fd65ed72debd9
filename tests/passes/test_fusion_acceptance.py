"""Acceptance of the fusion passes: AttentionWithRope built with `_fuse_rope_and_store=False` and
run through the default pipeline prints exactly the IR of the layer built with True (also run
through the pipeline), and both compute the same numbers as the unoptimized unfused layer."""
from __future__ import annotations

import numpy as np
import pytest

from graphir import Dim, DType, Graph, TensorType
from graphir.passes import run_passes
from graphir.nn.attention import AttentionWithRope
from graphir.nn.kv_cache import KVCacheParams, PagedCacheValues
from graphir.nn.rotary_embedding import RotaryEmbedding
from graphir.runtime.interpreter import run
from graphir.runtime.kv_cache import PagedKVCacheManager

F32, U32 = DType.float32, DType.uint32
HIDDEN, LAYERS, PAGE, PAGES = 16, 3, 4, 6

CONFIGS = [
    dict(nh=4, nkv=2, use_qk_norm=False, interleaved=False, has_bias=False, stacked_qkv=False, layer=0),
    dict(nh=4, nkv=2, use_qk_norm=True, interleaved=False, has_bias=False, stacked_qkv=False, layer=1),
    dict(nh=4, nkv=2, use_qk_norm=False, interleaved=True, has_bias=True, stacked_qkv=False, layer=2),
    dict(nh=4, nkv=2, use_qk_norm=True, interleaved=True, has_bias=True, stacked_qkv=False, layer=0),
    dict(nh=4, nkv=2, use_qk_norm=False, interleaved=False, has_bias=False, stacked_qkv=True, layer=1),
    dict(nh=4, nkv=2, use_qk_norm=True, interleaved=True, has_bias=False, stacked_qkv=True, layer=2,
         clip_qkv=0.5),
    dict(nh=2, nkv=2, use_qk_norm=True, interleaved=False, has_bias=True, stacked_qkv=False, layer=1,
         mask_variant="sliding_window_causal", sliding_window=2),
    dict(nh=4, nkv=1, use_qk_norm=False, interleaved=True, has_bias=False, stacked_qkv=False, layer=0,
         rms_norm_eps=1e-5),
]


def build(cfg: dict, fuse: bool):
    cfg = dict(cfg)
    nh, nkv, layer = cfg.pop("nh"), cfg.pop("nkv"), cfg.pop("layer")
    d = 4
    kvp = KVCacheParams(dtype=F32, n_kv_heads=nkv, head_dim=d, num_layers=LAYERS, page_size=PAGE)
    rope = RotaryEmbedding(nh * d, nh, 10000.0, 16, head_dim=d, interleaved=cfg.pop("interleaved"))
    attn = AttentionWithRope(rope=rope, num_attention_heads=nh, num_key_value_heads=nkv,
                             hidden_size=HIDDEN, kv_params=kvp, _fuse_rope_and_store=fuse, **cfg)
    types = [TensorType(F32, ["total_seq_len", HIDDEN]), TensorType(U32, [Dim("batch") + 1])]
    types += kvp.input_types()
    with Graph("attention", input_types=types,
               input_names=["x", "offs", "blocks", "clen", "lut", "maxl"]) as g:
        x, offs, blocks, clen, lut, maxl = g.inputs
        g.output(attn(layer, x, PagedCacheValues(blocks, clen, lut, maxl), rope.freqs_cis, offs))
    return g


def _inputs(g, nkv, rng):
    m = PagedKVCacheManager(num_layers=LAYERS, n_kv_heads=nkv, head_dim=4, page_size=PAGE,
                            total_num_pages=PAGES)
    seqs = [m.claim(), m.claim()]
    m.commit_step(m.prepare_step(seqs, [5, 1]))
    step = m.prepare_step(seqs, [2, 3])
    n = int(step.input_row_offsets[-1])
    args = [rng.standard_normal((n, HIDDEN)).astype(np.float32), step.input_row_offsets,
            rng.standard_normal(m.blocks_shape).astype(np.float32), step.cache_lengths,
            step.lookup_table, step.max_lengths]
    weights = {name: rng.standard_normal(tuple(int(s) for s in v.type.shape)).astype(np.float32)
               for name, v in g.weights.items()}
    return args, weights


def _run(g, args, weights):
    args = [a.copy() for a in args]
    (out,) = run(g, *args, weights=weights)
    return out, args[2]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_unfused_layer_optimizes_to_fused_layer(cfg):
    unfused, fused = build(cfg, False), build(cfg, True)
    assert "gir.rope_split_store" not in str(unfused)
    text_unfused = str(run_passes(build(cfg, False)))
    text_fused = str(run_passes(build(cfg, True)))
    assert text_unfused == text_fused
    assert text_fused.count("gir.rope_split_store") == 1 and "gir.kv_cache_store" not in text_fused
    rng = np.random.default_rng(sum(map(ord, str(sorted(cfg.items())))))
    args, weights = _inputs(unfused, cfg["nkv"], rng)
    out_ref, blocks_ref = _run(unfused, args, weights)  # the layer as built, unfused, no passes
    out_f, blocks_f = _run(fused, args, weights)
    out_opt, blocks_opt = _run(run_passes(unfused), args, weights)
    np.testing.assert_allclose(out_f, out_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(blocks_f, blocks_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out_opt, _run(run_passes(fused), args, weights)[0])
    np.testing.assert_array_equal(blocks_opt, blocks_f)
    assert not np.allclose(blocks_ref[:, :, cfg["layer"]], args[2][:, :, cfg["layer"]])


def test_stacked_layers_share_one_cache():
    """Two layers writing layers 0 and 2 of one cache (their weights share names, so one set):
    each store pair fuses and the chain keeps layer 0's writes before layer 1's reads."""
    def make(fuse):
        kvp = KVCacheParams(dtype=F32, n_kv_heads=2, head_dim=4, num_layers=LAYERS, page_size=PAGE)
        rope = RotaryEmbedding(16, 4, 10000.0, 16, head_dim=4, interleaved=False)
        layers = [AttentionWithRope(rope=rope, num_attention_heads=4, num_key_value_heads=2,
                                    hidden_size=HIDDEN, kv_params=kvp, use_qk_norm=True,
                                    _fuse_rope_and_store=fuse) for _ in range(2)]
        types = [TensorType(F32, ["total_seq_len", HIDDEN]), TensorType(U32, [Dim("batch") + 1])]
        with Graph("two_layers", input_types=types + kvp.input_types(),
                   input_names=["x", "offs", "blocks", "clen", "lut", "maxl"]) as g:
            x, offs, blocks, clen, lut, maxl = g.inputs
            cache = PagedCacheValues(blocks, clen, lut, maxl)
            h = layers[0](0, x, cache, rope.freqs_cis, offs)
            g.output(layers[1](2, h, cache, rope.freqs_cis, offs))
        return g

    unfused = make(False)
    assert str(run_passes(make(False))) == str(run_passes(make(True)))
    opt = run_passes(make(False))
    assert [n.attrs["layer"] for n in opt.nodes if n.op == "rope_split_store"] == [0, 2]
    rng = np.random.default_rng(5)
    args, weights = _inputs(unfused, 2, rng)
    out_ref, blocks_ref = _run(unfused, args, weights)
    out_opt, blocks_opt = _run(opt, args, weights)
    np.testing.assert_allclose(out_opt, out_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(blocks_opt, blocks_ref, rtol=1e-5, atol=1e-5)
