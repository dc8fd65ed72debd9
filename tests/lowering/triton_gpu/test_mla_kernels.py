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


@pytest.mark.parametrize("aux_block_t,merge", [(32, "fused"), (64, "fused"), (16, "split"),
                                               (64, "split")])
def test_absorption_and_merge_token_blocks(aux_block_t, merge):
    # 70 new tokens (more than one block of the absorption and the merge at 32 and 64 tokens a
    # program, the last one partial) over cached prefixes, two partitions to merge; a sequence
    # with no new token, and short ones whose second partition holds no key (sum 0). "split": the
    # partials combined into o_lat by one launch, multiplied by w_uv in another (mla_merge.py).
    rng = np.random.default_rng(aux_block_t)
    *_, blocks, w_k, w_uk, w_uv = inputs(1, seed=7)
    pages = blocks.shape[0] - 1
    new = np.array([30, 1, 0, 39], np.uint32)
    clen = np.array([2, 20, 5, 0], np.uint32)
    offs = np.concatenate([[0], np.cumsum(new)]).astype(np.uint32)
    per = -(-int((clen + new).max()) // blocks.shape[3])
    lut = rng.integers(0, pages, size=(4, per)).astype(np.uint32)
    q = rng.standard_normal((int(offs[-1]), NH * (NOPE + ROPE))).astype(np.float32)
    want = reference(q, blocks, offs, clen, lut, w_k, w_uk, w_uv)
    got = run("absorbed", q, blocks, offs, clen, lut, w_uk, w_uv, num_parts=2,
              aux_block_t=aux_block_t, merge=merge)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="aux_block_t"):
        md.specs("bfloat16", "bfloat16", NH, NOPE, ROPE, V, R, 1, 16, None, 48)
    with pytest.raises(ValueError, match="merge must be one of"):
        md.specs("bfloat16", "bfloat16", NH, NOPE, ROPE, V, R, 1, 16, None, 16, "both")


def test_pages_that_hold_whole_key_blocks():
    # Page 32 >= BLOCK_N (a 32-key config): the absorbed kernel reads a key block with one
    # lookup (dense rows); a sequence spans three pages in shuffled order, another ends mid-page.
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
        if path == "absorbed":
            kw["conf"] = md.tile_config(NH, R, "m16n32w4s3")
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

    cases = [(1, 2, 4096), (64, 1, 4096), (128, 2, 4096), (3, 1, 17), (1, 1, 1)]
    for conf in (md.tile_config(128, 512), md.tile_config(128, 512, "m128n32w8s2v2"),
                 md.tile_config(16, 512, "m16n32w4s3x4")):
        for batch, tiles, kv_len in cases:
            env = {"b": batch, "t": tiles, "k": kv_len}
            for name, expr in md.split_lets("b", "t", "k", conf):
                env[name] = evaluate(expr, env)
            assert (env["mla_num_parts"], env["mla_part_size"]) == md.split(batch, tiles,
                                                                            kv_len, conf)
            assert env["mla_num_parts"] * env["mla_part_size"] >= kv_len


# Every candidate config of the absorbed attention kernel (md.CANDIDATES, the GPU sweep's
# choices) on fresh data with R = 32 (so VSPLIT 2 keeps 16 value columns): pages of 4 (keys
# looked up one by one) and of 64 (a key block in one page: dense rows), two partitions, a
# multi-token sequence whose rows straddle tiles, NaN past the sequences' ends.
RC = 32


def candidate_case(seed: int, page: int):
    rng = np.random.default_rng(seed)
    kv_b = (rng.standard_normal((NH, NOPE + V, RC)) * 0.3).astype(np.float32)
    w_uk, w_uv = kv_b[:, :NOPE].copy(), kv_b[:, NOPE:].transpose(0, 2, 1).copy()
    clen = np.array([2 * page + 5, 0, page - 3], np.uint32)
    offs = np.array([0, 1, 3, 7], np.uint32)
    pages_per = (int((clen + np.diff(offs)).max()) + page - 1) // page
    n_pages = 3 * pages_per + 1
    lut = rng.permutation(3 * pages_per).astype(np.uint32).reshape(3, pages_per)
    blocks = rng.standard_normal((n_pages, 1, 2, page, 1, RC + ROPE)).astype(np.float32)
    for b in range(3):
        n = int(clen[b] + offs[b + 1] - offs[b])
        if n % page:
            blocks[lut[b, n // page], 0, LAYER, n % page:] = np.nan
    q = rng.standard_normal((7, NH * (NOPE + ROPE))).astype(np.float32)
    kw = dict(layer_idx=LAYER, input_row_offsets=offs, cache_lengths=clen, lookup_table=lut,
              qk_rope_head_dim=ROPE, scale=SCALE)
    want = mm.mla_decode(q.reshape(7, NH, NOPE + ROPE), blocks, w_uk, w_uv, **kw)
    return (q, blocks, offs, clen, lut, w_uk, w_uv), want.reshape(7, -1)


@pytest.mark.parametrize("name", sorted(md.CANDIDATES))
def test_every_candidate_config_matches_the_reference(name):
    conf = md.tile_config(NH, RC, name)
    for i, (page, parts) in enumerate(((4, None), (64, 2))):
        args, want = candidate_case(sum(map(ord, name)) + i, page)
        got = ml.attention(*map(t, args), n_heads=NH, qk_nope_head_dim=NOPE,
                           qk_rope_head_dim=ROPE, v_head_dim=V, kv_lora_rank=RC, layer=LAYER,
                           scale=SCALE, path="absorbed", num_parts=parts, conf=conf).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"page {page}")


def test_candidates_and_defaults():
    assert all(md.DEFAULTS[b] in md.CANDIDATES for b in (16, 32, 64, 128))
    for nh in (16, 128):
        names = md.candidates(nh)
        assert names[0] == md.DEFAULTS[md.head_bucket(nh)] and len(names) > 2
    assert md.tile_config(128, 512) == md.CANDIDATES[md.DEFAULTS[128]]
    with pytest.raises(ValueError):
        md.tile_config(3, 16, "m64n32w4s2v2")        # 8 value columns per half


def test_ws_configs_take_deepseek_sizes_and_fall_back_elsewhere():
    # The Gluon kernel takes 16-bit q and cache of one dtype, R = 512 and pages of whole key
    # blocks; elsewhere the same config runs its Triton twin (same tiles, same arguments). Under
    # the interpreter the twin runs in the Gluon kernel's place.
    from graphir.lowering.triton_gpu.kernels import mla_decode_seesaw as ss
    from graphir.lowering.triton_gpu.kernels import mla_decode_ws as ws

    name = md.DEFAULTS[128]
    assert md.CANDIDATES[name].get("WS")
    kernel = ss.mla_absorbed_seesaw_kernel if md.CANDIDATES[name].get("SEESAW") else \
        ws.mla_absorbed_ws_kernel
    for dt in ("bfloat16", "float16"):
        attn = md.specs(dt, dt, 128, 128, 64, 128, 512, 1, 64, name)[1]
        assert attn.fn is kernel and attn.num_warps == 4
        twin = attn.interpretable()
        assert twin.fn is md.mla_absorbed_kernel and twin.num_warps == 8
        assert twin.runtime_params() == attn.runtime_params()
        assert twin.grid_for(batch=3, seqmax=2, num_parts=5) == \
            attn.grid_for(batch=3, seqmax=2, num_parts=5)
    for dt, cdt, r, page in (("float32", "float32", 512, 64), ("bfloat16", "float32", 512, 64),
                             ("bfloat16", "bfloat16", 256, 64), ("bfloat16", "bfloat16", 512, 16)):
        attn = md.specs(dt, cdt, 128, 128, 64, 128, r, 1, page, name)[1]
        assert attn.fn is md.mla_absorbed_kernel, (dt, cdt, r, page)
        assert attn.constexprs["BLOCK_M"] == 64 and attn.num_warps == 8
    # The shipped default of a float32 layer over R > 128 is the 16-row tile (the 64-row ones
    # exceed sm_90's shared memory there); specs and the plan's split resolve it alike.
    for dt, cdt in (("float32", "float32"), ("bfloat16", "float32")):
        conf = md.layer_config(128, 512, dt, cdt, 64, 64)
        assert conf == md.tile_config(128, 512, md.WIDE_FP32)
        assert md.specs(dt, cdt, 128, 128, 64, 128, 512, 1, 64)[1].constexprs["BLOCK_M"] == 16
    assert md.layer_config(128, 64, "float32", "float32", 16, 64)["BLOCK_M"] == 64
    with pytest.raises(ValueError, match="64 rows"):
        md.tile_config(128, 512, {**md.CANDIDATES[name], "BLOCK_M": 128})


def test_gpu_test_covers_every_ws_config():
    from tests.gpu import test_mla_ws_gpu as gt

    assert sorted(gt.WS_CONFIGS) == sorted(n for n, c in md.CANDIDATES.items() if c.get("WS"))
    assert gt.SHIPPED == md.DEFAULTS[128] == md.DEFAULTS[64]
