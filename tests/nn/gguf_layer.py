"""The tiny GGUFQAttentionWithRope the GGUF tests share (its float twin, its names in a llama.cpp
file and its paged cache), apart from test_gguf_attention.py so that machines without the gguf
package (the GPU machine) can build it."""
import numpy as np

from graphir import DType
from graphir.nn import AttentionWithRope, GGUFQAttentionWithRope, KVCacheParams, RotaryEmbedding
from graphir.ops.quant.gguf_quantize import quantize_gguf
from graphir.runtime.kv_cache import PagedKVCacheManager
from tests.nn.harness import LAYERS, PAGE, scheduled_manager

HIDDEN, NH, NKV, D = 256, 4, 2, 64  # K-quants need rows that are whole 256-value blocks
NAMES = {"q_proj": ("attn_q", NH * D, HIDDEN), "k_proj": ("attn_k", NKV * D, HIDDEN),
         "v_proj": ("attn_v", NKV * D, HIDDEN), "o_proj": ("attn_output", HIDDEN, NH * D)}


def kv_manager() -> PagedKVCacheManager:
    return scheduled_manager(NKV, D)


def layers(enc, il: bool = True, **opts):
    """(rope, kv params, the GGUF layer in `enc`, the float layer of the same shape)."""
    rope = RotaryEmbedding(HIDDEN, NH, 10000.0, 64, head_dim=D, interleaved=il)
    kvp = KVCacheParams(dtype=DType.float32, n_kv_heads=NKV, head_dim=D, num_layers=LAYERS,
                        page_size=PAGE)
    common = dict(rope=rope, num_attention_heads=NH, num_key_value_heads=NKV, hidden_size=HIDDEN,
                  kv_params=kvp, **opts)
    quant = GGUFQAttentionWithRope(dtype=DType.uint8, quantization_encoding=enc, **common)
    return rope, kvp, quant, AttentionWithRope(**common)


def random_layer(enc):
    """(rope, kv params, the GGUF layer) with fresh random weights quantized to `enc`."""
    rope, kvp, quant, _ = layers(enc)
    rng = np.random.default_rng(1)
    quant.load_state_dict({f"{ours}.weight": quantize_gguf(
        (rng.standard_normal((out, n_in)) * 0.08).astype(np.float32), enc)
        for ours, (_, out, n_in) in NAMES.items()})
    return rope, kvp, quant
