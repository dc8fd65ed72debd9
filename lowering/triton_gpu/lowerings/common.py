"""Helpers shared by the CUDA lowerings of the kernel ops."""
from __future__ import annotations

from graphir.dtype import DType

from .base import static_int

MM_DTYPES = {DType.float32: "float32", DType.float16: "float16", DType.bfloat16: "bfloat16"}


def pow2_head_dim(d: int, op: str, minimum: int = 2) -> None:
    if d < minimum or d & (d - 1):
        raise ValueError(f"gir.{op} on cuda: head_dim must be a power of two >= {minimum}, "
                         f"got {d}")


def cache_dims(blocks, op: str) -> tuple[int, int, int]:
    shape = blocks.type.shape
    page = static_int(shape[3], f"page_size of the blocks of gir.{op}")
    nkv = static_int(shape[4], f"n_kv_heads of the blocks of gir.{op}")
    d = static_int(shape[5], f"head_dim of the blocks of gir.{op}")
    return page, nkv, d
