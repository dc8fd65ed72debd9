"""MLA kernels under Triton's interpreter (conftest.py) against ops.mla_math's float64 references:
the latent cache store (both RoPE pairings, 1- and 2-slot caches, bf16 cache), the prefill plan,
and attention by both paths (absorbed split-K, decompressed) over a ragged batch with cached
prefixes, a sequence without new tokens, speculative multi-token decode and a long context."""
import numpy as np
import pytest
import torch

from graphir.lowering.triton_gpu.kernels import mla_decode as md
from graphir.lowering.triton_gpu.kernels import mla_launch as ml
from graphir.ops import mla_math as mm
from tests.nn.harness import LAYER, mla_op_inputs

NH, NOPE, ROPE, V, R = 3, 8, 6, 5, 16
SCALE = 0.21


def inputs(kinds: int, seed: int = 0):
    rng = np.random.default_rng(seed + kinds)
    return mla_op_inputs(rng, kinds, nh=NH, nope=NOPE, rope=ROPE, v=V, r=R, kv_b_scale=0.3)


def t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


@pytest.mark.parametrize("kinds,interleaved,cache_dt", [(1, True, "f32"), (2, False, "f32"),
                                                        (1, False, "bf16")])
def test_cache_store(kinds, interleaved, cache_dt):
    q, kv, normw, freqs, offs, clen, lut, blocks, *_ = inputs(kinds)
    want = mm.mla_cache_store(blocks, kv, normw, freqs, offs, clen, lut, layer_idx=LAYER,
                              kv_lora_rank=R, interleaved=interleaved, eps=1e-6)
    got = t(blocks)
    if cache_dt == "bf16":
        got = got.to(torch.bfloat16)
        before = got.clone()
    ml.cache_store(t(kv), t(normw), t(freqs), t(offs), t(clen), t(lut), got, kv_lora_rank=R,
                   layer=LAYER, interleaved=interleaved)
    if cache_dt == "bf16":
        written = (got != before).any(-1)
        np.testing.assert_allclose(got.float().numpy()[written.numpy()],
                                   want[written.numpy()], rtol=1e-2, atol=1e-2)
        assert int(written.sum()) == kv.shape[0]
    else:
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


def test_prefill_plan():
    offs = np.array([0, 3, 3, 8, 9], np.uint32)
    clen = np.array([6, 4, 0, 2], np.uint32)
    want = mm.mla_prefill_plan(offs, clen)
    got = ml.prefill_plan(t(offs), t(clen))
    for g, w in zip(got, want):
        assert g.numpy().tolist() == w.astype(np.int64).tolist()
    big = np.arange(0, 2 * 1500 + 1, 2, dtype=np.uint32)  # more sequences than one BLOCK
    bc = np.full(1500, 3, np.uint32)
    rows, starts, total = ml.prefill_plan(t(big), t(bc))
    assert rows.numpy().tolist() == mm.mla_prefill_plan(big, bc)[0].tolist()
    assert int(total[0]) == 1500 * 5


def reference(q, blocks, offs, clen, lut, w_k, w_uk, w_uv):
    kw = dict(layer_idx=LAYER, input_row_offsets=offs, cache_lengths=clen, lookup_table=lut,
              qk_rope_head_dim=ROPE, scale=SCALE)
    q3 = q.reshape(q.shape[0], NH, NOPE + ROPE)
    dec = mm.mla_decode(q3, blocks, w_uk, w_uv, **kw).reshape(q.shape[0], -1)
    pre = mm.mla_prefill(q3, blocks, w_k, w_uv, buffer_size=4, **kw).reshape(q.shape[0], -1)
    np.testing.assert_allclose(dec, pre, rtol=1e-9, atol=1e-9)
    return dec


def run(path, q, blocks, offs, clen, lut, w1, w_uv, **kw):
    return ml.attention(t(q), t(blocks), t(offs), t(clen), t(lut), t(w1), t(w_uv), n_heads=NH,
                        qk_nope_head_dim=NOPE, qk_rope_head_dim=ROPE, v_head_dim=V,
                        kv_lora_rank=R, layer=LAYER, scale=SCALE, path=path, **kw).numpy()


@pytest.mark.parametrize("kinds", [1, 2])
@pytest.mark.parametrize("path,parts", [("absorbed", None), ("absorbed", 3),
                                        ("decompressed", None)])
def test_attention_ragged_with_cached_prefix(kinds, path, parts):
    q, kv, normw, freqs, offs, clen, lut, blocks, w_k, w_uk, w_uv = inputs(kinds)
    want = reference(q, blocks, offs, clen, lut, w_k, w_uk, w_uv)
    kw = {} if parts is None else {"num_parts": parts}
    got = run(path, q, blocks, offs, clen, lut, w_uk if path == "absorbed" else w_k, w_uv, **kw)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_empty_sequences_and_multi_token_decode():
    # Sequence 1 brings no new token; the others 1 and 2 (speculative decode) over long prefixes.
    rng = np.random.default_rng(5)
    *_, blocks, w_k, w_uk, w_uv = inputs(1, seed=5)
    pages = blocks.shape[0] - 1
    lut = np.array([[3, 7, 1, 0], [2, 12, 12, 12], [5, 4, 6, 8]], np.uint32)
    clen = np.array([13, 3, 9], np.uint32)
    offs = np.array([0, 1, 1, 3], np.uint32)
    assert lut.max() <= pages
    q = rng.standard_normal((3, NH * (NOPE + ROPE))).astype(np.float32)
    want = reference(q, blocks, offs, clen, lut, w_k, w_uk, w_uv)
    for path, parts in (("absorbed", None), ("absorbed", 4), ("decompressed", None)):
        kw = {} if parts is None else {"num_parts": parts}
        got = run(path, q, blocks, offs, clen, lut, w_uk if path == "absorbed" else w_k, w_uv,
                  **kw)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"{path} {parts}")


def test_pages_that_hold_whole_key_blocks():
    # Page 32 >= BLOCK_N: the absorbed kernel reads a key block with one lookup (dense rows);
    # a sequence spans three pages in shuffled order, another ends mid-page.
    rng = np.random.default_rng(11)
    page, pages = 32, 7
    blocks = rng.standard_normal((pages, 1, 2, page, 1, R + ROPE)).astype(np.float32)
    blocks[4, 0, LAYER, 20:] = np.nan       # past sequence 1's end: must never be read
    lut = np.array([[5, 0, 3], [4, 6, 6]], np.uint32)
    clen = np.array([70, 17], np.uint32)
    offs = np.array([0, 2, 3], np.uint32)
    *_, w_k, w_uk, w_uv = inputs(1, seed=11)
    q = rng.standard_normal((3, NH * (NOPE + ROPE))).astype(np.float32)
    want = reference(q, blocks, offs, clen, lut, w_k, w_uk, w_uv)
    for path, parts in (("absorbed", None), ("absorbed", 2), ("decompressed", None)):
        kw = {} if parts is None else {"num_parts": parts}
        got = run(path, q, blocks, offs, clen, lut, w_uk if path == "absorbed" else w_k, w_uv,
                  **kw)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"{path} {parts}")


def test_bfloat16_absorbed_and_decompressed():
    q, kv, normw, freqs, offs, clen, lut, blocks, w_k, w_uk, w_uv = inputs(1, seed=9)
    bf = lambda a: t(a).to(torch.bfloat16)  # noqa: E731
    want = reference(*(bf(a).double().numpy() for a in (q, blocks)), offs, clen, lut,
                     *(bf(a).double().numpy() for a in (w_k, w_uk, w_uv)))
    for path, w1 in (("absorbed", w_uk), ("decompressed", w_k)):
        got = ml.attention(bf(q), bf(blocks), t(offs), t(clen), t(lut), bf(w1), bf(w_uv),
                           n_heads=NH, qk_nope_head_dim=NOPE, qk_rope_head_dim=ROPE,
                           v_head_dim=V, kv_lora_rank=R, layer=LAYER, scale=SCALE, path=path)
        err = np.linalg.norm(got.float().numpy() - want) / np.linalg.norm(want)
        assert err < 2e-2, (path, err)


def test_split_rule_expressions_match_python():
    from graphir.runtime.cuda.plan_values import evaluate

    conf = md.tile_config(128, 512)
    for batch, tiles, kv_len in [(1, 2, 4096), (64, 1, 4096), (128, 2, 4096), (3, 1, 17),
                                 (1, 1, 1)]:
        env = {"b": batch, "t": tiles, "k": kv_len}
        for name, expr in md.split_lets("b", "t", "k", conf):
            env[name] = evaluate(expr, env)
        assert (env["mla_num_parts"], env["mla_part_size"]) == md.split(batch, tiles, kv_len,
                                                                        conf)
        assert env["mla_num_parts"] * env["mla_part_size"] >= kv_len
