"""How attention heads and their weights split over devices (tensor parallel).

Each device takes NH / n query heads and the KV heads those query heads read. When the device
count does not divide n_kv_heads (but n_kv_heads divides it), a KV head is replicated on every
device whose query heads read it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class HeadShard:
    q0: int  # first query head
    nq: int
    k0: int  # first KV head
    nk: int


def tp_head_plan(n_heads: int, n_kv_heads: int, n_devices: int) -> list[HeadShard]:
    """The heads of each device; ValueError when the heads cannot split evenly."""
    if n_devices < 1:
        raise ValueError(f"need at least one device, got {n_devices}")
    if n_heads % n_devices:
        raise ValueError(f"num_attention_heads {n_heads} is not divisible by the {n_devices} "
                         f"devices")
    group, nq = n_heads // n_kv_heads, n_heads // n_devices
    plan = []
    for i in range(n_devices):
        q0 = i * nq
        kvs = sorted({h // group for h in range(q0, q0 + nq)})
        k0, nk = kvs[0], len(kvs)
        if nq % nk or any((q0 + j) // group - k0 != j // (nq // nk) for j in range(nq)):
            raise ValueError(f"{n_heads} query heads and {n_kv_heads} KV heads cannot be split "
                             f"over {n_devices} devices (device {i} would hold query heads "
                             f"{q0}..{q0 + nq - 1} reading KV heads {kvs})")
        plan.append(HeadShard(q0, nq, k0, nk))
    if len({p.nk for p in plan}) != 1:
        raise ValueError(f"{n_heads} query heads and {n_kv_heads} KV heads split over "
                         f"{n_devices} devices give devices different KV head counts "
                         f"{[p.nk for p in plan]}")
    return plan


def _identity(a: np.ndarray) -> np.ndarray:
    return a


def tp_slicer(rel: str, shape: tuple, p: HeadShard, n_heads: int, n_kv_heads: int,
              head_dim: int) -> Callable[[np.ndarray], np.ndarray]:
    """The slice of the full weight `rel` (e.g. "q_proj.weight") that device plan `p` holds."""
    d = head_dim
    q = slice(p.q0 * d, (p.q0 + p.nq) * d)
    k = slice(p.k0 * d, (p.k0 + p.nk) * d)
    mod, _, leaf = rel.partition(".")
    rowwise = leaf in ("weight", "bias") or (leaf == "weight_scale" and len(shape) == 2)
    if mod in ("q_norm", "k_norm") or leaf == "input_scale":
        return _identity
    if mod == "o_proj":
        return (lambda a: a[:, q]) if leaf == "weight" else _identity
    if mod in ("q_proj", "k_proj", "v_proj"):
        rows = q if mod == "q_proj" else k
        return (lambda a: a[rows]) if rowwise else _identity
    if mod == "qkv_proj":
        ko, vo = n_heads * d, (n_heads + n_kv_heads) * d
        kk = slice(ko + k.start, ko + k.stop)
        vv = slice(vo + k.start, vo + k.stop)
        return lambda a: np.concatenate([a[q], a[kk], a[vv]], axis=0)
    raise ValueError(f"no tensor-parallel rule for weight {rel!r}")
