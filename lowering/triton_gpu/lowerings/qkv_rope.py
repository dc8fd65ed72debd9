"""The qkv projection and the rope_split_store it feeds, lowered as one plan step.

A one-token step (M = 1) runs kernels/gemv_rope_store.py: the qkv GEMV with the rotation, the
q store and the paged k/v stores in its epilogue, so the separate rope_split_store kernel, its
PDL wait and its reads of qkv go. The pair is fused when the projection's tuned one-row choice
is a GEMV without split-K whose rows a program (2 x PAIRS) stay within one head, and
rope_split_store has no q/k RMSNorm (the norm needs a whole head). Every other row count runs
the tuned matmul choice into scratch, then rope_split_store's launches, one variant per
(matmul bucket run, rope_split_store form); `FUSE = False` keeps that form for M = 1 too
(tools/gpu_sweeps/qkv_rope_ab.py compares the two).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from graphir.dim import Dim
from graphir.lowering.triton_gpu import tuning
from graphir.lowering.triton_gpu.kernels import gemv_rope_store as grs
from graphir.lowering.triton_gpu.kernels import matmul_configs as mc
from graphir.types import ChainType

from .base import StepBuilder, e
from .common import MM_DTYPES, cache_dims, pow2_head_dim
from .linalg import emit_choice, hand_matmul_ok, runs
from .rope_store import rope_split_store_launches

FUSE = True
OP = "fused_qkv_matmul+rope_split_store"


@dataclass
class QkvRope:
    """A schedule unit (lowering/triton_gpu/backend.py): the projection and its
    rope_split_store; inputs and outputs as a FusionGroup has them."""

    nodes: list
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)


def find_units(graph, exclude=frozenset()) -> list[QkvRope]:
    """Projections (fused_qkv_matmul, or matmul with a static weight) whose only reader is
    a rope_split_store without q/k norm, as qkv; nodes in `exclude` (host nodes) stay out."""
    users: dict[int, list] = {}
    for n in graph.nodes:
        for v in n.operands:
            users.setdefault(id(v), []).append(n)
    outputs = {id(v) for v in graph.outputs}
    producer = {id(r): n for n in graph.nodes for r in n.results}
    units = []
    for rss in graph.nodes:
        if rss.op != "rope_split_store" or id(rss) in exclude or \
                sum(not isinstance(v.type, ChainType) for v in rss.operands) != 6:
            continue
        qkv = rss.operands[0]
        mm = producer.get(id(qkv))
        if mm is None or id(mm) in exclude or id(qkv) in outputs or \
                [id(u) for u in users.get(id(qkv), [])] != [id(rss)] or not _projection(mm):
            continue
        x, w = mm.operands[:2]
        ins = [x, w, *mm.operands[2:3]] if mm.op == "fused_qkv_matmul" else [x, w]
        units.append(QkvRope([mm, rss], ins + list(rss.operands[1:6]),
                             [r for r in rss.results if not isinstance(r.type, ChainType)]))
    return units


def _projection(mm) -> bool:
    if mm.op == "fused_qkv_matmul":
        return hand_matmul_ok(*mm.operands[:2])
    if mm.op == "matmul":
        a = mm.attrs
        return hand_matmul_ok(*mm.operands, bool(a.get("transpose_a")),
                              bool(a.get("transpose_b")))
    return False


def lower_unit(sb: StepBuilder, unit: QkvRope) -> None:
    mm, rss = unit.nodes
    x, w = mm.operands[:2]
    bias = mm.operands[2] if mm.op == "fused_qkv_matmul" and len(mm.operands) == 3 else None
    M, N, K = x.type.shape[0], int(w.type.shape[0]), int(w.type.shape[1])
    static = Dim(M).is_static
    dt = MM_DTYPES[x.type.dtype]
    facts = {"dtype": mc.triton_dtype(dt), "N": N, "K": K, "bias": bias is not None}
    choices = tuning.select("matmul", facts, f"{sb.op} -> %{sb.outputs[0]}",
                            size=int(Dim(M)) if static else None)
    fused = _fused_spec(rss, choices, x, bias, K) if not static or int(Dim(M)) == 1 else None
    rest = choices
    if fused is not None:
        with sb.when(None if static else f"{e(M)} <= 1"):
            _launch_fused(sb, fused, x, w, bias, rss)
        if static:
            return
        rest = [ch for ch in choices if ch.bucket != "m1"]
    # The two-kernel form: the projection into scratch, then rope_split_store's launches;
    # one variant per row range where both the matmul choice and the rope form are the same.
    q_scratch = ["s", "qkv"]
    ropes = rope_split_store_launches(sb, rss, q_scratch)
    for top, ch, rope in _ranges(runs(rest), ropes, int(Dim(M)) if static else None):
        _, _, key, grid, args = rope
        with sb.when(None if top is None else f"{e(M)} <= {top}"):
            sb.scratch("qkv", dt, f"({e(M)}) * {N}")
            emit_choice(sb, ch, x, M, N, K, bias, q_scratch, sb.ptr(w))
            sb.launch(key, grid, args)


def _ranges(mm_runs, ropes, size: int | None) -> list[tuple]:
    """(top, matmul choice, rope launch) per row range (first match wins, the last top None)
    over the union of both lists' bounds, adjacent ranges with the same pair merged; a static
    `size` picks its one pair."""
    def at(n):  # n None: past every bound
        ch = next(c for t, c in mm_runs if t is None or (n is not None and n <= t))
        rope = next(r for r in ropes if r[1] is None or (n is not None and n <= r[1]))
        return ch, rope
    if size is not None:
        return [(None, *at(size))]
    bounds = sorted({t for t, _ in mm_runs if t is not None}
                    | {r[1] for r in ropes if r[1] is not None}) + [None]
    out: list[list] = []
    for b in bounds:
        ch, rope = at(b)
        if out and out[-1][1] is ch and out[-1][2] is rope:
            out[-1][0] = b
        else:
            out.append([b, ch, rope])
    out[-1][0] = None
    return [tuple(o) for o in out]


def _fused_spec(rss, choices, x, bias, K: int):
    """The fused kernel's spec when the one-row choice allows it, else None."""
    if not FUSE:
        return None
    ch = next((c for c in choices if c.bucket == "m1"), None)
    cfg = ch.config if ch is not None else {}
    a = rss.attrs
    d = a["head_dim"]
    pow2_head_dim(d, rss.op)
    qkv, freqs, blocks = rss.operands[0], rss.operands[1], rss.operands[5]
    pairs = cfg.get("BLOCK_N", 0) // 2
    if cfg.get("kind") != "gemv" or cfg.get("SPLIT_K", 1) != 1 or not grs.pairs_ok(pairs, d) \
            or qkv.type.dtype not in MM_DTYPES or blocks.type.dtype != qkv.type.dtype \
            or freqs.type.dtype not in MM_DTYPES:
        return None
    page, _, _ = cache_dims(blocks, rss.op)
    return grs.spec(a["n_heads"], a["n_kv_heads"], d, page, MM_DTYPES[x.type.dtype],
                    MM_DTYPES[freqs.type.dtype], a["interleaved"], bias is not None, K, pairs,
                    cfg["BLOCK_K"], cfg["num_warps"], bool(cfg.get("PREFETCH")))


def _launch_fused(sb: StepBuilder, spec, x, w, bias, rss) -> None:
    _, freqs, offs, clen, lut, blocks = rss.operands[:6]
    shape = blocks.type.shape
    sb.launch(sb.kernel(spec), list(spec.grid_for()), [
        sb.ptr(x), sb.ptr(w), sb.ptr(bias if bias is not None else x), sb.ptr(offs),
        sb.ptr(clen), sb.ptr(lut), sb.ptr(freqs), sb.ptr(blocks), sb.ptr(rss.results[0]),
        int(w.type.shape[1]), e(offs.type.shape[0] - 1), e(lut.type.shape[1]),
        rss.attrs["layer"], e(shape[2]), e(shape[0]), e(freqs.type.shape[0])])
