"""CUDA lowerings of qmatmul (GGUF blocks and GPTQ) and dequantize onto the dequantize-in-the-loop
kernels of kernels/quant.py and kernels/quant_gptq.py.

One plan variant per bucket of X's row count M (a static M takes its bucket only); each
launches the matmul (or, for decode buckets, the GEMV of kernels/quant_gemv.py: config_for
picks) for that bucket's tile config and, when the config splits K, the fp32
partials' reduce with its scratch. X may have any rank: its leading dims are the rows.
"""
from __future__ import annotations

from graphir.dim import Dim
from graphir.dtype import DType
from graphir.lowering.registry import register_lowering
from graphir.lowering.triton_gpu.kernels import quant as qk
from graphir.lowering.triton_gpu.kernels import quant_gptq as gk
from graphir.lowering.triton_gpu.kernels.quant_gguf import groups_per_row

from .base import StepBuilder, e, numel
from .common import MM_DTYPES

NOMINAL_N = 4096  # tile choice for a weight whose row count is symbolic


def _buckets(tops: list[int | None], M: Dim) -> list[tuple[str | None, int | None]]:
    """(when, largest M) per row bucket; a static M gets its own bucket alone."""
    if M.is_static:
        return [(None, int(M))]
    return [(None if top is None else f"{e(M)} <= {top}", top) for top in tops]


def _x_dtype(x, op: str) -> str:
    if x.type.dtype not in MM_DTYPES:
        raise ValueError(f"gir.{op} on cuda needs float32, float16 or bfloat16 activations, "
                         f"got {x.type.dtype.short}")
    return MM_DTYPES[x.type.dtype]


def _launch(sb: StepBuilder, specs, conf, M: str, N: str, head: list, tail: list, out,
            bm: int | None = None, bn: int | None = None) -> None:
    """The matmul over (M / bm) x (N / bn) x SPLIT_K programs (bm, bn default to the config's
    BLOCK_M, BLOCK_N), writing `out`, or fp32 partials then the reduce into `out`."""
    split = conf["SPLIT_K"]
    main = sb.kernel(specs[0])
    bm, bn = bm or conf["BLOCK_M"], bn or conf["BLOCK_N"]
    grid = [f"cdiv({M}, {bm})", f"cdiv({N}, {bn})", split]
    if split == 1:
        sb.launch(main, grid, head + [sb.ptr(out)] + tail)
        return
    part = sb.scratch(f"part_s{split}", "float32", f"{split} * ({M}) * ({N})")
    sb.launch(main, grid, head + [part] + tail)
    sb.launch(sb.kernel(specs[1]), [f"cdiv(({M}) * ({N}), {qk.REDUCE_BLOCK})"],
              [part, sb.ptr(out), sb.ptr(out), M, N])


def _gguf(sb: StepBuilder, node, x, w, enc: str, dt: str) -> None:
    K = int(x.type.shape[-1])
    n_groups = groups_per_row(enc, K)
    Mdim = numel(x.type.shape[:-1])
    Nd = Dim(w.type.shape[0])
    n_nominal = int(Nd) if Nd.is_static else NOMINAL_N
    row_bytes = int(w.type.shape[1])
    M, N = e(Mdim), e(Nd)
    for cond, top in _buckets(qk.bucket_tops(), Mdim):
        conf = qk.config_for(top, enc, n_nominal, K, dt)
        with sb.when(cond):
            _launch(sb, qk.matmul_specs(enc, dt, conf, row_bytes), conf, M, N,
                    [sb.ptr(x), sb.ptr(w)],
                    [M, N, row_bytes, n_groups, conf["groups_per_split"]], node.results[0])


def _gptq(sb: StepBuilder, node, x, w, dt: str) -> None:
    a = node.attrs
    bits = int(a.get("bits", 4))
    K = int(x.type.shape[-1])
    N = int(w.type.shape[1])
    gs = gk.check_shape(K, N, int(a["group_size"]), bits)
    rest = list(node.operands[2:])
    qzeros = rest.pop(0) if not a["sym"] else None
    perm = rest.pop(0) if a["desc_act"] else None
    perm_t = {DType.int64: "*i64"}.get(perm.type.dtype, "*i32") if perm is not None else "*i32"
    Mdim = numel(x.type.shape[:-1])
    M = e(Mdim)
    null = ["n"]
    for cond, top in _buckets(gk.bucket_tops(perm is not None), Mdim):
        conf = gk.config_for(top, N, K, bits, dt, has_perm=perm is not None)
        specs = gk.matmul_specs(dt, conf, bits=bits, has_zeros=qzeros is not None,
                                zero_plus_one=a["checkpoint_format"] == "gptq",
                                has_perm=perm is not None, n=N)
        if perm_t != "*i32":
            from dataclasses import replace

            specs[0] = replace(specs[0], signature={**specs[0].signature, "perm_ptr": perm_t})
        head = [sb.ptr(x), sb.ptr(w), sb.ptr(qzeros) if qzeros is not None else null,
                sb.ptr(perm) if perm is not None else null]
        with sb.when(cond):
            _launch(sb, specs, conf, M, str(N), head,
                    [M, N, K, gs, conf["tiles_per_split"]], node.results[0])


@register_lowering("qmatmul", "cuda")
def _qmatmul(sb: StepBuilder, node) -> None:
    x, w = node.operands[:2]
    dt = _x_dtype(x, node.op)
    enc = node.attrs["encoding"]
    if enc == "GPTQ":
        _gptq(sb, node, x, w, dt)
    else:
        _gguf(sb, node, x, w, enc, dt)


@register_lowering("dequantize", "cuda")
def _dequantize(sb: StepBuilder, node) -> None:
    (w,) = node.operands
    enc = node.attrs["encoding"]
    K = int(node.results[0].type.shape[1])
    n_groups = groups_per_row(enc, K)
    spec = qk.dequant_spec(enc)
    ng = spec.constexprs["NG"]
    N = e(w.type.shape[0])
    sb.launch(sb.kernel(spec), [f"cdiv({N}, {qk.DEQUANT_BLOCK_N})", f"cdiv({n_groups}, {ng})"],
              [sb.ptr(w), sb.ptr(node.results[0]), N, int(w.type.shape[1]), n_groups])


@register_lowering("nib_matmul", "cuda")
def _nib_matmul(sb: StepBuilder, node) -> None:
    """The 4-bit nib kernels (kernels/quant_nib.py, quant_nib_mma.py, quant_nib_tc.py): the
    warp-MMA kernel or the GEMV for decode rows, the tensor-core kernel (or the dot tiles) for
    more, split-K partials summed by the shared reduce; past the last of those buckets the
    weight is decoded into scratch of X's dtype and multiplied by the plain matmul."""
    from graphir.lowering.nib_rewrites import repack_of
    from graphir.lowering.triton_gpu.kernels import quant_nib_config as qn

    from .linalg import emit_hand_matmul

    x = node.operands[0]
    parts = list(node.operands[1:])
    dt = _x_dtype(x, node.op)
    a = node.attrs
    K, n = int(x.type.shape[-1]), int(a["out"])
    group = a.get("group", 32)
    Mdim = numel(x.type.shape[:-1])
    M, N = e(Mdim), str(n)
    # Formats without an extra or crumb operand pass another buffer the kernel never reads.
    wargs = [sb.ptr(parts[0]), sb.ptr(parts[1]), sb.ptr(parts[2] if len(parts) > 2 else parts[1]),
             sb.ptr(parts[3] if len(parts) > 3 else parts[0])]
    tops = [top for top, _ in qn.nib_buckets(a["fmt"], dt, K)]
    from_repack = repack_of(node) is not None
    prev = 0
    for cond, top in _buckets(tops, Mdim):
        conf, cols = qn.nib_config(top, K, n, a["fmt"], dt)
        if conf.get("BLK") and a["fmt"] == "q4_k" and not from_repack:
            # Only nib_repack's q4_k scales surely carry the supers words in their spare bits:
            # operands made otherwise (a graph written by hand) have `supers` read instead.
            conf = dict(conf, SPARE=0)
        if conf.get("DEQUANT"):
            spec = qn.nib_dequant_spec(a["fmt"], dt, K, group)

            def decoded(spec=spec):
                wbuf = sb.scratch("nib_decoded", dt, f"{n} * {K}")
                sb.launch(sb.kernel(spec), list(spec.grid(n, K)), wargs + [wbuf, n, K])
                return wbuf

            # Its variants cover every row count past `prev`: no later bucket is reached.
            emit_hand_matmul(sb, x, Mdim, n, K, None, node.results[0], decoded, above=prev)
            break
        specs = qn.nib_specs(a["fmt"], dt, conf, group)
        bm = conf.get("ROWS", 1) if conf.get("GEMV") else 8 * conf.get("XN", 1) \
            if conf.get("MMA") else conf["BM"]
        bn = conf["BN"] if conf.get("TC") else 32 if conf.get("MMA") else 4 * conf["BG"]
        with sb.when(cond):
            xarg = sb.ptr(x)
            if conf.get("XP"):
                # X reordered into the tensor-core kernel's contiguous planes first.
                xs, *specs = specs
                xarg = sb.scratch("nib_x_planes", dt, f"({M}) * {K}")
                sb.launch(sb.kernel(xs), [M, K // (8 * conf["NW"])], [sb.ptr(x), xarg, K])
            _launch(sb, specs, conf, M, N, [xarg] + wargs, [M, N, K, cols],
                    node.results[0], bm=bm, bn=bn)
        prev = top
