"""from_pretrained: one attention layer of a Hugging Face model directory, built as the graphir
layer that computes what transformers computes, with that layer's weights bound.

Families (config.json model_type): llama, mistral, qwen2, qwen3, gemma2, gemma3 / gemma3_text,
phi3 (AttentionWithRope) and deepseek_v3 (LatentAttentionWithRope).
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from graphir.device import DeviceRef
from graphir.dtype import DType, round_to
from graphir.ops.rope_math import yarn_mscale

from .attention import AttentionWithRope, LatentAttentionWithRope, MHAMaskVariant
from .attention.checks import check_devices
from .config_values import config_number
from .kv_cache import KVCacheParams
from .pretrained_config import ModelConfig
from .pretrained_rope import default_max_seq_len, rope_from_parameters
from .pretrained_weights import Checkpoint

# Constructor arguments that come from config.json; opts may not override them.
DERIVED = ("rope", "num_attention_heads", "num_key_value_heads", "hidden_size", "kv_params",
           "devices", "dtype", "stacked_qkv", "scale", "has_bias", "use_qk_norm", "rms_norm_eps",
           "mask_variant", "sliding_window", "softcap", "q_lora_rank", "kv_lora_rank",
           "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
_IGNORED = ("rotary_emb.",)  # buffers some checkpoints carry; transformers skips them too


def from_pretrained(path: str | os.PathLike[str], layer_idx: int, *,
                    dtype: DType | None = None, devices: Sequence[DeviceRef] | None = None,
                    kv_params: KVCacheParams | None = None, max_seq_len: int | None = None,
                    **opts) -> AttentionWithRope | LatentAttentionWithRope:
    """The attention layer `layer_idx` of the Hugging Face model at `path`, weights loaded.

    `path` holds config.json and model.safetensors (or shards listed by
    model.safetensors.index.json). The layer is an AttentionWithRope (Llama, Mistral, Qwen2,
    Qwen3, Gemma 2, Gemma 3, Phi-3) or a LatentAttentionWithRope (DeepSeek-V3) whose options
    come from config.json: head counts, q/k/v biases, q/k norms (Gemma 3's (1 + w) folded into
    the loaded weights, computed in float32 then stored as `dtype`), Gemma's
    query_pre_attn_scalar scale and Gemma 2's logit softcap, the layer's sliding window, and its
    RoPE (`attn.rope`: default, linear, llama3, yarn, longrope, or dynamic while the table stays
    below max_position_embeddings). LongRoPE is one table stitched at
    original_max_position_embeddings: it matches transformers except in a step whose tokens lie
    on both sides of that position (transformers then uses the long factors for all of them).

    Args:
        path: the model directory.
        layer_idx: which decoder layer (0-based); it picks the weights, the layer type
            (sliding or global) and the RoPE. The call still takes the cache layer index.
        dtype: weight and cache dtype; default: that of the checkpoint's o_proj.weight.
        devices: where the layer runs (the first device holds the weights; default CPU).
        kv_params: the paged cache; default: derived (num_hidden_layers layers, pages of 128).
        max_seq_len: RoPE table of 2 * max_seq_len rows; default max_position_embeddings.
        **opts: other constructor options (e.g. `_fuse_rope_and_store`, `graph_mode`).

    Returns:
        The layer; its RoPE is `attn.rope` and its cache parameters `attn.kv_params`.

    Example:
        >>> attn = from_pretrained("path/to/Llama-3.2-1B", 0, dtype=DType.float32)  # doctest: +SKIP
        >>> out = attn(0, x, kv_collection, attn.rope.freqs_cis, input_row_offsets)  # doctest: +SKIP
    """
    mc = ModelConfig.read(path)
    n_layers = mc.num_layers
    if isinstance(layer_idx, bool) or not isinstance(layer_idx, (int, np.integer)) \
            or not 0 <= layer_idx < n_layers:
        raise ValueError(f"from_pretrained: layer_idx {layer_idx!r} is out of range: this "
                         f"{mc.model_type} model has {n_layers} layers (0 .. {n_layers - 1})")
    layer_idx = int(layer_idx)
    bad = sorted(set(opts) & set(DERIVED))
    if bad:
        raise ValueError(f"from_pretrained: {bad} come from config.json (or are from_pretrained's "
                         f"own arguments); construct the layer directly to choose them")
    ckpt = Checkpoint(path)
    prefix, stored = _layer_tensors(ckpt, mc, layer_idx)
    if dtype is None:
        dtype = ckpt.dtype(prefix + ("o_proj.weight" if "o_proj.weight" in stored
                                     else sorted(stored)[0]))
    if not isinstance(dtype, DType) or not dtype.is_float:
        raise ValueError(f"from_pretrained: dtype must be a float DType, got {dtype!r}")
    devs = check_devices("from_pretrained", devices)
    rp = mc.rope_parameters(layer_idx)
    max_pos = mc.pos_int("max_position_embeddings")
    if max_seq_len is None:
        max_seq_len = default_max_seq_len(rp, max_pos)
    build = _latent if mc.family == "deepseek_v3" else _standard
    attn, transforms = build(mc, layer_idx, rp, dict(
        dtype=dtype, devs=devs, kv_params=kv_params, max_seq_len=max_seq_len, max_pos=max_pos,
        n_layers=n_layers, opts=opts))
    _load(attn, ckpt, prefix, stored, dtype, transforms, mc, layer_idx)
    return attn


def _layer_tensors(ckpt: Checkpoint, mc: ModelConfig, i: int) -> tuple[str, set[str]]:
    """(name prefix of layer i's attention, its tensors' names below the prefix)."""
    names = ckpt.names()
    for pattern in mc.prefixes:
        prefix = pattern.format(i=i)
        rel = {n[len(prefix):] for n in names if n.startswith(prefix)}
        rel = {n for n in rel if not n.startswith(_IGNORED)}
        if rel:
            return prefix, rel
    raise ValueError(f"from_pretrained: the checkpoint at {os.fspath(ckpt.path)!r} has no "
                     f"tensors named {mc.prefixes[0].format(i=i)}* (layer {i})")


def _kv_params(given, n_kv_heads: int, head_dim: int, b: dict) -> KVCacheParams:
    if given is None:
        return KVCacheParams(dtype=b["dtype"], n_kv_heads=n_kv_heads, head_dim=head_dim,
                             num_layers=b["n_layers"], devices=(b["devs"][0],))
    if not isinstance(given, KVCacheParams):
        raise ValueError(f"from_pretrained: kv_params must be KVCacheParams, got {given!r}")
    if (given.n_kv_heads, given.head_dim) != (n_kv_heads, head_dim):
        raise ValueError(f"from_pretrained: this layer caches {n_kv_heads} KV heads of "
                         f"head_dim {head_dim}; kv_params has n_kv_heads {given.n_kv_heads}, "
                         f"head_dim {given.head_dim}")
    return given


def _standard(mc: ModelConfig, i: int, rp: dict, b: dict):
    fam = mc.family
    nh, hidden = mc.pos_int("num_attention_heads"), mc.pos_int("hidden_size")
    nkv = mc.opt_pos_int("num_key_value_heads", nh)
    d = mc.opt_pos_int("head_dim") or hidden // nh
    if d == 0:
        raise ValueError(f"{mc.where('hidden_size')} = {hidden} is smaller than "
                         f"num_attention_heads = {nh} (no head_dim given)")
    if mc.get("attention_bias") and fam in ("llama", "qwen3", "gemma2", "gemma3"):
        raise mc.unsupported("attention_bias = true (o_proj has no bias in AttentionWithRope)")
    if mc.get("use_bidirectional_attention"):
        raise mc.unsupported("use_bidirectional_attention = true (non-causal attention)")
    kw = dict(has_bias=fam == "qwen2", stacked_qkv=fam == "phi3",
              use_qk_norm=fam in ("qwen3", "gemma3"),
              rms_norm_eps=mc.number("rms_norm_eps", minimum=0.0))
    if fam in ("gemma2", "gemma3"):
        kw["scale"] = mc.number("query_pre_attn_scalar", positive=True) ** -0.5
    cap = mc.get("attn_logit_softcapping")
    if fam == "gemma2" and cap is not None:
        kw["softcap"] = mc.number("attn_logit_softcapping", positive=True)
    elif fam == "gemma3" and cap is not None:
        raise mc.unsupported(f"attn_logit_softcapping = {cap} (transformers' Gemma 3 attention "
                             f"does not apply it)")
    window = mc.window(i)
    if window is not None:
        kw.update(mask_variant=MHAMaskVariant.SLIDING_WINDOW_CAUSAL_MASK, sliding_window=window)
    rope = rope_from_parameters(rp, dim=hidden, n_heads=nh, head_dim=d,
                                max_seq_len=b["max_seq_len"], max_position_embeddings=b["max_pos"],
                                interleaved=False, device=b["devs"][0])
    attn = AttentionWithRope(rope=rope, num_attention_heads=nh, num_key_value_heads=nkv,
                             hidden_size=hidden, kv_params=_kv_params(b["kv_params"], nkv, d, b),
                             devices=b["devs"], dtype=b["dtype"], **kw, **b["opts"])
    transforms = {}
    if fam == "gemma3":  # Gemma's RMSNorm multiplies by (1 + w), in float32
        for name in ("q_norm.weight", "k_norm.weight"):
            transforms[name] = lambda w: np.float32(1.0) + w.astype(np.float32)
    return attn, transforms


def _latent(mc: ModelConfig, i: int, rp: dict, b: dict):
    nh, hidden = mc.pos_int("num_attention_heads"), mc.pos_int("hidden_size")
    if mc.get("attention_bias"):
        raise mc.unsupported("attention_bias = true (LatentAttentionWithRope has no biases)")
    nope, rope_d = mc.pos_int("qk_nope_head_dim"), mc.pos_int("qk_rope_head_dim")
    r, v = mc.pos_int("kv_lora_rank"), mc.pos_int("v_head_dim")
    q_lora = mc.opt_pos_int("q_lora_rank")
    rope = rope_from_parameters(rp, dim=rope_d, n_heads=1, head_dim=rope_d,
                                max_seq_len=b["max_seq_len"], max_position_embeddings=b["max_pos"],
                                interleaved=bool(mc.get("rope_interleave", True)),
                                device=b["devs"][0], deepseek=True)
    # transformers' DeepSeek-V3 scale: 1/sqrt(qk_head_dim), times mscale(factor,
    # mscale_all_dim)^2 for a scaled RoPE that sets mscale_all_dim.
    scale = (nope + rope_d) ** -0.5
    if rp["rope_type"] != "default" and rp.get("mscale_all_dim"):
        m = yarn_mscale(config_number(rp.get("factor"), mc.where("rope_parameters['factor']"),
                                      positive=True),
                        config_number(rp["mscale_all_dim"],
                                      mc.where("rope_parameters['mscale_all_dim']")))
        scale *= m * m
    attn = LatentAttentionWithRope(
        rope=rope, num_attention_heads=nh,
        num_key_value_heads=mc.opt_pos_int("num_key_value_heads", nh),
        hidden_size=hidden, kv_params=_kv_params(b["kv_params"], 1, r + rope_d, b),
        dtype=b["dtype"], devices=b["devs"], scale=scale, q_lora_rank=q_lora, kv_lora_rank=r,
        qk_nope_head_dim=nope, qk_rope_head_dim=rope_d, v_head_dim=v, **b["opts"])
    return attn, {}


def _load(attn, ckpt: Checkpoint, prefix: str, stored: set[str], dtype: DType, transforms: dict,
          mc: ModelConfig, i: int) -> None:
    want = set(attn.raw_state_dict())
    missing, extra = sorted(want - stored), sorted(stored - want)
    if missing or extra:
        parts = ([f"missing {[prefix + n for n in missing]}"] if missing else []) + \
                ([f"has {[prefix + n for n in extra]} that {type(attn).__name__} cannot use"]
                 if extra else [])
        raise ValueError(f"from_pretrained: layer {i} of this {mc.model_type} checkpoint: "
                         + "; ".join(parts))
    arrays = ckpt.load(prefix + n for n in sorted(want))
    state = {}
    for n in sorted(want):
        a = arrays[prefix + n]
        if n in transforms:
            a = transforms[n](a)
        state[n] = round_to(a, dtype)
    attn.load_state_dict(state)
