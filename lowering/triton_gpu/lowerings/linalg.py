"""CUDA lowerings of matmul and fused_qkv_matmul onto kernels/matmul.py.

A @ B^T with a static weight runs the hand-written kernel: decode tiles for M <= 64, prefill
tiles otherwise (two variants chosen at run time from M); other matmuls take the generic
batched kernel of reduce.py.
"""
from __future__ import annotations

from graphir.lowering.registry import register_lowering
from graphir.lowering.triton_gpu.kernels import matmul as mm

from .base import StepBuilder, e
from .common import MM_DTYPES


def hand_matmul_ok(a, b, transpose_a=False, transpose_b=True) -> bool:
    """Can the hand-written A @ B^T kernel run this matmul?"""
    ta, tb = a.type, b.type
    return (ta.rank == 2 and tb.rank == 2 and transpose_b and not transpose_a
            and ta.dtype in MM_DTYPES and ta.dtype == tb.dtype and tb.shape[1].is_static
            and tb.shape[0].is_static)


def lower_hand_matmul(sb: StepBuilder, x, w, bias, out) -> None:
    dt = MM_DTYPES[x.type.dtype]
    M, N, K = x.type.shape[0], int(w.type.shape[0]), int(w.type.shape[1])
    drop = () if K % 16 == 0 else ("K",)
    decode, prefill = mm.aot_specs(dt, has_bias=bias is not None)
    args = [sb.ptr(x), sb.ptr(w), sb.ptr(bias if bias is not None else x), sb.ptr(out),
            e(M), N, K]
    for spec, cond, cfg in ((decode, f"{e(M)} <= 64", mm.CONFIGS["decode"]),
                            (prefill, None, mm.CONFIGS["prefill"])):
        key = sb.kernel(spec, drop_divisibility=drop)
        with sb.when(cond):
            sb.launch(key, [f"cdiv({e(M)}, {cfg[0]}) * cdiv({N}, {cfg[1]})"], args)


@register_lowering("fused_qkv_matmul", "cuda")
def _fused_qkv(sb: StepBuilder, node) -> None:
    x, w = node.operands[:2]
    bias = node.operands[2] if len(node.operands) == 3 else None
    if not hand_matmul_ok(x, w):
        raise ValueError(f"gir.fused_qkv_matmul on cuda needs float16/bfloat16/float32 x and "
                         f"a static wqkv of the same dtype, got {x.type} and {w.type}")
    lower_hand_matmul(sb, x, w, bias, node.results[0])


@register_lowering("matmul", "cuda")
def _matmul(sb: StepBuilder, node) -> None:
    a, b = node.operands
    ta, tb = bool(node.attrs.get("transpose_a")), bool(node.attrs.get("transpose_b"))
    if hand_matmul_ok(a, b, ta, tb):
        lower_hand_matmul(sb, a, b, None, node.results[0])
        return
    from .reduce import lower_generic_matmul

    lower_generic_matmul(sb, node)
