"""The rotary embeddings from_pretrained builds: their graph tables (ops) against the float64
references of ops.rope_math, and config.json in the pre-transformers-5 format (rope_theta +
rope_scaling with "type", Gemma 3's rope_local_base_freq and sliding_window_pattern under a
text_config, Phi-3's top-level original_max_position_embeddings, Qwen's use_sliding_window)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from graphir import Graph
from graphir.nn import (LinearScalingParams, Llama3RotaryEmbedding, LongRoPERotaryEmbedding,
                        LongRoPEScalingParams, MHAMaskVariant, RotaryEmbedding,
                        YarnRotaryEmbedding, YarnScalingParams, from_pretrained)
from graphir.ops import rope_math as rm
from graphir.runtime.interpreter import run
from tests.nn.test_pretrained_errors import (D, attention_tensors, llama_config,
                                             write_checkpoint)


def table(rope) -> np.ndarray:
    with Graph("rope_table", input_types=[]) as g:
        g.output(rope.freqs_cis)
    return run(g)[0]


def test_graph_tables_match_the_reference():
    rng = np.random.default_rng(4)
    short, long = 1 + rng.random(D // 2), 2 + rng.random(D // 2) * 3
    cases = [
        (RotaryEmbedding(64, 4, 1e4, 20, head_dim=D, scaling_params=LinearScalingParams(4.0)),
         rm.LinearRopeScaling(4.0)),
        (YarnRotaryEmbedding(64, 4, 500.0, 20, head_dim=D, scaling_params=YarnScalingParams(
            2.0, 8.0, 1.0, 32, False, attention_factor=1.3)),
         rm.YarnRopeScaling(2.0, 32, 8.0, 1.0, attention_factor=1.3, truncate=False)),
        (YarnRotaryEmbedding(64, 4, 1e4, 20, head_dim=D, scaling_params=YarnScalingParams(
            4.0, 32.0, 1.0, 16)),
         rm.YarnRopeScaling(4.0, 16, attention_factor=rm.yarn_mscale(4.0))),
        (LongRoPERotaryEmbedding(64, 4, 1e4, 20, head_dim=D, scaling_params=LongRoPEScalingParams(
            short, long, 12, 48)),
         rm.LongRopeScaling(short, long, 12, math.sqrt(1 + math.log(4) / math.log(12)))),
    ]
    plain = rm.rope_freqs_cis(D, 20, 1e4)
    for rope, ref in cases:
        want = rm.rope_freqs_cis(D, 20, rope.theta, ref)
        np.testing.assert_allclose(table(rope), want, rtol=1e-6, atol=2e-6)
        assert not np.allclose(want, plain, atol=1e-3)
    # Stitched: the long rows differ from a table built from the short factors alone.
    lr = cases[-1][0]
    only_short = rm.rope_freqs_cis(D, 20, 1e4, rm.LongRopeScaling(short, short, 12, 1.0))
    mag = lr.longrope_params.scale_attention_factor
    np.testing.assert_allclose(table(lr)[:12], only_short[:12] * mag, rtol=1e-6, atol=2e-6)
    assert not np.allclose(table(lr)[12:], only_short[12:] * mag, atol=1e-3)
    with pytest.raises(ValueError, match="scaling_params must be LongRoPEScalingParams"):
        LongRoPERotaryEmbedding(64, 4, 1e4, 20, scaling_params=LinearScalingParams(2.0))
    with pytest.raises(ValueError, match="short_factor must hold head_dim / 2 = 8"):
        LongRoPERotaryEmbedding(64, 4, 1e4, 20, head_dim=D, scaling_params=LongRoPEScalingParams(
            short[:3], long, 12, 48))
    with pytest.raises(ValueError, match="LinearScalingParams: factor must be > 0"):
        LinearScalingParams(-1.0)
    with pytest.raises(ValueError, match="YarnScalingParams: truncate must be a bool"):
        YarnScalingParams(4.0, 32.0, 1.0, 16, truncate="no")


def test_llama3_in_the_old_format(tmp_path):
    old = llama_config(rope_theta=500000.0, max_position_embeddings=64,
                       rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 16})
    del old["rope_parameters"]
    write_checkpoint(tmp_path, old)
    rope = from_pretrained(tmp_path, 0).rope
    assert type(rope) is Llama3RotaryEmbedding and rope.theta == 500000.0
    want = rm.rope_freqs_cis(D, 64, 500000.0, rm.Llama3RopeScaling(8.0, 1.0, 4.0, 16))
    np.testing.assert_allclose(table(rope), want, rtol=1e-6, atol=2e-6)


def test_gemma3_nested_text_config_in_the_old_format(tmp_path):
    text = dict(model_type="gemma3_text", hidden_size=64, num_attention_heads=4,
                num_key_value_heads=2, head_dim=D, num_hidden_layers=2, sliding_window=4,
                sliding_window_pattern=2, query_pre_attn_scalar=24, max_position_embeddings=32,
                rope_scaling={"rope_type": "linear", "factor": 8.0})
    cfg = dict(model_type="gemma3", architectures=["Gemma3ForConditionalGeneration"],
               text_config=text)
    rng = np.random.default_rng(6)
    tensors = attention_tensors(rng, "language_model.model.layers.{i}.self_attn.", norms=True)
    tensors["vision_tower.encoder.layers.0.self_attn.q_proj.weight"] = np.ones(4, np.float32)
    write_checkpoint(tmp_path, cfg, tensors)
    local, glob = from_pretrained(tmp_path, 0), from_pretrained(tmp_path, 1)
    assert (local.mask_variant, local.sliding_window) == \
        (MHAMaskVariant.SLIDING_WINDOW_CAUSAL_MASK, 4)
    assert (glob.mask_variant, glob.sliding_window) == (MHAMaskVariant.CAUSAL_MASK, None)
    assert local.rope.theta == 10000.0 and local.rope.scaling_params is None
    assert glob.rope.theta == 1e6 and glob.rope.scaling_params == LinearScalingParams(8.0)
    assert local.scale == pytest.approx(24 ** -0.5) and local.rms_norm_eps == 1e-6
    np.testing.assert_array_equal(
        glob.state_dict()["q_norm.weight"],
        1 + tensors["language_model.model.layers.1.self_attn.q_norm.weight"])


def test_phi3_longrope_in_the_old_format(tmp_path):
    short, long = [1.0 + i / 10 for i in range(8)], [3.0 + i for i in range(8)]
    cfg = dict(model_type="phi3", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
               num_hidden_layers=2, max_position_embeddings=48, original_max_position_embeddings=12,
               rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=None,
               rope_scaling={"type": "longrope", "short_factor": short, "long_factor": long})
    rng = np.random.default_rng(7)
    tensors = {}
    for i in range(2):
        p = f"model.layers.{i}.self_attn."
        tensors[p + "qkv_proj.weight"] = rng.standard_normal((8 * D, 64)).astype(np.float32)
        tensors[p + "o_proj.weight"] = rng.standard_normal((64, 4 * D)).astype(np.float32)
    write_checkpoint(tmp_path, cfg, tensors)
    attn = from_pretrained(tmp_path, 1, max_seq_len=16)
    assert attn.stacked_qkv and attn.mask_variant is MHAMaskVariant.CAUSAL_MASK
    af = math.sqrt(1 + math.log(4) / math.log(12))
    want = rm.rope_freqs_cis(D, 16, 1e4, rm.LongRopeScaling(short, long, 12, af))
    np.testing.assert_allclose(table(attn.rope), want, rtol=1e-6, atol=2e-6)


def test_qwen2_sliding_window_needs_use_sliding_window(tmp_path):
    rng = np.random.default_rng(8)
    tensors = attention_tensors(rng)
    for i in range(2):
        for n, rows in (("q_proj", 4 * D), ("k_proj", 2 * D), ("v_proj", 2 * D)):
            tensors[f"model.layers.{i}.self_attn.{n}.bias"] = rng.standard_normal(rows).astype(
                np.float32)
    base = llama_config(model_type="qwen2", sliding_window=32, max_window_layers=0)
    del base["attention_bias"]
    write_checkpoint(tmp_path, dict(base, use_sliding_window=False), tensors)
    attn = from_pretrained(tmp_path, 1)
    assert attn.has_bias and attn.sliding_window is None
    write_checkpoint(tmp_path, dict(base, use_sliding_window=True), tensors)
    assert from_pretrained(tmp_path, 1).sliding_window == 32
