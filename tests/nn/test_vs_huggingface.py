"""AttentionWithRope against Hugging Face attention modules (CPU, float32, tiny random configs).

HF runs each sequence alone with its own KV cache; hooks capture its attention module's input
(the normed hidden states) and output. Our layer runs the same rows as one ragged batch through
the paged cache: 3 sequences prefilled, 4 decode steps, then a second prefill chunk.
"""
import pytest
from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from graphir import DType
from graphir.nn import (AttentionWithRope, KVCacheParams, Llama3RopeScalingParams, MHAMaskVariant,
                RotaryEmbedding)
from tests.nn.harness import (D, HIDDEN, LAYERS, NH, NKV, PAGE, HFAttentionRunner,
                              check_schedule_against_hf, interpreted, layer_graph,
                              scheduled_manager)

COMMON = dict(vocab_size=97, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=1,
              num_attention_heads=NH, num_key_value_heads=NKV, max_position_embeddings=128,
              rms_norm_eps=1e-6)
LLAMA3 = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
              high_freq_factor=4.0, original_max_position_embeddings=32)
WINDOW = 5

CASES = {
    # name: (HF config, our layer options, rope theta, llama3 scaling)
    "llama": (LlamaConfig(**COMMON, head_dim=D, rope_parameters=LLAMA3), {}, 10000.0,
              Llama3RopeScalingParams(8.0, 1.0, 4.0, 32)),
    "qwen2": (Qwen2Config(**COMMON, rope_parameters=dict(rope_type="default", rope_theta=1e6)),
              dict(has_bias=True), 1e6, None),
    "qwen3": (Qwen3Config(**COMMON, head_dim=D, rope_parameters=dict(rope_type="default",
                                                                       rope_theta=1e6)),
              dict(use_qk_norm=True), 1e6, None),
    "mistral": (MistralConfig(**COMMON, head_dim=D, sliding_window=WINDOW,
                              rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
                dict(mask_variant=MHAMaskVariant.SLIDING_WINDOW_CAUSAL_MASK,
                     sliding_window=WINDOW), 10000.0, None),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("fuse", [True, False])
def test_layer_matches_hf(case, fuse):
    config, opts, theta, scaling = CASES[case]
    hf = HFAttentionRunner(config, seed=hash(case) % 1000, vector_scale=0.5)
    rope = RotaryEmbedding(HIDDEN, NH, theta, 64, head_dim=D, interleaved=False,
                           scaling_params=scaling)
    kv_params = KVCacheParams(dtype=DType.float32, n_kv_heads=NKV, head_dim=D,
                              num_layers=LAYERS, page_size=PAGE)
    attn = AttentionWithRope(rope=rope, num_attention_heads=NH, num_key_value_heads=NKV,
                             hidden_size=HIDDEN, kv_params=kv_params, rms_norm_eps=1e-6,
                             _fuse_rope_and_store=fuse, **opts)
    attn.load_state_dict(hf.attn_state_dict())
    g = layer_graph(attn, rope, kv_params)
    m = scheduled_manager(NKV, D)
    check_schedule_against_hf(hf, interpreted(g, m, attn.state_dict()), m)

