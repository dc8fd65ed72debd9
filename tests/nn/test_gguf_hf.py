"""GGUFQAttentionWithRope.from_gguf on files written as llama.cpp's converter writes them, against
the Hugging Face attention module (LlamaAttention / Qwen2Attention / Qwen3Attention) holding the
weights the file decodes to.

HF runs each sequence alone with its own cache; our layer runs the rows as one ragged batch over
the paged cache (3 prefills, 4 decode steps, a second prefill chunk). Only the layer's shape
options (page size, max_seq_len) are given: heads, sizes, RoPE, biases, norms and encodings come
from the file.
"""
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, Qwen2Config, Qwen3Config

from graphir.nn import GGUFQAttentionWithRope
from graphir.nn.gguf_config import FreqFactorRotaryEmbedding
from graphir.nn.rotary_yarn import DeepseekYarnRotaryEmbedding
from tests.nn.gguf_convert import MIXES, llama3_freq_factors, write_gguf
from tests.nn.harness import (PAGE, HFAttentionRunner, check_schedule_against_hf, interpreted,
                              layer_graph, scheduled_manager)

HIDDEN, NH, NKV, D = 256, 4, 2, 64  # K-quant rows are whole 256-value blocks
COMMON = dict(vocab_size=97, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=1,
              num_attention_heads=NH, num_key_value_heads=NKV, max_position_embeddings=128,
              rms_norm_eps=1e-6)
L3 = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
          original_max_position_embeddings=32)

CASES = {
    # name: (architecture, HF config, encoding mix, extra file options)
    "llama-llama3-Q4_K_M": ("llama", LlamaConfig(**COMMON, head_dim=D, rope_parameters=dict(
        rope_type="llama3", rope_theta=5e5, **L3)), "Q4_K_M",
        dict(theta=5e5, rope_freqs=llama3_freq_factors(D, 5e5, 8.0, 1.0, 4.0, 32))),
    "llama-Q2_K": ("llama", LlamaConfig(**COMMON, head_dim=D, rope_parameters=dict(
        rope_type="default", rope_theta=1e4)), "Q2_K_mix", dict(theta=1e4)),
    "qwen2-bias-Q5_K_M": ("qwen2", Qwen2Config(**COMMON, rope_parameters=dict(
        rope_type="default", rope_theta=1e6)), "Q5_K_M", dict(theta=1e6)),
    "qwen2-yarn-legacy": ("qwen2", Qwen2Config(**COMMON, rope_parameters=dict(
        rope_type="yarn", rope_theta=1e6, factor=4.0, original_max_position_embeddings=32)),
        "legacy", dict(theta=1e6, yarn=(4.0, 32))),
    "qwen3-qknorm-Q3_K_M": ("qwen3", Qwen3Config(**COMMON, head_dim=D, rope_parameters=dict(
        rope_type="default", rope_theta=1e6)), "Q3_K_M", dict(theta=1e6)),
    "qwen3-qknorm-Q8_0": ("qwen3", Qwen3Config(**COMMON, head_dim=D, rope_parameters=dict(
        rope_type="default", rope_theta=1e6)), "Q8_0_all", dict(theta=1e6)),
}


def decoy_block(rng, sd: dict) -> dict:
    return {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in sd.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_gguf_layer_matches_hf(tmp_path, case):
    arch, config, mix, opts = CASES[case]
    seed = sum(map(ord, case))
    hf = HFAttentionRunner(config, seed=seed, vector_scale=0.5)
    sd = hf.attn_state_dict()
    assert ("q_proj.bias" in sd) == (arch == "qwen2") and ("q_norm.weight" in sd) == \
        (arch == "qwen3")
    rng = np.random.default_rng(seed)
    path = tmp_path / f"{case}.gguf"
    # Block 0 is a decoy: loading layer 1 must read blk.1.
    decoded = write_gguf(path, arch, [decoy_block(rng, sd), sd], MIXES[mix], n_head=NH,
                         n_kv=NKV, hidden=HIDDEN, head_dim=D, **opts)[1]
    with torch.no_grad():  # HF computes with the weights the file holds
        hf.attn.load_state_dict({k: torch.from_numpy(v) for k, v in decoded.items()})

    attn = GGUFQAttentionWithRope.from_gguf(path, 1, max_seq_len=64, page_size=PAGE,
                                            _fuse_rope_and_store=len(case) % 2 == 0)
    encs = {k: v.value for k, v in attn.quantization_encodings.items()}
    assert encs == MIXES[mix]
    assert attn.rope.interleaved == (arch == "llama")
    assert attn.has_bias == (arch == "qwen2") and attn.use_qk_norm == (arch == "qwen3")
    assert isinstance(attn.rope, FreqFactorRotaryEmbedding) == ("rope_freqs" in opts)
    assert isinstance(attn.rope, DeepseekYarnRotaryEmbedding) == ("yarn" in opts)
    assert attn.kv_params.num_layers == 2 and attn.rope.theta == opts["theta"]
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):  # the file's blocks, not re-encoded
        lin = getattr(attn, name)
        assert lin.weight.quantization_encoding.value == MIXES[mix][name]

    g = layer_graph(attn, attn.rope, attn.kv_params)
    n_qmm = str(g).count("gir.qmatmul")
    # one qmatmul per run of neighbours among q, k, v stored alike, then o_proj
    qkv = [MIXES[mix][p] for p in ("q_proj", "k_proj", "v_proj")]
    assert n_qmm == 2 + sum(a != b for a, b in zip(qkv, qkv[1:]))
    m = scheduled_manager(NKV, D)
    check_schedule_against_hf(hf, interpreted(g, m, attn.state_dict()), m, scaled_atol=True)
