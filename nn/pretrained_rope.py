"""The graphir rotary embedding for a Hugging Face layer's RoPE parameters (HF rope_type
"default", "linear", "dynamic", "llama3", "yarn", "longrope"), with transformers' rules for
the values a config leaves out (YaRN's attention factor and betas, LongRoPE's attention factor).
"""
from __future__ import annotations

import math

from graphir.device import DeviceRef
from graphir.ops.rope_math import yarn_mscale

from .config_values import config_int, config_number
from .rotary_embedding import (Llama3RopeScalingParams, Llama3RotaryEmbedding,
                               LinearScalingParams, LongRoPERotaryEmbedding, LongRoPEScalingParams,
                               RotaryEmbedding)
from .rotary_yarn import (DeepseekYarnRopeScalingParams, DeepseekYarnRotaryEmbedding,
                          YarnRotaryEmbedding, YarnScalingParams)

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")


def _num(rp: dict, key: str, what: str, optional: bool = False, **limits) -> float | None:
    """rope_parameters[key] as a finite number (positive unless `limits` say otherwise)."""
    limits = limits or {"positive": True}
    return config_number(rp.get(key), f"from_pretrained: {what} rope_parameters[{key!r}]",
                         optional=optional, **limits)


def _orig(rp: dict, what: str) -> int:
    return config_int(rp.get("original_max_position_embeddings"),
                      f"from_pretrained: {what} original_max_position_embeddings")


def default_max_seq_len(rp: dict, max_position_embeddings: int) -> int:
    """max_position_embeddings, or half of it for dynamic NTK (see rope_from_parameters)."""
    if rp["rope_type"] == "dynamic":
        return max(1, max_position_embeddings // 2)
    return max_position_embeddings


def yarn_attention_factor(rp: dict, factor: float) -> float:
    """transformers' YaRN attention factor: given, else the mscale ratio when mscale and
    mscale_all_dim are both set, else 0.1 ln(factor) + 1."""
    af = _num(rp, "attention_factor", "yarn", optional=True)
    if af is not None:
        return af
    ms = _num(rp, "mscale", "yarn", optional=True, minimum=0.0)
    msa = _num(rp, "mscale_all_dim", "yarn", optional=True, minimum=0.0)
    if ms and msa:
        return yarn_mscale(factor, ms) / yarn_mscale(factor, msa)
    return yarn_mscale(factor)


def rope_from_parameters(rp: dict, *, dim: int, n_heads: int, head_dim: int, max_seq_len: int,
                         max_position_embeddings: int, interleaved: bool, device: DeviceRef,
                         deepseek: bool = False) -> RotaryEmbedding:
    """The rotary embedding that computes what transformers computes for `rp` (a layer's
    standardized rope_parameters), its table [2 * max_seq_len, head_dim].

    Dynamic NTK rescales every frequency by the running sequence length once a sequence passes
    max_position_embeddings, which no per-position table can hold: it is accepted only while
    the whole table (2 * max_seq_len rows) stays below max_position_embeddings, where it is the
    plain RoPE.
    """
    kind, theta = rp["rope_type"], _num(rp, "rope_theta", "the")
    if kind not in ROPE_TYPES:
        raise ValueError(f"from_pretrained: unsupported rope_type {kind!r}; supported: "
                         f"{list(ROPE_TYPES)}")
    common = dict(head_dim=head_dim, interleaved=interleaved, device=device)
    if kind == "default":
        return RotaryEmbedding(dim, n_heads, theta, max_seq_len, **common)
    if kind == "linear":
        return RotaryEmbedding(dim, n_heads, theta, max_seq_len, **common,
                               scaling_params=LinearScalingParams(_num(rp, "factor", "linear")))
    if kind == "dynamic":
        if 2 * max_seq_len > max_position_embeddings:
            raise ValueError(
                f"from_pretrained: rope_type 'dynamic' (NTK) rescales all frequencies with the "
                f"running sequence length past max_position_embeddings = "
                f"{max_position_embeddings}; a fixed table cannot represent that. Its table "
                f"holds 2 * max_seq_len = {2 * max_seq_len} positions: pass max_seq_len <= "
                f"{max_position_embeddings // 2}")
        return RotaryEmbedding(dim, n_heads, theta, max_seq_len, **common)
    if kind == "llama3":
        p = Llama3RopeScalingParams(_num(rp, "factor", "llama3"),
                                    _num(rp, "low_freq_factor", "llama3"),
                                    _num(rp, "high_freq_factor", "llama3"),
                                    _orig(rp, "llama3"))
        return Llama3RotaryEmbedding(dim, n_heads, theta, max_seq_len, scaling_params=p, **common)
    orig = _orig(rp, kind)
    if kind == "yarn":
        factor = _num(rp, "factor", "yarn", optional=True)
        factor = max_position_embeddings / orig if factor is None else factor
        af = yarn_attention_factor(rp, factor)
        beta_fast = _num(rp, "beta_fast", "yarn", optional=True) or 32
        beta_slow = _num(rp, "beta_slow", "yarn", optional=True) or 1
        truncate = rp.get("truncate", True)
        if not isinstance(truncate, bool):
            raise ValueError(f"from_pretrained: yarn rope_parameters['truncate'] must be true or "
                             f"false, got {truncate!r}")
        if deepseek:
            p = DeepseekYarnRopeScalingParams(factor, orig, beta_fast, beta_slow,
                                              _num(rp, "mscale", "yarn", optional=True,
                                                   minimum=0.0) or 1.0,
                                              _num(rp, "mscale_all_dim", "yarn", optional=True,
                                                   minimum=0.0) or 0.0,
                                              truncate=truncate, attention_factor=af)
            return DeepseekYarnRotaryEmbedding(dim, n_heads, theta, max_seq_len,
                                               scaling_params=p, **common)
        p = YarnScalingParams(factor, beta_fast, beta_slow, orig, truncate, attention_factor=af)
        return YarnRotaryEmbedding(dim, n_heads, theta, max_seq_len, scaling_params=p, **common)
    # longrope
    factor = _num(rp, "factor", "longrope", optional=True)
    factor = max_position_embeddings / orig if factor is None else factor
    af = _num(rp, "attention_factor", "longrope", optional=True)
    if af is None:
        if factor > 1.0 and orig == 1:   # transformers' default divides by log(orig)
            raise ValueError("from_pretrained: longrope original_max_position_embeddings = 1 "
                             "leaves the default attention_factor undefined; set it")
        af = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    for key in ("short_factor", "long_factor"):
        f = rp.get(key)
        if not isinstance(f, list) or len(f) != head_dim // 2:
            raise ValueError(f"from_pretrained: longrope {key} must list head_dim / 2 = "
                             f"{head_dim // 2} numbers, got {f!r}")
        for j, x in enumerate(f):
            config_number(x, f"from_pretrained: longrope {key}[{j}]", positive=True)
    p = LongRoPEScalingParams(rp["short_factor"], rp["long_factor"], orig,
                              max_position_embeddings, attention_factor=float(af))
    return LongRoPERotaryEmbedding(dim, n_heads, theta, max_seq_len, scaling_params=p, **common)
