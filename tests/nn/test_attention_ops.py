"""The attention kernel ops and collectives through the interpreter against ops.attention_math
(itself tested against loops, torch SDPA and HF in tests/ops) and numpy."""
import numpy as np
import pytest

from graphir import ops
from graphir import BufferType, DeviceRef, DType, Graph, TensorType
from graphir.ops import attention_math as am
from graphir.ops import rope_math as rm
from graphir.runtime.interpreter import run

U32, F32 = DType.uint32, DType.float32
NH, NKV, D, PS, L = 4, 2, 8, 4, 2


def batch(rng, cache_lengths=(3, 0, 6), new=(2, 5, 1)):
    need = [-(-(c + n) // PS) for c, n in zip(cache_lengths, new)]
    pages = sum(need) + 1
    order = rng.permutation(pages)
    lut = np.full((3, max(need)), pages, np.uint32)
    k = 0
    for b, n in enumerate(need):
        lut[b, :n] = order[k:k + n]
        k += n
    blocks = rng.standard_normal((pages + 1, 2, L, PS, NKV, D)).astype(np.float32)
    offs = np.concatenate([[0], np.cumsum(new)]).astype(np.uint32)
    return blocks, offs, np.asarray(cache_lengths, np.uint32), lut


def types(width):
    return [TensorType(F32, ["t", width]), TensorType(F32, [64, D]),
            BufferType(F32, ["p", 2, L, PS, NKV, D]), TensorType(U32, ["b + 1"]),
            TensorType(U32, ["b"]), TensorType(U32, ["b", "m"])]


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_rope_split_store_and_attention_ops(interleaved, qk_norm):
    rng = np.random.default_rng(int(interleaved) * 2 + int(qk_norm))
    blocks, offs, clen, lut = batch(rng)
    freqs = rm.rope_freqs_cis(D, 32, 10000.0)
    qkv = rng.standard_normal((int(offs[-1]), (NH + 2 * NKV) * D)).astype(np.float32)
    nw = [rng.standard_normal(D).astype(np.float32) for _ in range(2)]
    extra = [TensorType(F32, [D])] * 2 if qk_norm else []
    with Graph("rss", input_types=types((NH + 2 * NKV) * D) + extra) as g:
        x, f, bl, o, c, lt, *norms = g.inputs
        q = ops.rope_split_store(x, f, o, c, lt, bl, n_heads=NH, n_kv_heads=NKV, head_dim=D,
                                 layer_idx=1, interleaved=interleaved,
                                 q_norm_weight=norms[0] if norms else None,
                                 k_norm_weight=norms[1] if norms else None, qk_norm_eps=1e-5)
        g.output(q, ops.flash_attention_ragged(q, bl, o, c, lt, n_heads=NH, n_kv_heads=NKV,
                                               head_dim=D, layer_idx=1))
    want_blocks = blocks.copy()
    want_q, want_blocks = am.rope_split_store(
        qkv, freqs, offs, clen, lut, want_blocks, layer_idx=1, n_heads=NH, n_kv_heads=NKV,
        head_dim=D, interleaved=interleaved, q_norm_weight=nw[0] if qk_norm else None,
        k_norm_weight=nw[1] if qk_norm else None, eps=1e-5)
    args = [qkv, freqs, blocks, offs, clen, lut] + (nw if qk_norm else [])
    got_q, got_o = run(g, *args)
    np.testing.assert_allclose(got_q, want_q, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(blocks, want_blocks, rtol=1e-6, atol=1e-6)
    want_o = am.flash_attention_ragged(got_q.reshape(-1, NH, D), blocks, layer_idx=1,
                                       input_row_offsets=offs, cache_lengths=clen,
                                       lookup_table=lut, mask_variant="causal",
                                       scale=D ** -0.5)
    np.testing.assert_allclose(got_o, want_o.reshape(got_o.shape), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mask, window", [("causal", None), ("null", None),
                                          ("sliding_window_causal", 3),
                                          ("sliding_window_noncausal", 3),
                                          ("chunked_causal", 4)])
def test_flash_attention_masks_and_unfused_ops(mask, window):
    rng = np.random.default_rng(7)
    blocks, offs, clen, lut = batch(rng)
    freqs = rm.rope_freqs_cis(D, 32, 10000.0)
    t = int(offs[-1])
    q, k, v = (rng.standard_normal((t, n * D)).astype(np.float32) for n in (NH, NKV, NKV))
    with Graph("unfused", input_types=types(NH * D) + [TensorType(F32, ["t", NKV * D])] * 2) as g:
        xq, f, bl, o, c, lt, xk, xv = g.inputs
        qr = ops.rope(xq, f, o, c, head_dim=D, interleaved=False)
        ops.kv_cache_store(ops.rope(xk, f, o, c, head_dim=D, interleaved=False), bl, o, c, lt,
                           kind=0, layer_idx=0)
        ops.kv_cache_store(xv, bl, o, c, lt, kind=1, layer_idx=0)
        g.output(ops.flash_attention_ragged(qr, bl, o, c, lt, n_heads=NH, n_kv_heads=NKV,
                                            head_dim=D, layer_idx=0, mask_variant=mask,
                                            window=window, scale=0.3))
    ref_blocks = blocks.copy()
    _, pos = am.token_positions(offs, clen)
    rope = lambda x: rm.apply_rope(x.reshape(t, -1, D), freqs, pos, interleaved=False)  # noqa
    ref_blocks = am.kv_cache_store(ref_blocks, rope(k), 0, 0, offs, clen, lut)
    ref_blocks = am.kv_cache_store(ref_blocks, v.reshape(t, NKV, D), 1, 0, offs, clen, lut)
    want = am.flash_attention_ragged(rope(q), ref_blocks, layer_idx=0, input_row_offsets=offs,
                                     cache_lengths=clen, lookup_table=lut, mask_variant=mask,
                                     window=window, scale=0.3)
    (got,) = run(g, q, freqs, blocks, offs, clen, lut, k, v)
    np.testing.assert_allclose(got, want.reshape(t, -1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(blocks, ref_blocks, rtol=1e-6, atol=1e-6)


def test_fused_qkv_matmul_with_bias():
    rng = np.random.default_rng(8)
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in ((5, 12), (20, 12), (20,)))
    with Graph("qkv", input_types=[TensorType(F32, ["t", 12]), TensorType(F32, [20, 12]),
                                   TensorType(F32, [20])]) as g:
        g.output(ops.fused_qkv_matmul(*g.inputs))
    (got,) = run(g, x, w, b)
    np.testing.assert_allclose(got, x.astype(np.float64) @ w.T + b, rtol=1e-5, atol=1e-6)


def test_allreduce_and_allgather_over_virtual_devices():
    devs = [DeviceRef.CPU(i) for i in range(3)]
    rng = np.random.default_rng(9)
    xs = [rng.standard_normal((2, 3)).astype(np.float32) for _ in devs]
    with Graph("coll", input_types=[TensorType(F32, [2, 3], d) for d in devs]) as g:
        red = ops.allreduce(g.inputs)
        gat = ops.allgather(g.inputs, axis=1)
        assert [r.device for r in red] == devs and gat[2].shape[1] == 9
        g.output(*red, *gat)
    outs = run(g, *xs)
    for y in outs[:3]:
        np.testing.assert_allclose(y, xs[0] + xs[1] + xs[2], rtol=1e-6)
    for y in outs[3:]:
        np.testing.assert_array_equal(y, np.concatenate(xs, axis=1))
    with Graph("same", input_types=[TensorType(F32, [2, 3])] * 2) as g:
        with pytest.raises(ValueError, match="inputs must be on distinct devices"):
            ops.allreduce(g.inputs)


def test_rope_split_store_with_qk_norm_takes_an_empty_batch():
    # A data-parallel device can get no rows in a step: the op must pass through untouched.
    rng = np.random.default_rng(7)
    blocks, _, _, _ = batch(rng)
    before = blocks.copy()
    with Graph("rss0", input_types=types((NH + 2 * NKV) * D) + [TensorType(F32, [D])] * 2) as g:
        x, f, bl, o, c, lt, qw, kw = g.inputs
        g.output(ops.rope_split_store(x, f, o, c, lt, bl, n_heads=NH, n_kv_heads=NKV, head_dim=D,
                                      layer_idx=1, q_norm_weight=qw, k_norm_weight=kw))
    (q,) = run(g, np.zeros((0, (NH + 2 * NKV) * D), np.float32), rm.rope_freqs_cis(D, 32, 1e4),
               blocks, np.zeros(1, np.uint32), np.zeros(0, np.uint32), np.zeros((0, 1), np.uint32),
               rng.standard_normal(D).astype(np.float32), rng.standard_normal(D).astype(np.float32))
    assert q.shape == (0, NH * D)
    np.testing.assert_array_equal(blocks, before)
