"""ops.attention_math and ops.rope_math against loop-based references, torch and Hugging Face
rope init functions."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from graphir.ops import attention_math as am
from graphir.ops import rope_math as rm

torch.set_default_dtype(torch.float64)


# ---- independent references ---------------------------------------------------------------------

def loop_positions(offs, cache_lengths):
    seq, pos = [], []
    for b in range(len(offs) - 1):
        for i in range(offs[b + 1] - offs[b]):
            seq.append(b)
            pos.append(cache_lengths[b] + i)
    return seq, pos


def torch_rope(x, freqs, positions, interleaved):
    """RoPE as a complex multiply: pairs become complex numbers, the table row is e^{i angle}."""
    x = torch.as_tensor(x, dtype=torch.float64)
    f = torch.as_tensor(np.asarray(freqs, dtype=np.float64))[torch.as_tensor(positions)]
    rot = torch.complex(f[:, 0::2], f[:, 1::2])[:, None, :]
    d = x.shape[-1]
    if interleaved:
        xc = torch.view_as_complex(x.reshape(*x.shape[:-1], d // 2, 2).contiguous())
        return torch.view_as_real(xc * rot).reshape(x.shape).numpy()
    xc = torch.complex(x[..., : d // 2], x[..., d // 2:]) * rot
    return torch.cat([xc.real, xc.imag], dim=-1).numpy()


def loop_mask(variant, qp, kp, w):
    if variant == "causal":
        return kp <= qp
    if variant == "null":
        return True
    if variant == "sliding_window_causal":
        return kp <= qp and qp - kp < w
    if variant == "sliding_window_noncausal":
        return qp - kp < w
    assert variant == "chunked_causal"
    return kp <= qp and kp // w == qp // w


def loop_gather(blocks, lut, b, layer, n):
    ps = blocks.shape[3]
    k = np.stack([blocks[lut[b, p // ps], 0, layer, p % ps] for p in range(n)])
    v = np.stack([blocks[lut[b, p // ps], 1, layer, p % ps] for p in range(n)])
    return k.astype(np.float64), v.astype(np.float64)


def loop_attention(q, blocks, layer, offs, cl, lut, variant, window, scale, softcap=None):
    nh, nkv = q.shape[1], blocks.shape[4]
    out = np.zeros(q.shape)
    for b in range(len(cl)):
        total = cl[b] + offs[b + 1] - offs[b]
        k, v = loop_gather(blocks, lut, b, layer, total)
        for i in range(offs[b + 1] - offs[b]):
            t, qp = offs[b] + i, cl[b] + i
            for h in range(nh):
                kh = h // (nh // nkv)
                keys = [kp for kp in range(total) if loop_mask(variant, qp, kp, window)]
                s = [scale * float(np.dot(q[t, h], k[kp, kh])) for kp in keys]
                if softcap is not None:
                    s = [softcap * math.tanh(x / softcap) for x in s]
                if not keys:
                    continue
                m = max(s)
                e = [math.exp(x - m) for x in s]
                out[t, h] = sum(ei * v[kp, kh] for ei, kp in zip(e, keys)) / sum(e)
    return out


def torch_sdpa(q, blocks, layer, offs, cl, lut, variant, window, scale):
    nh, nkv = q.shape[1], blocks.shape[4]
    outs = []
    for b in range(len(cl)):
        n = offs[b + 1] - offs[b]
        total = cl[b] + n
        k, v = loop_gather(blocks, lut, b, layer, total)
        qp = torch.arange(cl[b], total)[:, None]
        kp = torch.arange(total)[None, :]
        mask = torch.tensor([[loop_mask(variant, int(a), int(c), window) for c in kp[0]] for a in qp[:, 0]])
        qt = torch.as_tensor(q[offs[b]:offs[b + 1]]).transpose(0, 1)[None]
        kt = torch.as_tensor(k).transpose(0, 1).repeat_interleave(nh // nkv, dim=0)[None]
        vt = torch.as_tensor(v).transpose(0, 1).repeat_interleave(nh // nkv, dim=0)[None]
        outs.append(F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale)[0].transpose(0, 1))
    return torch.cat(outs).numpy()


def paged_batch(rng, cache_lengths, new_lengths, *, page_size, num_layers, nkv, d, spare_pages=2):
    """Random blocks (every slot filled, the null page too) and a shuffled page assignment."""
    need = [-(-(c + n) // page_size) for c, n in zip(cache_lengths, new_lengths)]
    total_pages = sum(need) + spare_pages
    order = rng.permutation(total_pages)
    lut = np.full((len(need), max(need) + 1), total_pages, dtype=np.uint32)
    start = 0
    for b, k in enumerate(need):
        lut[b, :k] = order[start:start + k]
        start += k
    blocks = rng.standard_normal((total_pages + 1, 2, num_layers, page_size, nkv, d)).astype(np.float32)
    offs = np.concatenate([[0], np.cumsum(new_lengths)]).astype(np.uint32)
    return blocks, lut, offs, np.asarray(cache_lengths, dtype=np.uint32)


# ---- frequencies --------------------------------------------------------------------------------

def test_freqs_plain_matches_loop():
    d, msl, theta = 8, 5, 10000.0
    f = rm.rope_freqs_cis(d, msl, theta)
    assert f.shape == (2 * msl, d) and f.dtype == np.float32
    for p in range(2 * msl):
        for i in range(d // 2):
            ang = np.float32(p) * np.float32(1.0 / theta ** (2 * i / d))
            assert f[p, 2 * i] == pytest.approx(math.cos(float(ang)), abs=1e-7)
            assert f[p, 2 * i + 1] == pytest.approx(math.sin(float(ang)), abs=1e-7)


def _hf_table(inv, msl, mag):
    ang = torch.outer(torch.arange(2 * msl, dtype=torch.float32), inv.float())
    out = torch.stack([ang.cos() * mag, ang.sin() * mag], dim=-1).reshape(2 * msl, -1)
    return out.double().numpy()


def test_freqs_llama3_matches_hf():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    d, theta, orig = 32, 500000.0, 64
    params = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=orig)
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=2, head_dim=d, max_position_embeddings=256,
                      rope_parameters={"rope_type": "llama3", "rope_theta": theta, "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": orig})
    hf_inv, hf_mag = ROPE_INIT_FUNCTIONS["llama3"](cfg)
    plain = rm.rope_inv_freq(d, theta)
    wavelen = 2 * np.pi / plain
    # The data must exercise all three branches (kept, divided, smoothed).
    assert (wavelen < orig / 4).any() and (wavelen > orig).any() and ((wavelen > orig / 4) & (wavelen < orig)).any()
    inv = rm.rope_inv_freq(d, theta, rm.Llama3RopeScaling(**params))
    np.testing.assert_allclose(inv, hf_inv.numpy(), rtol=2e-6)
    assert not np.allclose(inv, plain)
    table = rm.rope_freqs_cis(d, 16, theta, rm.Llama3RopeScaling(**params))
    np.testing.assert_allclose(table, _hf_table(hf_inv, 16, hf_mag), atol=2e-6)


@pytest.mark.parametrize("mscale,mscale_all_dim", [(1.0, 1.0), (0.707, 1.0), (1.0, 0.0)])
def test_freqs_yarn_matches_hf_deepseek(mscale, mscale_all_dim):
    from transformers import DeepseekV3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    d, theta, factor, orig = 16, 10000.0, 40.0, 4096
    cfg = DeepseekV3Config(hidden_size=64, num_attention_heads=2, qk_rope_head_dim=d, qk_nope_head_dim=16,
                           v_head_dim=16, kv_lora_rank=32, q_lora_rank=None,
                           max_position_embeddings=int(orig * factor),
                           rope_parameters={"rope_type": "yarn", "rope_theta": theta, "factor": factor,
                                            "original_max_position_embeddings": orig, "beta_fast": 32,
                                            "beta_slow": 1, "mscale": mscale, "mscale_all_dim": mscale_all_dim})
    hf_inv, hf_mag = ROPE_INIT_FUNCTIONS["yarn"](cfg)
    scaling = rm.YarnRopeScaling(factor=factor, original_max_position=orig, mscale=mscale,
                                 mscale_all_dim=mscale_all_dim)
    inv = rm.rope_inv_freq(d, theta, scaling)
    np.testing.assert_allclose(inv, hf_inv.numpy(), rtol=2e-6)
    ratio = inv / rm.rope_inv_freq(d, theta)
    assert ratio[0] == pytest.approx(1.0) and ratio[-1] == pytest.approx(1 / factor)
    assert ((ratio < 0.99) & (ratio > 1.01 / factor)).any()  # the ramp is exercised
    table = rm.rope_freqs_cis(d, 16, theta, scaling)
    np.testing.assert_allclose(table, _hf_table(hf_inv, 16, hf_mag), atol=2e-6)


def test_yarn_mscale_matches_hf_mla_softmax_scale():
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf

    for factor, all_dim in [(40.0, 1.0), (4.0, 0.707), (0.5, 1.0)]:
        base = 192 ** -0.5
        ours = base * rm.yarn_mscale(factor, all_dim) ** 2
        ref = hf.yarn_apply_mscale({"rope_type": "yarn", "factor": factor, "mscale_all_dim": all_dim}, base)
        assert ours == pytest.approx(ref, rel=1e-12)
    assert rm.yarn_mscale(0.5, 1.0) == 1.0


def test_scaling_accepts_hf_style_dict():
    d = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "mscale": 0.5,
         "mscale_all_dim": 1.0}
    np.testing.assert_array_equal(rm.rope_freqs_cis(8, 4, 1e4, d), rm.rope_freqs_cis(
        8, 4, 1e4, rm.YarnRopeScaling(factor=4.0, original_max_position=64, mscale=0.5, mscale_all_dim=1.0)))
    with pytest.raises(ValueError, match="unknown rope_type 'ntk'"):
        rm.rope_freqs_cis(8, 4, 1e4, {"rope_type": "ntk"})
    with pytest.raises(ValueError, match="head_dim must be a positive even int"):
        rm.rope_freqs_cis(7, 4, 1e4)


# ---- rope, positions, store ---------------------------------------------------------------------

@pytest.mark.parametrize("interleaved", [True, False])
def test_apply_rope_vs_torch_complex_and_loop(interleaved):
    rng = np.random.default_rng(0)
    t, h, d = 6, 3, 8
    x = rng.standard_normal((t, h, d))
    freqs = rm.rope_freqs_cis(d, 16, 10000.0)
    pos = rng.integers(0, 32, size=t)
    got = rm.apply_rope(x, freqs, pos, interleaved=interleaved)
    np.testing.assert_allclose(got, torch_rope(x, freqs, pos, interleaved), rtol=1e-12, atol=1e-12)
    ref = np.empty_like(x)
    for tok in range(t):
        for i in range(d // 2):
            c, s = float(freqs[pos[tok], 2 * i]), float(freqs[pos[tok], 2 * i + 1])
            ia, ib = (2 * i, 2 * i + 1) if interleaved else (i, i + d // 2)
            a, b = x[tok, :, ia], x[tok, :, ib]
            ref[tok, :, ia], ref[tok, :, ib] = a * c - b * s, a * s + b * c
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)
    assert not np.allclose(got, x)
    with pytest.raises(ValueError, match=r"positions must lie in \[0, 32\)"):
        rm.apply_rope(x, freqs, pos + 32, interleaved=interleaved)


def test_token_positions_vs_loop():
    offs, cl = [0, 3, 3, 4, 9], [2, 7, 0, 5]
    seq, pos = am.token_positions(np.array(offs, np.uint32), np.array(cl, np.uint32))
    rseq, rpos = loop_positions(offs, cl)
    assert seq.tolist() == rseq and pos.tolist() == rpos
    with pytest.raises(ValueError, match="must start at 0 and not decrease"):
        am.token_positions(np.array([0, 3, 2]), np.array([0, 0]))
    with pytest.raises(ValueError, match=r"cache_lengths must be an integer \[2\]"):
        am.token_positions(np.array([0, 3, 4]), np.array([0, 0, 0]))


@pytest.mark.parametrize("which", [0, 1])
def test_kv_cache_store_vs_loop(which):
    rng = np.random.default_rng(1 + which)
    cl, new = [3, 0, 6], [2, 5, 1]
    blocks, lut, offs, cls = paged_batch(rng, cl, new, page_size=4, num_layers=3, nkv=2, d=4)
    vals = rng.standard_normal((sum(new), 2, 4))
    before = blocks.copy()
    out = am.kv_cache_store(blocks, vals, which, 1, offs, cls, lut)
    np.testing.assert_array_equal(blocks, before)  # pure
    ref = blocks.copy()
    for tok, (b, p) in enumerate(zip(*loop_positions(offs.tolist(), cl))):
        ref[lut[b, p // 4], which, 1, p % 4] = vals[tok]
    np.testing.assert_array_equal(out, ref)
    assert out.dtype == blocks.dtype
    with pytest.raises(ValueError, match=r"layer_idx must be an int in \[0, 3\)"):
        am.kv_cache_store(blocks, vals, which, 3, offs, cls, lut)
    with pytest.raises(ValueError, match="which must be 0"):
        am.kv_cache_store(blocks, vals, 2, 0, offs, cls, lut)
    with pytest.raises(ValueError, match="needs lookup_table column"):
        am.kv_cache_store(blocks, vals, which, 0, offs, cls + 8, lut)


@pytest.mark.parametrize("interleaved,qk_norm", [(True, False), (False, True)])
def test_rope_split_store_vs_torch(interleaved, qk_norm):
    rng = np.random.default_rng(3)
    nh, nkv, d, layer = 6, 2, 8, 1
    cl, new = [5, 0], [3, 4]
    blocks, lut, offs, cls = paged_batch(rng, cl, new, page_size=4, num_layers=2, nkv=nkv, d=d)
    t = sum(new)
    qkv = rng.standard_normal((t, (nh + 2 * nkv) * d))
    freqs = rm.rope_freqs_cis(d, 16, 10000.0)
    qw, kw = (rng.standard_normal(d), rng.standard_normal(d)) if qk_norm else (None, None)
    q, out = am.rope_split_store(qkv, freqs, offs, cls, lut, blocks, layer_idx=layer, n_heads=nh,
                                 n_kv_heads=nkv, head_dim=d, interleaved=interleaved,
                                 q_norm_weight=qw, k_norm_weight=kw, eps=1e-6)
    tq, tk, tv = torch.as_tensor(qkv).split([nh * d, nkv * d, nkv * d], dim=1)
    tq, tk, tv = tq.reshape(t, nh, d), tk.reshape(t, nkv, d), tv.reshape(t, nkv, d)
    if qk_norm:
        tq = F.rms_norm(tq, (d,), torch.as_tensor(qw), eps=1e-6)
        tk = F.rms_norm(tk, (d,), torch.as_tensor(kw), eps=1e-6)
    _, pos = loop_positions(offs.tolist(), cl)
    np.testing.assert_allclose(q, torch_rope(tq, freqs, pos, interleaved).reshape(t, nh * d), rtol=1e-10, atol=1e-12)
    kr = torch_rope(tk, freqs, pos, interleaved)
    ref = blocks.copy()
    for tok, (b, p) in enumerate(zip(*loop_positions(offs.tolist(), cl))):
        ref[lut[b, p // 4], 0, layer, p % 4] = kr[tok]
        ref[lut[b, p // 4], 1, layer, p % 4] = tv[tok].numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"qkv must be \[tokens, 80\]"):
        am.rope_split_store(qkv[:, :-1], freqs, offs, cls, lut, blocks, layer_idx=layer, n_heads=nh,
                            n_kv_heads=nkv, head_dim=d, interleaved=interleaved)


# ---- attention ----------------------------------------------------------------------------------

@pytest.mark.parametrize("variant,window", [
    ("causal", None), ("null", None), ("sliding_window_causal", 3),
    ("sliding_window_noncausal", 2), ("chunked_causal", 4), ("CAUSAL_MASK", None),
])
def test_flash_attention_ragged_vs_loop_and_sdpa(variant, window):
    rng = np.random.default_rng(7)
    nh, nkv, d, layer = 6, 2, 8, 1
    cl, new = [5, 0, 9], [3, 4, 1]  # chunked prefill, fresh prefill, decode
    blocks, lut, offs, cls = paged_batch(rng, cl, new, page_size=4, num_layers=2, nkv=nkv, d=d)
    q = rng.standard_normal((sum(new), nh, d))
    scale = 1 / math.sqrt(d)
    got = am.flash_attention_ragged(q, blocks, layer_idx=layer, input_row_offsets=offs, cache_lengths=cls,
                                    lookup_table=lut, mask_variant=variant, window=window, scale=scale)
    name = variant.lower().removesuffix("_mask")
    args = (q, blocks, layer, offs.tolist(), cl, lut, name, window, scale)
    np.testing.assert_allclose(got, loop_attention(*args), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got, torch_sdpa(*args), rtol=1e-10, atol=1e-12)


def test_flash_attention_reads_only_its_layer_and_pages():
    rng = np.random.default_rng(11)
    blocks, lut, offs, cls = paged_batch(rng, [2, 3], [2, 1], page_size=2, num_layers=2, nkv=1, d=4)
    q = rng.standard_normal((3, 2, 4))
    kw = dict(layer_idx=0, input_row_offsets=offs, cache_lengths=cls, lookup_table=lut,
              mask_variant="causal", scale=0.5)
    base = am.flash_attention_ragged(q, blocks, **kw)
    other = blocks.copy()
    other[:, :, 1] = rng.standard_normal(other[:, :, 1].shape)  # other layer
    other[-1] = rng.standard_normal(other[-1].shape)  # null page
    used = set(lut[0, :2].tolist()) | set(lut[1, :2].tolist())
    for p in set(range(blocks.shape[0] - 1)) - used:
        other[p] = rng.standard_normal(other[p].shape)
    np.testing.assert_array_equal(am.flash_attention_ragged(q, other, **kw), base)


def test_masked_softmax_empty_row_gives_zeros():
    s = np.random.default_rng(0).standard_normal((2, 3))
    mask = np.array([[True, False, True], [False, False, False]])
    p = am._masked_softmax(s, mask)
    np.testing.assert_array_equal(p[1], 0.0)
    e = np.exp(s[0, [0, 2]])
    np.testing.assert_allclose(p[0], [e[0] / e.sum(), 0.0, e[1] / e.sum()], rtol=1e-14)


def test_flash_attention_bad_input():
    rng = np.random.default_rng(0)
    blocks, lut, offs, cls = paged_batch(rng, [1], [2], page_size=2, num_layers=1, nkv=2, d=4)
    q = rng.standard_normal((2, 4, 4))
    kw = dict(layer_idx=0, input_row_offsets=offs, cache_lengths=cls, lookup_table=lut, scale=1.0)
    with pytest.raises(ValueError, match="unknown mask_variant 'diagonal'"):
        am.flash_attention_ragged(q, blocks, mask_variant="diagonal", **kw)
    with pytest.raises(ValueError, match="needs an int window >= 1"):
        am.flash_attention_ragged(q, blocks, mask_variant="chunked_causal", **kw)
    with pytest.raises(ValueError, match="NH a multiple of n_kv_heads 2"):
        am.flash_attention_ragged(q[:, :3], blocks, mask_variant="causal", **kw)
    with pytest.raises(ValueError, match=r"input_row_offsets\[-1\] = 2 but q has 1 rows"):
        am.flash_attention_ragged(q[:1], blocks, mask_variant="causal", **kw)


# ---- linear, YaRN options, LongRoPE, softcap (Hugging Face model loading) -------------------------

def _llama_cfg(d, rope):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, num_attention_heads=2, head_dim=d, max_position_embeddings=256,
                       rope_parameters=rope)


def test_freqs_linear_matches_hf():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    d, theta, factor = 16, 10000.0, 4.0
    hf_inv, hf_mag = ROPE_INIT_FUNCTIONS["linear"](
        _llama_cfg(d, {"rope_type": "linear", "rope_theta": theta, "factor": factor}))
    inv = rm.rope_inv_freq(d, theta, rm.LinearRopeScaling(factor))
    np.testing.assert_allclose(inv, hf_inv.numpy(), rtol=2e-6)
    np.testing.assert_allclose(inv * factor, rm.rope_inv_freq(d, theta), rtol=1e-6)
    table = rm.rope_freqs_cis(d, 16, theta, {"rope_type": "linear", "factor": factor})
    np.testing.assert_allclose(table, _hf_table(hf_inv, 16, hf_mag), atol=2e-6)
    with pytest.raises(ValueError, match="factor must be > 0"):
        rm.rope_inv_freq(d, theta, rm.LinearRopeScaling(0.0))


@pytest.mark.parametrize("truncate,attention_factor,betas", [
    (False, None, (32, 1)), (True, 1.7, (8, 2)), (False, 0.9, (16, 1))])
def test_freqs_yarn_options_match_hf(truncate, attention_factor, betas):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    d, theta, factor, orig = 32, 10000.0, 8.0, 32
    rope = {"rope_type": "yarn", "rope_theta": theta, "factor": factor, "beta_fast": betas[0],
            "beta_slow": betas[1], "original_max_position_embeddings": orig, "truncate": truncate}
    if attention_factor is not None:
        rope["attention_factor"] = attention_factor
    hf_inv, hf_mag = ROPE_INIT_FUNCTIONS["yarn"](_llama_cfg(d, rope))
    scaling = rm.YarnRopeScaling(factor=factor, original_max_position=orig, beta_fast=betas[0],
                                 beta_slow=betas[1], mscale=1.0, mscale_all_dim=0.0,
                                 attention_factor=attention_factor, truncate=truncate)
    inv = rm.rope_inv_freq(d, theta, scaling)
    np.testing.assert_allclose(inv, hf_inv.numpy(), rtol=2e-6)
    assert rm.rope_table_magnitude(scaling) == pytest.approx(hf_mag, rel=1e-12)
    table = rm.rope_freqs_cis(d, 16, theta, scaling)
    np.testing.assert_allclose(table, _hf_table(hf_inv, 16, hf_mag), atol=2e-6)


def test_yarn_truncate_changes_the_ramp():
    kw = dict(factor=8.0, original_max_position=32, beta_fast=32, beta_slow=1)
    a = rm.rope_inv_freq(32, 1e4, rm.YarnRopeScaling(**kw, truncate=True))
    b = rm.rope_inv_freq(32, 1e4, rm.YarnRopeScaling(**kw, truncate=False))
    assert not np.allclose(a, b)


def test_freqs_longrope_matches_hf_short_and_long():
    from transformers import Phi3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rng = np.random.default_rng(3)
    d, theta, orig, max_pos = 16, 10000.0, 12, 48
    short = (1 + rng.random(d // 2) * 0.5).tolist()
    long = (2 + rng.random(d // 2) * 4).tolist()
    cfg = Phi3Config(hidden_size=64, num_attention_heads=4, max_position_embeddings=max_pos,
                     original_max_position_embeddings=orig,
                     rope_parameters={"rope_type": "longrope", "rope_theta": theta,
                                      "short_factor": short, "long_factor": long})
    hf_short, hf_mag = ROPE_INIT_FUNCTIONS["longrope"](cfg)
    hf_long, _ = ROPE_INIT_FUNCTIONS["longrope"](cfg, seq_len=orig + 1)
    mag = math.sqrt(1 + math.log(max_pos / orig) / math.log(orig))
    assert hf_mag == pytest.approx(mag, rel=1e-12)
    scaling = rm.LongRopeScaling(short, long, orig, mag)
    s, lg = rm.longrope_inv_freqs(d, theta, scaling)
    np.testing.assert_allclose(s, hf_short.numpy(), rtol=2e-6)
    np.testing.assert_allclose(lg, hf_long.numpy(), rtol=2e-6)
    msl = 10  # 20 rows: rows 0..11 short, 12..19 long
    table = rm.rope_freqs_cis(d, msl, theta, scaling)
    np.testing.assert_allclose(table[:orig], _hf_table(hf_short, msl, hf_mag)[:orig], atol=2e-6)
    np.testing.assert_allclose(table[orig:], _hf_table(hf_long, msl, hf_mag)[orig:], atol=2e-6)
    with pytest.raises(ValueError, match="two frequency sets"):
        rm.rope_inv_freq(d, theta, scaling)
    with pytest.raises(ValueError, match="short_factor must hold head_dim / 2 = 8"):
        rm.rope_freqs_cis(d, msl, theta, rm.LongRopeScaling(short[:-1], long, orig, mag))


def test_flash_attention_softcap_vs_loop():
    rng = np.random.default_rng(5)
    nh, nkv, d, layer, cap = 4, 2, 8, 0, 1.5
    cl, new = [4, 0], [3, 5]
    blocks, lut, offs, cls = paged_batch(rng, cl, new, page_size=4, num_layers=1, nkv=nkv, d=d)
    q = rng.standard_normal((sum(new), nh, d)) * 2
    kw = dict(layer_idx=layer, input_row_offsets=offs, cache_lengths=cls, lookup_table=lut,
              mask_variant="sliding_window_causal", window=3, scale=0.5)
    got = am.flash_attention_ragged(q, blocks, softcap=cap, **kw)
    ref = loop_attention(q, blocks, layer, offs.tolist(), cl, lut, "sliding_window_causal", 3, 0.5,
                         softcap=cap)
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12)
    plain = am.flash_attention_ragged(q, blocks, **kw)
    assert np.abs(got - plain).max() > 1e-2  # the cap changes the result at these magnitudes
    np.testing.assert_allclose(am.flash_attention_ragged(q, blocks, softcap=1e6, **kw), plain,
                               rtol=1e-8, atol=1e-9)
    for bad in (0.0, -1.0, "1"):
        with pytest.raises(ValueError, match="softcap must be None or a float > 0"):
            am.flash_attention_ragged(q, blocks, softcap=bad, **kw)

