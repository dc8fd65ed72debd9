"""CPU lowerings of matmul and fused_qkv_matmul.

Fast path (f32/f16/bf16, `x[..., M, K] @ W` with a 2-D W of static `[K, N]` or `[N, K]` with
transpose_b, N a multiple of one vector's f32 lanes): the packed register-blocked matmul of
schedules.py, with the MR x NR block of the target (`e.matmul`). W arrives pre-packed
`[N/NR, K, NR]` f32 when it is known at load time (a weight, or computed from weights
alone: the executor packs it once); otherwise the kernel packs it on every call. A dynamic M is
split into a static-MR block part and a < MR row remainder (see schedules.py). Narrow floats
compute in f32 and round once on store. Everything else (batched, broadcast batch dims,
transpose_a, ints) is one linalg.generic of scalar loops.

Hand-written kernels are MLIR text (`inline_mlir`): readable loops instead of builder calls.
"""
from __future__ import annotations

from mlir import ir
from mlir.dialects import arith, tensor

from graphir.dtype import DType

from ...registry import register_lowering
from .. import pack_layout, schedules
from ..emit import Emitter, element_type, index
from . import amx_matmul, bf16_matmul
from .elementwise import to_compute, to_storage
from .rows import finish_rows, rows_of
from .shape import expand_shape

_FAST_DTYPES = (DType.float32, DType.float16, DType.bfloat16)


# -- MLIR text kernels ---------------------------------------------------------------------------
def inline_mlir(args, text: str) -> list[ir.Value]:
    """Parse `text` (a module holding `func.func @body(...)` whose arguments have the types of
    `args`), move its body to the current insertion point and return the returned values."""
    mod = ir.Module.parse(text)
    fn = mod.body.operations[0]
    block = fn.regions[0].blocks[0]
    if len(block.arguments) != len(args):
        raise ValueError(f"inline_mlir: @body takes {len(block.arguments)} args, got {len(args)}")
    for formal, actual in zip(block.arguments, args):
        if formal.type != actual.type:
            raise ValueError(f"inline_mlir: argument type {formal.type} != {actual.type}")
        formal.replace_all_uses_with(actual)
    ops = list(block.operations)
    ip = ir.InsertionPoint.current
    for op in ops[:-1]:
        op.operation.detach_from_parent()
        ip.insert(op.operation)
    return list(ops[-1].operands)


def ftype(dt: DType) -> str:
    """MLIR storage element type name of a float dtype."""
    return str(element_type(dt, True))


# -- the fast path -----------------------------------------------------------------------------
def _fast_layout(a_t, b_t, attrs, cfg: schedules.MatmulConfig) -> str | None:
    """The packed layout of W ("nk<NR>" / "kn<NR>") when the fast path applies, else None."""
    if a_t.dtype not in _FAST_DTYPES or b_t.dtype is not a_t.dtype or attrs.get("transpose_a"):
        return None
    if a_t.rank < 2 or b_t.rank != 2 or not all(d.is_static for d in b_t.shape):
        return None
    if not a_t.shape[-1].is_static:
        return None
    nr = cfg.panel_width(int(b_t.shape[0] if attrs.get("transpose_b") else b_t.shape[1]))
    if nr is None:
        return None
    return f"{'nk' if attrs.get('transpose_b') else 'kn'}{nr}"


def _load_layout(a_t, b_t, attrs, cfg: schedules.MatmulConfig) -> str | None:
    """The layout W is packed in at load: the fast path's, in bf16 pairs ("nk32p") when both
    operands are bf16, K is even and the target has AVX512-BF16 (bf16_matmul.py)."""
    layout = _fast_layout(a_t, b_t, attrs, cfg)
    if (layout and cfg.bf16_dot and a_t.dtype is DType.bfloat16 and int(a_t.shape[-1]) % 2 == 0
            and schedules.parse_layout(layout)[1] == bf16_matmul.NR):
        return layout + "p"
    return layout


def _packed_matmul(e: Emitter, a: ir.Value, w: ir.Value, attrs, bias: ir.Value | None = None):
    """a @ W (+ bias) by a packed kernel: the bf16 dot kernel when the prepack rule packed W
    in bf16 pairs, the outer-product one when W is packed (at load or in the kernel); None
    when neither applies (the caller's generic matmul)."""
    packed = getattr(e, "prepack", {}).get(1)
    if packed and pack_layout.parse_layout(packed)[2]:
        return bf16_dot_matmul(e, a, w, bias)
    layout = packed or _fast_layout(e.in_types[0], e.in_types[1], attrs, e.matmul)
    if not layout:
        return None
    return fast_matmul(a, w, packed=bool(packed), layout=layout, dtype=e.in_types[0].dtype,
                       mr=e.matmul.mr, bias=bias)


@schedules.register_prepack("matmul")
def _matmul_prepack(node, load_time, cfg):
    layout = _load_layout(node.operands[0].type, node.operands[1].type, node.attrs, cfg)
    return {1: layout} if load_time[1] and layout else {}


@schedules.register_prepack("fused_qkv_matmul")
def _qkv_prepack(node, load_time, cfg):
    layout = _load_layout(node.operands[0].type, node.operands[1].type, {"transpose_b": True},
                          cfg)
    return {1: layout} if load_time[1] and layout else {}


def bf16_dot_matmul(e: Emitter, a: ir.Value, w: ir.Value, bias: ir.Value | None = None):
    """y = a @ W (+ bias) by the AMX kernel where the target has AMX tiles, else the
    AVX512-BF16 one; W packed in bf16 pairs at load (the same layout for both)."""
    at = e.in_types[0]
    n = int(e.out_types[0].shape[-1])
    a2, lead = rows_of(e, a, at)
    k = int(at.shape[-1])
    out_t = f"tensor<?x{n}xf32>"
    if e.matmul.amx and amx_matmul.amx_applies(k, n):
        # The bias and the result's dtype go into the kernel's copy-out (no second pass).
        out_dt = e.out_types[0].dtype
        out_el = {DType.bfloat16: "bf16", DType.float32: "f32"}.get(out_dt, "f32")
        out_t = f"tensor<?x{n}x{out_el}>"
        args = [a2, w] + ([bias] if bias is not None else [])
        (y,) = inline_mlir(args, amx_matmul.amx_matmul_text(
            a2.type, w.type, out_t, k, n, bias.type if bias is not None else None))
        bias = None
    else:
        text = bf16_matmul.bf16_matmul_text(a2.type, w.type, out_t, k, n, e.matmul.mr)
        (y,) = inline_mlir([a2, w], text)
    if bias is not None:
        dt = e.in_types[2].dtype
        maps = [e.identity_map(2), ir.AffineMap.get(2, 0, [ir.AffineDimExpr.get(1)]),
                e.identity_map(2)]
        (y,) = e.generic([y, bias], [tensor.EmptyOp([tensor.dim(y, index(0)), n],
                                                     ir.F32Type.get()).result], maps,
                         ["parallel", "parallel"],
                         lambda v: arith.addf(v[0], to_compute(v[1], dt)))
    m = ir.RankedTensorType(a2.type).shape[0]
    if not ir.ShapedType.is_dynamic_size(m):
        y = tensor.cast(ir.RankedTensorType.get([m, n], ir.RankedTensorType(y.type).element_type),
                        y)
    return finish_rows(e, y, lead, at)


def _pack_text(b: ir.Value, layout: str, el: str) -> str:
    """Body ops packing b ([N, K] or [K, N], element el) into %bp: [N/NR, K, NR] f32."""
    kind, nr = schedules.parse_layout(layout)
    shape = ir.RankedTensorType(b.type).shape
    n, k = (shape[0], shape[1]) if kind == "nk" else (shape[1], shape[0])
    ext = f"arith.extf %x : {el} to f32" if el != "f32" else None
    in_map = f"(p, kk, j) -> (p * {nr} + j, kk)" if kind == "nk" else f"(p, kk, j) -> (kk, p * {nr} + j)"
    body = f"%y = {ext}\n      linalg.yield %y : f32" if ext else "linalg.yield %x : f32"
    return f"""
    %bpe = tensor.empty() : tensor<{n // nr}x{k}x{nr}xf32>
    %bp = linalg.generic {{indexing_maps = [affine_map<{in_map}>, affine_map<(p, kk, j) -> (p, kk, j)>],
        iterator_types = ["parallel", "parallel", "parallel"]}}
        ins(%b : {b.type}) outs(%bpe : tensor<{n // nr}x{k}x{nr}xf32>) {{
    ^bb0(%x: {el}, %o: f32):
      {body}
    }} -> tensor<{n // nr}x{k}x{nr}xf32>"""


def _rows_matmul_text(m: int, k: int, n: int, mr: int, nr: int) -> str:
    """%out = %a [m x k] f32 @ %bp packed in NR-wide panels (m < 0: dynamic; %m, %c0, %zero
    defined before), in MR x NR register blocks.

    Rows [0, m - m % MR) as [m/MR, MR, k] blocks, the rest one by one; both write slices of one
    destination, so bufferization writes the result in place."""
    nb = n // nr
    ms = "?" if m < 0 else str(m)
    return f"""
    %cmr = arith.constant {mr} : index
    %mb = arith.divui %m, %cmr : index
    %m4 = arith.muli %mb, %cmr : index
    %rem = arith.subi %m, %m4 : index
    %out0 = tensor.empty(%m) : tensor<?x{n}xf32>
    %am = tensor.extract_slice %a[0, 0] [%m4, {k}] [1, 1] : tensor<{ms}x{k}xf32> to tensor<?x{k}xf32>
    %a3 = tensor.expand_shape %am [[0, 1], [2]] output_shape [%mb, {mr}, {k}] : tensor<?x{k}xf32> into tensor<?x{mr}x{k}xf32>
    %dm = tensor.extract_slice %out0[0, 0] [%m4, {n}] [1, 1] : tensor<?x{n}xf32> to tensor<?x{n}xf32>
    %d4 = tensor.expand_shape %dm [[0, 1], [2, 3]] output_shape [%mb, {mr}, {nb}, {nr}] : tensor<?x{n}xf32> into tensor<?x{mr}x{nb}x{nr}xf32>
    %f4 = linalg.fill ins(%zero : f32) outs(%d4 : tensor<?x{mr}x{nb}x{nr}xf32>) -> tensor<?x{mr}x{nb}x{nr}xf32>
    %c4 = linalg.generic {{indexing_maps = [affine_map<(mb, r, p, j, kk) -> (mb, r, kk)>,
          affine_map<(mb, r, p, j, kk) -> (p, kk, j)>, affine_map<(mb, r, p, j, kk) -> (mb, r, p, j)>],
        iterator_types = ["parallel", "parallel", "parallel", "parallel", "reduction"]}}
        ins(%a3, %bp : tensor<?x{mr}x{k}xf32>, tensor<{nb}x{k}x{nr}xf32>)
        outs(%f4 : tensor<?x{mr}x{nb}x{nr}xf32>) attrs = {{graphir.schedule = "{schedules.PACKED_MATMUL_ROWS}"}} {{
    ^bb0(%x: f32, %y: f32, %acc: f32):
      %p = arith.mulf %x, %y : f32
      %s = arith.addf %acc, %p : f32
      linalg.yield %s : f32
    }} -> tensor<?x{mr}x{nb}x{nr}xf32>
    %cm = tensor.collapse_shape %c4 [[0, 1], [2, 3]] : tensor<?x{mr}x{nb}x{nr}xf32> into tensor<?x{n}xf32>
    %out1 = tensor.insert_slice %cm into %out0[0, 0] [%m4, {n}] [1, 1] : tensor<?x{n}xf32> into tensor<?x{n}xf32>
    %ar = tensor.extract_slice %a[%m4, 0] [%rem, {k}] [1, 1] : tensor<{ms}x{k}xf32> to tensor<?x{k}xf32>
    %dr = tensor.extract_slice %out1[%m4, 0] [%rem, {n}] [1, 1] : tensor<?x{n}xf32> to tensor<?x{n}xf32>
    %d3 = tensor.expand_shape %dr [[0], [1, 2]] output_shape [%rem, {nb}, {nr}] : tensor<?x{n}xf32> into tensor<?x{nb}x{nr}xf32>
    %f3 = linalg.fill ins(%zero : f32) outs(%d3 : tensor<?x{nb}x{nr}xf32>) -> tensor<?x{nb}x{nr}xf32>
    %c3 = linalg.generic {{indexing_maps = [affine_map<(i, p, j, kk) -> (i, kk)>,
          affine_map<(i, p, j, kk) -> (p, kk, j)>, affine_map<(i, p, j, kk) -> (i, p, j)>],
        iterator_types = ["parallel", "parallel", "parallel", "reduction"]}}
        ins(%ar, %bp : tensor<?x{k}xf32>, tensor<{nb}x{k}x{nr}xf32>)
        outs(%f3 : tensor<?x{nb}x{nr}xf32>) attrs = {{graphir.schedule = "{schedules.PACKED_MATMUL}"}} {{
    ^bb0(%x: f32, %y: f32, %acc: f32):
      %p = arith.mulf %x, %y : f32
      %s = arith.addf %acc, %p : f32
      linalg.yield %s : f32
    }} -> tensor<?x{nb}x{nr}xf32>
    %cr = tensor.collapse_shape %c3 [[0], [1, 2]] : tensor<?x{nb}x{nr}xf32> into tensor<?x{n}xf32>
    %out = tensor.insert_slice %cr into %out1[%m4, 0] [%rem, {n}] [1, 1] : tensor<?x{n}xf32> into tensor<?x{n}xf32>"""


def _convert_text(src: str, dst: str, src_t: str, dst_t: str, dyn: str) -> str:
    """%dst = elementwise extf/truncf of the rank-2 %src (types given as text)."""
    src_el, dst_el = src_t.rsplit("x", 1)[-1][:-1], dst_t.rsplit("x", 1)[-1][:-1]
    op = "arith.extf" if dst_el == "f32" else "arith.truncf"
    return f"""
    %{dst}e = tensor.empty({dyn}) : {dst_t}
    %{dst} = linalg.generic {{indexing_maps = [affine_map<(i, j) -> (i, j)>, affine_map<(i, j) -> (i, j)>],
        iterator_types = ["parallel", "parallel"]}}
        ins(%{src} : {src_t}) outs(%{dst}e : {dst_t}) {{
    ^bb0(%x: {src_el}, %o: {dst_el}):
      %y = {op} %x : {src_el} to {dst_el}
      linalg.yield %y : {dst_el}
    }} -> {dst_t}"""


def fast_matmul(a: ir.Value, b: ir.Value, *, packed: bool, layout: str, dtype: DType,
                mr: int, bias: ir.Value | None = None) -> ir.Value:
    """y[..., N] = a[..., K] @ W (+ bias) through the packed schedule; a's leading dims are rows.

    b is W pre-packed `[N/NR, K, NR]` f32 when `packed`, else W as stored (`layout`, e.g.
    "nk32", says how and NR); register blocks of mr rows.
    """
    dyn_size = ir.ShapedType.get_dynamic_size()
    a_rt = ir.RankedTensorType(a.type)
    k, lead = a_rt.shape[-1], a_rt.shape[:-1]
    a2 = a
    if len(lead) != 1:  # rows = the leading dims collapsed (contiguous)
        m_all = dyn_size if any(ir.ShapedType.is_dynamic_size(d) for d in lead) else _prod(lead)
        a2 = tensor.collapse_shape(ir.RankedTensorType.get([m_all, k], a_rt.element_type), a,
                                   [list(range(len(lead))), [len(lead)]])
    m = ir.RankedTensorType(a2.type).shape[0]
    m = -1 if ir.ShapedType.is_dynamic_size(m) else m
    el = ftype(dtype)
    bt = ir.RankedTensorType(b.type)
    kind, nr = schedules.parse_layout(layout)
    n = bt.shape[0] * bt.shape[2] if packed else (bt.shape[0] if kind == "nk" else bt.shape[1])
    ms = "?" if m < 0 else str(m)
    a_name = "%a" if el == "f32" else "%a_in"
    args = [a2, b] + ([bias] if bias is not None else [])
    sig = [f"{a_name}: {a2.type}", f"{'%bp' if packed else '%b'}: {b.type}"]
    if bias is not None:
        sig.append(f"%bias: {bias.type}")
    text = f"""module {{
  func.func @body({", ".join(sig)}) -> RET_T {{
    %c0 = arith.constant 0 : index
    %zero = arith.constant 0.0 : f32
    %m = tensor.dim {a_name}, %c0 : {a2.type}"""
    if el != "f32":
        text += _convert_text("a_in", "a", str(a2.type), f"tensor<{ms}x{k}xf32>",
                              "%m" if m < 0 else "")
    if not packed:
        text += _pack_text(b, layout, el)
    text += _rows_matmul_text(m, k, n, mr, nr)
    result = "%out"
    if bias is not None:
        bx = f"arith.extf %bv : {el} to f32" if el != "f32" else "arith.addf %bv, %zero : f32"
        text += f"""
    %outb0 = tensor.empty(%m) : tensor<?x{n}xf32>
    %outb = linalg.generic {{indexing_maps = [affine_map<(i, j) -> (i, j)>, affine_map<(i, j) -> (j)>,
          affine_map<(i, j) -> (i, j)>], iterator_types = ["parallel", "parallel"]}}
        ins(%out, %bias : tensor<?x{n}xf32>, {bias.type}) outs(%outb0 : tensor<?x{n}xf32>) {{
    ^bb0(%x: f32, %bv: {el}, %o: f32):
      %bx = {bx}
      %y = arith.addf %x, %bx : f32
      linalg.yield %y : f32
    }} -> tensor<?x{n}xf32>"""
        result = "%outb"
    ret_t = f"tensor<?x{n}xf32>"
    if el != "f32":
        text += _convert_text(result[1:], "outc", ret_t, f"tensor<?x{n}x{el}>", "%m")
        result, ret_t = "%outc", f"tensor<?x{n}x{el}>"
    if m >= 0:
        text += f"\n    %ret = tensor.cast {result} : {ret_t} to tensor<{m}x{n}x{el}>"
        result, ret_t = "%ret", f"tensor<{m}x{n}x{el}>"
    text += f"\n    return {result} : {ret_t}\n  }}\n}}"
    (y,) = inline_mlir(args, text.replace("RET_T", ret_t, 1))
    if len(lead) != 1:
        out_shape = list(lead) + [n]
        dyn = [tensor.dim(a, arith.constant(ir.IndexType.get(), i))
               for i, d in enumerate(lead) if ir.ShapedType.is_dynamic_size(d)]
        y = expand_shape(ir.RankedTensorType.get(out_shape, ir.RankedTensorType(y.type).element_type),
                         y, [list(range(len(lead))), [len(lead)]], dyn, out_shape)
    return y


def _prod(xs) -> int:
    p = 1
    for x in xs:
        p *= int(x)
    return p


# -- the general form ----------------------------------------------------------------------------
def generic_matmul(e: Emitter, a: ir.Value, b: ir.Value, *, transpose_a: bool = False,
                   transpose_b: bool = False) -> ir.Value:
    """One linalg.generic over (batch..., [m], n, k) with numpy broadcasting of batch dims.

    Accumulates narrow floats in f32 (rounded once on store), integers in their own type."""
    at, bt = e.in_types[0], e.in_types[1]
    out = e.out_types[0]
    nb = out.rank - (2 if at.rank >= 2 else 1)
    rank = out.rank + 1
    d = [ir.AffineDimExpr.get(i) for i in range(rank)]
    kd, nd = d[rank - 1], d[rank - 2]
    md = d[rank - 3] if at.rank >= 2 else None

    def batch_exprs(t):
        r = t.rank - 2
        exprs = []
        for i in range(r):
            o = nb - r + i
            exprs.append(ir.AffineExpr.get_constant(0) if t.shape[i] == 1 and out.shape[o] != 1
                         else d[o])
        return exprs

    if at.rank >= 2:
        a_map = batch_exprs(at) + ([kd, md] if transpose_a else [md, kd])
    else:
        a_map = [kd]
    b_map = batch_exprs(bt) + ([nd, kd] if transpose_b else [kd, nd])
    o_map = d[:rank - 1]
    maps = [ir.AffineMap.get(rank, 0, x) for x in (a_map, b_map, o_map)]
    dt = out.dtype
    acc_dt = DType.float32 if dt.is_float else dt
    init = e.filled(out, 0, acc_dt)

    def body(v):
        x, y = to_compute(v[0], at.dtype), to_compute(v[1], bt.dtype)
        if dt.is_float:
            return arith.addf(v[2], arith.mulf(x, y))
        return arith.addi(v[2], arith.muli(x, y))

    (acc,) = e.generic([a, b], [init], maps, ["parallel"] * (rank - 1) + ["reduction"], body)
    if acc_dt is dt:
        return acc
    ident = e.identity_map(out.rank)
    (res,) = e.generic([acc], [e.empty(out)], [ident, ident], ["parallel"] * out.rank,
                       lambda v: to_storage(v[0], dt))
    return res


@register_lowering("matmul", "cpu")
def _matmul(e: Emitter, args):
    a, b = args
    y = _packed_matmul(e, a, b, e.attrs)
    if y is not None:
        return [y]
    return [generic_matmul(e, a, b, transpose_a=bool(e.attrs.get("transpose_a")),
                           transpose_b=bool(e.attrs.get("transpose_b")))]


@register_lowering("fused_qkv_matmul", "cpu")
def _fused_qkv(e: Emitter, args):
    x, w = args[:2]
    bias = args[2] if len(args) == 3 else None
    y = _packed_matmul(e, x, w, {"transpose_b": True}, bias)
    if y is not None:
        return [y]
    y = generic_matmul(e, x, w, transpose_b=True)
    if bias is None:
        return [y]
    out = e.out_types[0]
    dt = out.dtype
    maps = [e.identity_map(2), ir.AffineMap.get(2, 0, [ir.AffineDimExpr.get(1)]), e.identity_map(2)]
    (res,) = e.generic([y, bias], [e.empty(out)], maps, ["parallel", "parallel"],
                       lambda v: to_storage(arith.addf(to_compute(v[0], dt), to_compute(v[1], dt)), dt))
    return [res]
