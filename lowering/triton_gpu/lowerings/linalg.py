"""CUDA lowerings of matmul and fused_qkv_matmul onto the matmul kernels.

A @ B^T with a static weight runs the hand-written kernels: one plan variant per bucket of the
row count M (kernels/matmul_configs.py), each running the config the tuning table chose for that
bucket and weight shape (tuning.py; adjacent buckets with the same choice share a variant). A
cuBLASLt choice is a launch of a "cublaslt" kernel entry that names its Triton fallback, which
takes the same grid and arguments, so a machine without the library still runs the plan; the
entry carries the algorithm the tuner measured (a rank of cuBLASLt's heuristic list and, when
tuned here, its record), so serving runs what was timed. Other matmuls take the generic
batched kernel of reduce.py.
"""
from __future__ import annotations

import json
from dataclasses import replace

from graphir.dim import Dim
from graphir.lowering.registry import register_lowering
from graphir.lowering.triton_gpu import tuning
from graphir.lowering.triton_gpu.kernels import matmul_configs as mc

from .base import StepBuilder, e
from .common import MM_DTYPES


def hand_matmul_ok(a, b, transpose_a=False, transpose_b=True) -> bool:
    """Can the hand-written A @ B^T kernel run this matmul?"""
    ta, tb = a.type, b.type
    return (ta.rank == 2 and tb.rank == 2 and transpose_b and not transpose_a
            and ta.dtype in MM_DTYPES and ta.dtype == tb.dtype and tb.shape[1].is_static
            and tb.shape[0].is_static)


def _same_run(ch) -> tuple:
    """What adjacent buckets must share to share a variant: the config, its fallback, its
    params, and for a pinned cuBLASLt rank the bucket itself (each bucket pins the algorithm
    of its own tuned row count)."""
    pinned = ch.config.get("ALGO_INDEX", 0) > 0
    return (ch.config["name"], (ch.fallback or {}).get("name"),
            json.dumps(ch.params, sort_keys=True), ch.bucket if pinned else None)


def _variants(choices, M_expr: str, static: bool) -> list[tuple[str | None, object]]:
    """(when, choice) per run of adjacent buckets with the same choice; the last is `None`."""
    if static:
        return [(None, choices[0])]
    tops = dict(mc.BUCKETS)
    out: list[list] = []
    for ch in choices:
        same = out and _same_run(out[-1][1]) == _same_run(ch)
        top = tops[ch.bucket]
        if same:
            out[-1][0] = top
        else:
            out.append([top, ch])
    return [(None if top is None or i == len(out) - 1 else f"{M_expr} <= {top}", ch)
            for i, (top, ch) in enumerate(out)]


def _emit_triton(sb: StepBuilder, cfg, dt: str, has_bias: bool, N: int, K: int, M_expr: str,
                 bind: dict, early: bool = False) -> None:
    plan = mc.launches(cfg, dt, has_bias, N, K, M_expr, early)
    keys = [sb.kernel(s) for s in plan["specs"]]
    for name, dtype, count in plan["scratch"]:
        bind[name] = sb.scratch(f"{name}_{cfg['name']}", dtype, count)
    for idx, grid, args in plan["ops"]:
        sb.launch(keys[idx], [e(g) for g in grid], [bind[a] for a in args])


def _emit_cublaslt(sb: StepBuilder, ch, dt: str, has_bias: bool, N: int, K: int, M_expr: str,
                   bind: dict, at_m: int) -> None:
    fb = ch.fallback
    plan = mc.launches(fb, dt, has_bias, N, K, M_expr)
    (spec,), ((_, grid, args),) = plan["specs"], plan["ops"]
    fb_key = sb.kernel(spec)
    t = mc.triton_dtype(dt)
    # The algorithm: rank ALGO_INDEX of cuBLASLt's heuristic list at the row count it was
    # tuned at, with the measured record (bytes and config) when the tuner ran; rank 0 pins
    # nothing (the heuristic chooses per M), the record is kept for `graphir inspect`.
    rank = ch.config["ALGO_INDEX"]
    algo = {"index": rank, "at_m": at_m, **((ch.params or {}).get("algo") or {})}
    # Same launch signature as the fallback; the name carries the shape (and a pinned rank)
    # so other shapes and algorithms get their own entries.
    pin = f"_h{rank}m{algo['at_m']}" if rank else ""
    lt = replace(spec, name=f"cublaslt_{t}_n{N}_k{K}{'_bias' if has_bias else ''}{pin}",
                 extra={"kind": "cublaslt", "fallback": fb_key, "dtype": t, "N": N, "K": K,
                        "has_bias": has_bias, "m_hints": [at_m], "algo": algo})
    key = sb.kernel(lt)
    sb.launch(key, [e(g) for g in grid], [bind[a] for a in args])


def lower_hand_matmul(sb: StepBuilder, x, w, bias, out) -> None:
    early = sb.unwritten(x) and sb.unwritten(w) and (bias is None or sb.unwritten(bias))
    emit_hand_matmul(sb, x, x.type.shape[0], int(w.type.shape[0]), int(w.type.shape[1]), bias,
                     out, lambda: sb.ptr(w), early=early)


def emit_hand_matmul(sb: StepBuilder, x, M, N: int, K: int, bias, out, weight_ptr,
                     above: int | None = None, early: bool = False) -> None:
    """out = x @ B^T for B `[N, K]` of x's dtype, x of M rows: one variant per run of row
    buckets with the same tuned choice. weight_ptr() runs inside each variant and returns B's
    pointer, so what makes B (a decode into scratch) runs only when its variant does. With
    `above`, earlier variants took every M <= above: only the buckets past it are emitted.
    `early`: no kernel of the plan writes x, B or the bias, so a GEMV may read them before
    its predecessor ends (matmul_configs.specs)."""
    dt = MM_DTYPES[x.type.dtype]
    static = Dim(M).is_static
    facts = {"dtype": mc.triton_dtype(dt), "N": N, "K": K, "bias": bias is not None}
    where = f"{sb.op} -> %{sb.outputs[0]}"
    # Only the buckets past `above` are chosen, so `--tune` times no bucket that never runs.
    choices = tuning.select("matmul", facts, where, size=int(Dim(M)) if static else None,
                            above=above)
    for cond, ch in _variants(choices, e(M), static):
        with sb.when(cond):
            bind = {"a": sb.ptr(x), "b": weight_ptr(),
                    "bias": sb.ptr(bias if bias is not None else x), "c": sb.ptr(out),
                    "M": e(M), "N": N, "K": K}
            if ch.config["kind"] == "cublaslt":
                at_m = int(Dim(M)) if static else mc.TUNE_M[ch.bucket]
                _emit_cublaslt(sb, ch, dt, bias is not None, N, K, e(M), bind, at_m)
            else:
                _emit_triton(sb, ch.config, dt, bias is not None, N, K, e(M), bind, early)


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
