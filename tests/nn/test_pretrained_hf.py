"""from_pretrained against Hugging Face: a tiny random checkpoint per family (2 layers, hidden 64)
saved with save_pretrained, loaded back both by transformers and by from_pretrained; the layer's
attention output matches HF's over a ragged prefill, decode steps and a second prefill chunk
(the tests/nn/harness.py schedule), within 1e-5 in float32, for sliding and global layers.
"""
from __future__ import annotations

import numpy as np
import pytest

from graphir import DType
from graphir.nn import (AttentionWithRope, KVCacheParams, LatentAttentionWithRope,
                        LongRoPERotaryEmbedding, MHAMaskVariant, YarnRotaryEmbedding, from_pretrained)
from graphir.nn.rotary_yarn import DeepseekYarnRotaryEmbedding
from tests.nn.harness import (PAGE, HFAttentionRunner, check_schedule_against_hf, interpreted,
                              layer_graph, scheduled_manager)

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              rms_norm_eps=1e-6)
DEFAULT = dict(rope_type="default", rope_theta=10000.0)


def _llama(rope, **kw):
    return transformers.LlamaConfig(**COMMON, head_dim=16, rope_parameters=rope, **kw)


def _deepseek(rope, q_lora=None):
    return transformers.DeepseekV3Config(
        vocab_size=97, hidden_size=64, intermediate_size=32, moe_intermediate_size=16,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
        n_group=1, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1,
        q_lora_rank=q_lora, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=12, max_position_embeddings=64 * 40, rms_norm_eps=1e-6, rope_parameters=rope)


def _phi3():
    rng = np.random.default_rng(3)
    rope = dict(rope_type="longrope", rope_theta=10000.0,
                short_factor=(1 + rng.random(8) * 0.5).tolist(),
                long_factor=(2 + rng.random(8) * 4).tolist())
    return transformers.Phi3Config(**{**COMMON, "max_position_embeddings": 48},
                                   original_max_position_embeddings=12, sliding_window=7,
                                   pad_token_id=None, bos_token_id=1, eos_token_id=2,
                                   rope_parameters=rope)


def _gemma2():
    return transformers.Gemma2Config(**COMMON, head_dim=16, query_pre_attn_scalar=24,
                                     sliding_window=4, attn_logit_softcapping=1.5,
                                     rope_parameters=dict(DEFAULT))


def _gemma3():
    rope = {"full_attention": dict(rope_type="linear", factor=2.0, rope_theta=1e6),
            "sliding_attention": dict(rope_type="default", rope_theta=1e4)}
    return transformers.Gemma3TextConfig(**COMMON, head_dim=16, query_pre_attn_scalar=24,
                                         sliding_window=4, sliding_window_pattern=2,
                                         rope_parameters=rope)


YARN_DS = dict(rope_type="yarn", rope_theta=10000.0, factor=40.0,
               original_max_position_embeddings=64, beta_fast=32, beta_slow=1)
CASES = {
    # name: (config factory, layer, expected rope class, sliding window of that layer)
    "llama_default": (lambda: _llama(dict(DEFAULT)), 1, None, None),
    "llama_linear": (lambda: _llama(dict(rope_type="linear", rope_theta=1e4, factor=4.0)), 0,
                     None, None),
    "llama_dynamic": (lambda: _llama(dict(rope_type="dynamic", rope_theta=1e4, factor=2.0)), 0,
                      None, None),
    "llama3": (lambda: _llama(dict(rope_type="llama3", rope_theta=1e4, factor=8.0,
                                   low_freq_factor=1.0, high_freq_factor=4.0,
                                   original_max_position_embeddings=32)), 1, None, None),
    # theta 500: the correction range [-0.58, 2.1] differs from its truncation [0, 3]
    "llama_yarn": (lambda: _llama(dict(rope_type="yarn", rope_theta=500.0, factor=2.0,
                                       original_max_position_embeddings=32, beta_fast=8,
                                       beta_slow=1, truncate=False, attention_factor=1.3)), 0,
                   YarnRotaryEmbedding, None),
    "qwen2_yarn_sliding": (lambda: transformers.Qwen2Config(
        **COMMON, use_sliding_window=True, sliding_window=4, max_window_layers=1,
        rope_parameters=dict(rope_type="yarn", rope_theta=1e6, factor=4.0,
                             original_max_position_embeddings=16, mscale=0.7, mscale_all_dim=1.3)),
        1, YarnRotaryEmbedding, 4),
    "qwen2_full": (lambda: transformers.Qwen2Config(
        **COMMON, use_sliding_window=True, sliding_window=4, max_window_layers=1,
        rope_parameters=dict(rope_type="default", rope_theta=1e6)), 0, None, None),
    "qwen3": (lambda: transformers.Qwen3Config(**COMMON, head_dim=16,
                                               rope_parameters=dict(rope_type="default",
                                                                    rope_theta=1e6)), 0, None, None),
    "mistral": (lambda: transformers.MistralConfig(**COMMON, head_dim=16, sliding_window=5,
                                                   rope_parameters=dict(DEFAULT)), 1, None, 5),
    "gemma2_sliding": (_gemma2, 0, None, 4),
    "gemma2_global": (_gemma2, 1, None, None),
    "gemma3_sliding": (_gemma3, 0, None, 4),
    "gemma3_global": (_gemma3, 1, None, None),
    "phi3_longrope": (_phi3, 1, LongRoPERotaryEmbedding, 7),
    # HF's YaRN attention factor ignores mscale without mscale_all_dim (ours would not)
    "deepseek_v3_mscale_only": (lambda: _deepseek(dict(YARN_DS, mscale=0.8)), 1,
                                DeepseekYarnRotaryEmbedding, None),
    "deepseek_v3_ratio": (lambda: _deepseek(dict(YARN_DS, mscale=0.8, mscale_all_dim=1.0)), 0,
                          DeepseekYarnRotaryEmbedding, None),
    "deepseek_v3_q_lora_options": (lambda: _deepseek(dict(
        YARN_DS, mscale=1.0, mscale_all_dim=0.7, attention_factor=1.1, truncate=False,
        beta_fast=16), q_lora=24), 1, DeepseekYarnRotaryEmbedding, None),
}


def save_tiny(config, path, seed: int, max_shard_size=None) -> None:
    """A random CausalLM of `config` saved as safetensors; every attention parameter random
    (norm weights around 1, biases nonzero), so a missing or misplaced weight shows."""
    import torch

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for layer in model.model.layers:
            for name, p in layer.self_attn.named_parameters():
                p.copy_(torch.randn_like(p) * (0.15 if p.ndim == 2 else 0.5)
                        + (1.0 if "norm" in name else 0.0))
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.float().save_pretrained(path, safe_serialization=True, **kw)


class PretrainedHF(HFAttentionRunner):
    """transformers' model loaded back from `path`, layer `layer`'s attention hooked."""

    def __init__(self, path, layer: int):
        import torch

        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            path, attn_implementation="eager", dtype=torch.float32).eval()
        self.attn = self.model.model.layers[layer].self_attn
        self.captured, self.caches = {}, {}
        self.attn.register_forward_pre_hook(self._pre, with_kwargs=True)
        self.attn.register_forward_hook(self._post, with_kwargs=True)


def cache_dims(config) -> tuple[int, int]:
    """(KV heads, head_dim) of the paged cache the layer of `config` uses."""
    if config.model_type == "deepseek_v3":
        return 1, config.kv_lora_rank + config.qk_rope_head_dim
    d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_key_value_heads, d


def run_against_hf(path, config, layer: int, *, executor=None, **opts):
    """Run SCHEDULE through the graphir layer and HF; returns the layer. `executor(graph,
    weights)` gives a callable(x, offs, blocks, clen, lut, maxl) (default: the interpreter)."""
    hf = PretrainedHF(path, layer)
    nkv, d = cache_dims(config)
    kvp = KVCacheParams(dtype=DType.float32, n_kv_heads=nkv, head_dim=d, num_layers=2,
                        page_size=PAGE)
    attn = from_pretrained(path, layer, kv_params=kvp, **opts)
    g = layer_graph(attn, attn.rope, kvp, layer=layer)
    m = scheduled_manager(nkv, d)
    if executor is None:
        run_step = interpreted(g, m, attn.state_dict())
    else:
        run = executor(g, attn.state_dict())

        def run_step(st, x):
            (y,) = run(x, st.input_row_offsets, m.blocks, st.cache_lengths, st.lookup_table,
                       st.max_lengths)
            return y
    check_schedule_against_hf(hf, run_step, m, layer=layer)
    return attn


@pytest.mark.parametrize("case", list(CASES))
def test_layer_matches_hf(case, tmp_path):
    make, layer, rope_cls, window = CASES[case]
    config = make()
    save_tiny(config, tmp_path, seed=sum(map(ord, case)))
    attn = run_against_hf(tmp_path, config, layer)
    mla = config.model_type == "deepseek_v3"
    assert isinstance(attn, LatentAttentionWithRope if mla else AttentionWithRope)
    if rope_cls is not None:
        assert type(attn.rope) is rope_cls
    if not mla:
        want = MHAMaskVariant.SLIDING_WINDOW_CAUSAL_MASK if window else MHAMaskVariant.CAUSAL_MASK
        assert (attn.mask_variant, attn.sliding_window) == (want, window)


def test_sharded_checkpoint_and_unfused_form(tmp_path):
    config = CASES["qwen3"][0]()
    save_tiny(config, tmp_path, seed=5, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    assert not (tmp_path / "model.safetensors").exists()
    run_against_hf(tmp_path, config, 1, _fuse_rope_and_store=False)


def test_derived_kv_params_dtype_and_names(tmp_path):
    save_tiny(_gemma3(), tmp_path, seed=9)
    attn = from_pretrained(tmp_path, 1)
    kvp = attn.kv_params
    assert (kvp.n_kv_heads, kvp.head_dim, kvp.num_layers, kvp.page_size, kvp.dtype) == \
        (2, 16, 2, 128, DType.float32)
    assert attn.rope.max_seq_len == 64 and attn.scale == pytest.approx(24 ** -0.5)
    from safetensors.numpy import load_file

    stored = load_file(tmp_path / "model.safetensors")
    sd = attn.state_dict()
    assert sorted(sd) == ["k_norm.weight", "k_proj.weight", "o_proj.weight", "q_norm.weight",
                          "q_proj.weight", "v_proj.weight"]
    np.testing.assert_array_equal(sd["q_proj.weight"],
                                  stored["model.layers.1.self_attn.q_proj.weight"])
    # Gemma's (1 + w) norm is folded into the loaded weight.
    np.testing.assert_array_equal(sd["k_norm.weight"],
                                  1 + stored["model.layers.1.self_attn.k_norm.weight"])


def test_bfloat16_checkpoint_reads_exactly(tmp_path):
    import torch

    config = CASES["qwen3"][0]()
    save_tiny(config, tmp_path, seed=2)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16", safe_serialization=True)
    attn = from_pretrained(tmp_path / "bf16", 0)
    assert attn.dtype is DType.bfloat16 and attn.kv_params.dtype is DType.bfloat16
    want = model.model.layers[0].self_attn.q_proj.weight.detach().float().numpy()
    np.testing.assert_array_equal(attn.state_dict()["q_proj.weight"], want)
    f32 = from_pretrained(tmp_path / "bf16", 0, dtype=DType.float32)
    assert f32.dtype is DType.float32
    np.testing.assert_array_equal(f32.state_dict()["q_proj.weight"], want)
