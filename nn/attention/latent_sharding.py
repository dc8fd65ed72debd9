"""How latent attention's weights split by heads over devices (tensor parallel).

Per-head weights (q_proj / q_b_proj rows, kv_b_proj rows, o_proj columns) take the device's
heads; the shared compression (q_a_proj, kv_a_proj_with_mqa, their norms) is replicated, and so is
the latent cache, since every head reads the same latent rows.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

_REPLICATED = ("q_a_proj", "q_a_layernorm", "kv_a_proj_with_mqa", "kv_a_layernorm")


def mla_slicer(rel: str, shape: tuple, h0: int, nh: int, qk_head_dim: int, kv_b_head_rows: int,
               v_head_dim: int) -> Callable[[np.ndarray], np.ndarray]:
    """The slice of full weight `rel` (e.g. "kv_b_proj.weight") holding heads h0 .. h0+nh-1."""
    mod, _, leaf = rel.partition(".")
    if mod in _REPLICATED or leaf in ("input_scale", "weight_scale"):
        return lambda a: a
    if leaf == "weight" and mod in ("q_proj", "q_b_proj", "kv_b_proj"):
        per = kv_b_head_rows if mod == "kv_b_proj" else qk_head_dim
        rows = slice(h0 * per, (h0 + nh) * per)
        return lambda a: a[rows]
    if leaf == "weight" and mod == "o_proj":
        cols = slice(h0 * v_head_dim, (h0 + nh) * v_head_dim)
        return lambda a: a[:, cols]
    raise ValueError(f"no tensor-parallel rule for latent attention weight {rel!r} {list(shape)}")
