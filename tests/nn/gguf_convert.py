"""Tiny .gguf files written the way llama.cpp's convert_hf_to_gguf.py + llama-quantize lay them
out: metadata keys for the shape and RoPE, Q/K rows permuted per head for "llama" (so that
adjacent pairs rotate), Qwen weights stored as trained, biases / norms as F32, and a mix of
encodings per tensor (what Q4_K_M and friends produce). Written from the GGUF format definition.
"""
from __future__ import annotations

import math

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as ref_dequantize
from gguf.quants import quantize as ref_quantize

from graphir.ops.quant.gguf_quantize import quantize_gguf

NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}
# Per-projection encodings of the mixes llama-quantize produces for attention (attn_v gets more
# bits), plus a legacy mix and a uniform one.
MIXES = {
    "Q4_K_M": {"q_proj": "Q4_K", "k_proj": "Q4_K", "v_proj": "Q6_K", "o_proj": "Q4_K"},
    "Q5_K_M": {"q_proj": "Q5_K", "k_proj": "Q5_K", "v_proj": "Q6_K", "o_proj": "Q5_K"},
    "Q3_K_M": {"q_proj": "Q3_K", "k_proj": "Q3_K", "v_proj": "Q5_K", "o_proj": "Q4_K"},
    "Q2_K_mix": {"q_proj": "Q2_K", "k_proj": "Q2_K", "v_proj": "Q3_K", "o_proj": "Q3_K"},
    "legacy": {"q_proj": "Q4_1", "k_proj": "Q5_0", "v_proj": "Q5_1", "o_proj": "Q4_0"},
    "Q8_0_all": dict.fromkeys(NAMES, "Q8_0"),
}


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama's Q/K row order: within each head, rows (i, i + D/2) of the half-split layout become
    rows (2i, 2i + 1)."""
    d = w.shape[0] // n_head
    return w.reshape(n_head, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    d = w.shape[0] // n_head
    return w.reshape(n_head, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def encode(w: np.ndarray, enc: str) -> np.ndarray:
    """The GGUF payload of float rows: gguf's quantizer where it has one, ours for K types."""
    w = np.ascontiguousarray(w, np.float32)
    if enc == "F32":
        return w
    if enc == "F16":
        return w.astype(np.float16)
    if enc.endswith("_K"):
        return quantize_gguf(w, enc)
    return np.ascontiguousarray(ref_quantize(w, T[enc])).view(np.uint8).reshape(w.shape[0], -1)


def decode(payload: np.ndarray, enc: str) -> np.ndarray:
    """The float32 rows a payload stands for, by the gguf package's dequantizer."""
    if payload.dtype != np.uint8:
        return payload.astype(np.float32)
    return ref_dequantize(payload, T[enc]).astype(np.float32)


def llama3_freq_factors(head_dim: int, theta: float, factor: float, low: float, high: float,
                        orig: int) -> np.ndarray:
    """rope_freqs.weight: the divisor of each inverse frequency under Llama-3 scaling."""
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < orig / high:
            out.append(1.0)
        elif wavelen > orig / low:
            out.append(factor)
        else:
            smooth = (orig / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, np.float32)


def write_gguf(path, arch: str, blocks: list[dict[str, np.ndarray]], mix: dict[str, str], *,
               n_head: int, n_kv: int, hidden: int, head_dim: int, theta: float,
               eps: float = 1e-6, context: int = 128, rope_freqs: np.ndarray | None = None,
               yarn: tuple[float, int] | None = None) -> list[dict[str, np.ndarray]]:
    """Write one model's attention blocks (Hugging Face names and layout in `blocks`); returns
    per block the float weights in Hugging Face layout that the file decodes to."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(len(blocks))
    w.add_context_length(context)
    w.add_embedding_length(hidden)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(eps)
    if yarn is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(yarn[0])
        w.add_rope_scaling_orig_ctx_len(yarn[1])
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs)
    decoded = []
    for b, sd in enumerate(blocks):
        out = {}
        for ours, theirs in NAMES.items():
            for kind in ("weight", "bias"):
                key = f"{ours}.{kind}"
                if key not in sd:
                    continue
                t = np.asarray(sd[key], np.float32)
                heads = {"q_proj": n_head, "k_proj": n_kv}.get(ours)
                permute = arch == "llama" and heads is not None
                stored = permute_rows(t, heads) if permute else t
                if kind == "bias":
                    w.add_tensor(f"blk.{b}.{theirs}.bias", stored)
                    out[key] = t
                    continue
                payload = encode(stored, mix[ours])
                raw = {"raw_dtype": T[mix[ours]]} if payload.dtype == np.uint8 else {}
                w.add_tensor(f"blk.{b}.{theirs}.weight", payload, **raw)
                back = decode(payload, mix[ours])
                out[key] = unpermute_rows(back, heads) if permute else back
        for norm in ("q_norm", "k_norm"):
            if f"{norm}.weight" in sd:
                v = np.asarray(sd[f"{norm}.weight"], np.float32)
                w.add_tensor(f"blk.{b}.attn_{norm}.weight", v)
                out[f"{norm}.weight"] = v
        decoded.append(out)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return decoded
