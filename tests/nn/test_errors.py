"""Bad input to the layers and the attention ops: each a clear error naming what is wrong."""
import warnings

import numpy as np
import pytest

from graphir import ops
from graphir import BufferType, DeviceRef, DType, Graph, TensorType
from graphir.nn import (AttentionWithRope, KVCacheParams, MHAMaskVariant, PagedCacheValues,
                RotaryEmbedding, TensorParallelAttentionWithRope)
from graphir.runtime.interpreter import run
from tests.nn.harness import D, HIDDEN, LAYERS, NH, NKV, PAGE, layer_graph

U32 = DType.uint32


def make(nh=NH, nkv=NKV, **opts):
    rope = RotaryEmbedding(HIDDEN, nh, 10000.0, 64, head_dim=D)
    kvp = KVCacheParams(dtype=DType.float32, n_kv_heads=nkv, head_dim=D, num_layers=LAYERS,
                        page_size=PAGE, devices=tuple(opts.get("devices", [DeviceRef.CPU()])))
    cls = opts.pop("cls", AttentionWithRope)
    return cls(rope=rope, num_attention_heads=nh, num_key_value_heads=nkv, hidden_size=HIDDEN,
               kv_params=kvp, **opts)


def test_head_counts_that_do_not_divide():
    with pytest.raises(ValueError, match="num_attention_heads 6 is not divisible by "
                                         "num_key_value_heads 4"):
        make(nh=6, nkv=4)
    devs3 = [DeviceRef.CPU(i) for i in range(3)]
    with pytest.raises(ValueError, match="num_attention_heads 4 is not divisible by the 3 devices"):
        make(cls=TensorParallelAttentionWithRope, devices=devs3)
    with pytest.raises(ValueError, match="6 query heads and 3 KV heads cannot be split over 2"):
        make(nh=6, nkv=3, cls=TensorParallelAttentionWithRope,
             devices=[DeviceRef.CPU(0), DeviceRef.CPU(1)])
    with pytest.raises(ValueError, match="needs at least 2 devices"):
        make(cls=TensorParallelAttentionWithRope)


def test_unknown_mask_variant_and_missing_window():
    with pytest.raises(ValueError, match="unknown mask variant 'diagonal'"):
        make(mask_variant="diagonal")
    with pytest.raises(ValueError, match="sliding_window .*SLIDING_WINDOW_CAUSAL_MASK.* must be "
                                         "a positive int, got None"):
        make(mask_variant=MHAMaskVariant.SLIDING_WINDOW_CAUSAL_MASK)
    assert make(mask_variant="chunked_causal", sliding_window=4).mask_variant is \
        MHAMaskVariant.CHUNKED_CAUSAL_MASK


def test_load_state_dict_errors():
    attn = make()
    w = {"q_proj.weight": np.ones((NH * D, HIDDEN), np.float32),
         "k_proj.weight": np.ones((NKV * D, HIDDEN), np.float32),
         "v_proj.weight": np.ones((NKV * D, HIDDEN), np.float32)}
    with pytest.raises(ValueError, match=r"missing weights \['o_proj.weight'\]"):
        attn.load_state_dict(w)
    w["o_proj.weight"] = np.ones((HIDDEN, NH * D + 1), np.float32)
    with pytest.raises(ValueError, match=r"o_proj.weight.*expected shape \[64, 64\], got \[64, 65\]"):
        attn.load_state_dict(w)
    w["o_proj.weight"] = np.ones((HIDDEN, NH * D), np.float32)
    with pytest.raises(ValueError, match=r"unexpected weights \['q_proj.bias'\]"):
        attn.load_state_dict({**w, "q_proj.bias": np.ones(NH * D, np.float32)})
    attn.load_state_dict(w)
    assert sorted(attn.state_dict()) == sorted(w)


def test_bad_constructor_options():
    with pytest.raises(ValueError, match="stacked_qkv does not support has_bias"):
        make(stacked_qkv=True, has_bias=True)
    rope = RotaryEmbedding(HIDDEN, NH, 10000.0, 64, head_dim=8)
    kvp = KVCacheParams(dtype=DType.float32, n_kv_heads=NKV, head_dim=D)
    with pytest.raises(ValueError, match="rope.head_dim 8 differs from kv_params.head_dim 16"):
        AttentionWithRope(rope=rope, num_attention_heads=NH, num_key_value_heads=NKV,
                          hidden_size=HIDDEN, kv_params=kvp)
    with pytest.raises(ValueError, match="kv_params.n_kv_heads 2 differs from num_key_value_heads 4"):
        AttentionWithRope(rope=RotaryEmbedding(HIDDEN, NH, 1e4, 64, head_dim=D),
                          num_attention_heads=NH, num_key_value_heads=4, hidden_size=HIDDEN,
                          kv_params=kvp)


# Options of the wrong type used to fail later in a comparison or float() that named nothing
# (a constructor fuzz run: softcap="decode" gave "'>' not supported between 'str' and 'int'"),
# and NaN passed as a scale.
@pytest.mark.parametrize("opts,match", [
    (dict(softcap="decode"), "AttentionWithRope: softcap must be a finite number, got 'decode'"),
    (dict(clip_qkv=[1]), r"AttentionWithRope: clip_qkv must be a finite number, got \[1\]"),
    (dict(scale=float("nan")), "AttentionWithRope: scale must be a finite number, got nan"),
    (dict(rms_norm_eps="1e-6"), "rms_norm_eps must be a finite number, got '1e-6'"),
])
def test_options_of_the_wrong_type_are_named(opts, match):
    with pytest.raises(ValueError, match=match):
        make(**opts)
    with pytest.raises(ValueError, match="devices must be a non-empty list of DeviceRef, got -1"):
        AttentionWithRope(rope=RotaryEmbedding(HIDDEN, NH, 1e4, 64, head_dim=D),
                          num_attention_heads=NH, num_key_value_heads=NKV, hidden_size=HIDDEN,
                          kv_params=KVCacheParams(dtype=DType.float32, n_kv_heads=NKV,
                                                  head_dim=D), devices=-1)


def test_rope_theta_and_cache_dtype_of_the_wrong_type_are_named():
    from graphir.nn import LatentAttentionWithRope
    from graphir.runtime import PagedKVCacheManager

    for theta in ([1], float("nan"), "1e4", -1.0):
        with pytest.raises(ValueError, match="RotaryEmbedding: theta must be a finite number > 0"):
            RotaryEmbedding(HIDDEN, NH, theta, 64, head_dim=D)
    with pytest.raises(ValueError, match="PagedKVCacheManager: dtype must be a numpy dtype, got "
                                         "'auto'"):
        PagedKVCacheManager(num_layers=1, n_kv_heads=1, head_dim=2, page_size=4,
                            total_num_pages=3, dtype="auto")
    with pytest.raises(ValueError, match="LatentAttentionWithRope: scale must be a finite number"):
        LatentAttentionWithRope(
            rope=RotaryEmbedding(8, 1, 1e4, 32, head_dim=8), num_attention_heads=4,
            num_key_value_heads=4, hidden_size=64, dtype=DType.float32, q_lora_rank=32,
            kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
            kv_params=KVCacheParams(dtype=DType.float32, n_kv_heads=1, head_dim=24),
            scale=DeviceRef.CPU())


def test_bad_layer_input_shapes():
    attn = make()
    kvp = attn.kv_params
    types = [TensorType(DType.float32, ["t", HIDDEN + 1]), TensorType(U32, ["b + 1"])]
    with Graph("bad", input_types=types + kvp.input_types()) as g:
        x, offs, *kv = g.inputs
        with pytest.raises(ValueError, match=r"x must be \[total_seq_len, 64\], got \['t', '65'\]"):
            attn(0, x, PagedCacheValues(*kv), attn.rope.freqs_cis, offs)
        with pytest.raises(ValueError, match="layer_idx must be an int"):
            attn("0", x, PagedCacheValues(*kv), attn.rope.freqs_cis, offs)
    wrong = KVCacheParams(dtype=DType.float32, n_kv_heads=NKV + 1, head_dim=D)
    types = [TensorType(DType.float32, ["t", HIDDEN]), TensorType(U32, ["b + 1"])]
    with Graph("bad_cache", input_types=types + wrong.input_types()) as g:
        x, offs, *kv = g.inputs
        with pytest.raises(ValueError, match=r"blocks .* hold \[n_kv_heads, head_dim\] = \[3, 16\], "
                                             r"the op says \[2, 16\]"):
            attn(0, x, PagedCacheValues(*kv), attn.rope.freqs_cis, offs)


def test_attention_op_type_rules_name_shapes():
    blocks = BufferType(DType.float32, ["p", 2, 1, 4, 2, 8])
    types = [TensorType(DType.float32, ["t", 32]), TensorType(DType.float32, [64, 8]), blocks,
             TensorType(U32, ["b + 1"]), TensorType(U32, ["b"]), TensorType(U32, ["b", "m"]),
             TensorType(DType.float32, [48, 32])]
    with Graph("ops_bad", input_types=types) as g:
        x, f, bl, offs, clen, lut, w = g.inputs
        with pytest.raises(ValueError, match=r"wqkv \[out, hidden\], got x \[t, 32\] and wqkv "
                                             r"\[32, 48\]"):
            ops.fused_qkv_matmul(x, w.T)
        with pytest.raises(ValueError, match=r"freqs_cis must be \[max_positions, 16\]"):
            ops.rope(x, f, offs, clen, head_dim=16)
        with pytest.raises(ValueError, match=r"x must be \[tokens, 16\], got \[t, 32\]"):
            ops.kv_cache_store(x, bl, offs, clen, lut, kind=0, layer_idx=0)
        with pytest.raises(ValueError, match="layer 1 is out of range for blocks with 1 layers"):
            ops.kv_cache_store(x[:, :16], bl, offs, clen, lut, kind=0, layer_idx=1)
        with pytest.raises(ValueError, match="kind must be 0 .K. or 1 .V., got 2"):
            ops.kv_cache_store(x[:, :16], bl, offs, clen, lut, kind=2, layer_idx=0)
        with pytest.raises(ValueError, match="n_heads 3 is not a multiple of n_kv_heads 2"):
            ops.flash_attention_ragged(x, bl, offs, clen, lut, n_heads=3, n_kv_heads=2,
                                       head_dim=8, layer_idx=0)
        for bad in (0, -4, 8.0):
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                with pytest.raises(ValueError, match="flash_attention_ragged: head_dim must be a "
                                                     f"positive int, got {bad!r}"):
                    ops.flash_attention_ragged(x, bl, offs, clen, lut, n_heads=4, n_kv_heads=2,
                                               head_dim=bad, layer_idx=0)
        with pytest.raises(ValueError, match="unknown mask variant 'banded'"):
            ops.flash_attention_ragged(x, bl, offs, clen, lut, n_heads=4, n_kv_heads=2,
                                       head_dim=8, layer_idx=0, mask_variant="banded")
        with pytest.raises(ValueError, match="attribute window must be a positive int"):
            ops.flash_attention_ragged(x, bl, offs, clen, lut, n_heads=4, n_kv_heads=2,
                                       head_dim=8, layer_idx=0, mask_variant="chunked_causal")
        with pytest.raises(ValueError, match=r"qkv must be \[tokens, 64\]"):
            ops.rope_split_store(x, f, offs, clen, lut, bl, n_heads=4, n_kv_heads=2, head_dim=8,
                                 layer_idx=0)
        with pytest.raises(ValueError, match="kv blocks must be a BufferValue"):
            ops.kv_cache_store(x[:, :16], x, offs, clen, lut, kind=0, layer_idx=0)


def test_ragged_offsets_that_disagree_with_rows_fail_at_run_time():
    attn = make()
    attn.load_state_dict({k: np.ones(tuple(int(d) for d in w.shape), np.float32)
                          for k, w in attn.raw_state_dict().items()})
    g = layer_graph(attn, attn.rope, attn.kv_params)
    blocks = np.zeros((3, 2, LAYERS, PAGE, NKV, D), np.float32)
    # Refused by the run-time metadata check before any op runs (runtime/ragged.py).
    with pytest.raises(ValueError, match=r"input_row_offsets \(input 1\): input_row_offsets end "
                                         r"at 2 \(index 1\) but the ragged input .* has 3 rows"):
        run(g, np.ones((3, HIDDEN), np.float32), np.array([0, 2], np.uint32), blocks,
            np.zeros(1, np.uint32), np.zeros((1, 1), np.uint32), np.ones((1, 2), np.uint32),
            weights=attn.state_dict())
