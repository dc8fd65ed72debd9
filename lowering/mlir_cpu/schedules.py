"""Fast matmul for the MLIR CPU backend: op forms to emit, and the transform-dialect schedule.

The kernel is the classic register-blocked outer-product matmul (BLIS style): an MR x NR block
of C stays in registers while k runs; A is read as scalar broadcasts and B as NR-wide vectors.
`MatmulConfig.for_target` sizes the block for the CPU target's vectors and register file
(AVX-512: 8 x 32, i.e. 16 zmm accumulators; AVX2: 6 x 16 in ymm). B must therefore be laid out "panel-packed": `[N/NR, K, NR]`, i.e. W^T cut into
NR-column panels. For a Linear layer (W is `[out, in]`) that is

    packed[p, k, j] = W[p*NR + j, k]          (numpy: W.reshape(N//NR, NR, K).transpose(0, 2, 1))

which `emit_pack_weight` emits in MLIR (cost: one pass over W per call) or the runtime does once
at load time (`graphir.runtime.cpu_executor.pack_operand`; free per call; best).

How to emit (with the Python builders, inside a func.func over tensors):

    bp = emit_pack_weight(w)                  # or take a pre-packed [N/NR, K, NR] argument
    y = emit_packed_matmul(x, bp)             # tensor<MxN>, M may be dynamic
    ...
    apply_matmul_schedule(module)             # before toolchain.compile_to_shared_object

`emit_packed_matmul` creates `linalg.fill` + a `linalg.generic` carrying the discardable attribute
`graphir.schedule = "packed_matmul"`; only ops with that attribute are scheduled. Everything
else (plain linalg.matmul, batch_matmul, generics) still compiles, as scalar loops.

Schedule (per op): scf.forall over slices of NCB panels (an OpenMP loop with the dynamic
schedule), the fill fused into each slice, tile k by KC (B block NCB x KC x NR stays in L2),
tile m by MR (1 if M is dynamic or ragged) and one panel, tile k by KU, vectorize,
lower the contraction to outer products (FMA with broadcast), hoist the accumulator into
registers. After bufferization `lower_vectors` unrolls what is left to 1-D vectors.

Dynamic M (a symbolic total_seq_len): tile sizes must stay static, so such a matmul is emitted
as two ops (see lowerings/linalg.py): rows [0, M - M % MR) viewed as `[M/MR, MR, K]` in a 5-D
generic tagged `"packed_matmul_rows"` (the static inner MR keeps the MR x NR register block),
and the < MR remaining rows as a plain `"packed_matmul"` with MR = 1.

Weight prepacking: a lowering registers a rule with `register_prepack(op)`; the backend asks
`prepack_layouts(node, load_time, cfg)` which operands the kernel takes pre-packed (only operands
known at load time: weights and what is computed from weights alone). The kernel's argument
then has the packed type (`packed_type`), the plan step records `"prepack": [[operand, layout]]`
and the executor packs that operand once when it binds the weights. Layouts (packed as f32):
`"nk<NR>"` packs a `[N, K]` operand used transposed (a Linear weight), `"kn<NR>"` a `[K, N]`
one, in panels of NR columns (`"nk32"` on AVX-512).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from mlir import ir, passmanager
from mlir.dialects import arith, linalg, tensor

from . import pack_layout

SCHEDULE_ATTR = "graphir.schedule"
PACKED_MATMUL = "packed_matmul"
PACKED_MATMUL_ROWS = "packed_matmul_rows"
_ID_ATTR = "graphir.schedule_id"


@dataclass(frozen=True)
class MatmulConfig:
    """Tile sizes of the packed-matmul schedule; `for_target` picks them for a CPU target."""
    mr: int = 4          # rows of C per register block
    nr: int = 16         # preferred panel width; must match the packed B layout
    kc: int = 256        # k block: the B block NCB x KC x NR is reused from L2 over all of M
    ncb: int = 16        # panels of width nr per L2 block
    ku: int = 8          # k unroll inside the register kernel
    threads: int = 2     # slices of the N panels, one per worker thread
    lanes: int = 8       # f32 lanes of one vector register: the narrowest panel
    bf16_dot: bool = False   # the target has AVX512-BF16: bf16 x bf16 takes bf16_matmul.py
    amx: bool = False        # ... and AMX tiles: its rows in 32-row blocks take amx_matmul.py

    def __post_init__(self):
        for name in ("mr", "nr", "kc", "ncb", "ku", "threads", "lanes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"MatmulConfig.{name} must be positive, got {getattr(self, name)}")
        if self.kc % self.ku:
            raise ValueError(f"MatmulConfig: kc ({self.kc}) must be a multiple of ku ({self.ku})")
        if self.nr % self.lanes:
            raise ValueError(f"MatmulConfig: nr ({self.nr}) must be a multiple of lanes "
                             f"({self.lanes})")

    @staticmethod
    def for_target(cpu, threads: int = 2) -> "MatmulConfig":
        """The register block for a CpuTarget: MR x NR accumulators, NR/lanes B vectors and a
        broadcast must fit its vector registers (32 zmm: 8 x 32 uses 19; 16 ymm: 6 x 16 uses
        15). k unrolled by 4 with 32 registers (four k steps a loop iteration, one loop test
        and two pointer bumps for 64 FMAs instead of three for 16: 4-8% on an AMX Xeon,
        BENCHMARKS.md, 2026-12-05; by 2 LLVM pairs A's loads through a permute and loses);
        ku = 1 with 16: LLVM keeps one k step's B vectors live, a wider unroll spills them."""
        lanes, regs = cpu.f32_lanes, cpu.vector_registers
        nr = 2 * lanes
        mr = max(1, min(8, (regs - nr // lanes - 1) // (nr // lanes)))
        return MatmulConfig(mr=mr, nr=nr, kc=256, ncb=16 * 32 // nr, ku=4 if regs >= 32 else 1,
                            threads=threads,
                            lanes=lanes, bf16_dot="bf16" in getattr(cpu, "extras", ()),
                            amx={"amx", "bf16"} <= set(getattr(cpu, "extras", ())))

    def panel_width(self, n: int) -> int | None:
        """The widest panel (nr, nr/2, ... down to one vector) that divides N; None if none."""
        w = self.nr
        while w >= self.lanes and w % self.lanes == 0:
            if n % w == 0:
                return w
            w //= 2
        return None


# Layouts (pack_layout.py): "nk<NR>" packs a [N, K] operand used transposed, "kn<NR>" a [K, N]
# one; a trailing "p" packs bf16 pairs for the AVX512-BF16 kernel.
# op name -> rule(node, load_time: list[bool] per non-chain operand, cfg) -> {operand: layout}
PREPACK_RULES: dict[str, Callable] = {}


def parse_layout(layout: str) -> tuple[str, int]:
    """("nk" | "kn", NR) of a prepack layout name such as "nk32" (or "nk32p")."""
    return pack_layout.parse_layout(layout)[:2]


def register_prepack(op: str):
    """Register the rule saying which operands of `op`'s kernel take a pre-packed layout."""
    def deco(fn):
        if op in PREPACK_RULES:
            raise ValueError(f"prepack rule of gir.{op} registered twice")
        PREPACK_RULES[op] = fn
        return fn
    return deco


def prepack_layouts(node, load_time: Sequence[bool], cfg: MatmulConfig) -> dict[int, str]:
    """{operand index: layout} for the operands `node`'s kernel takes pre-packed."""
    rule = PREPACK_RULES.get(node.op)
    out = dict(rule(node, list(load_time), cfg)) if rule else {}
    for i, layout in out.items():
        try:
            pack_layout.check_layout(layout)
        except ValueError as e:
            raise ValueError(f"gir.{node.op} operand {i}: {e}") from None
    return out


def packed_type(shape: Sequence[int], layout: str) -> ir.RankedTensorType:
    """The kernel argument's type for an operand of `shape` packed in `layout`: f32
    `[N/nr, K, nr]`, bf16 `[N/nr, K/2, 2 nr]` for a pairs layout, i8 `[N, blocks x 148]` for
    "q4k_r" (180 for "q5k_r", 212 for "q6k_r"), i8 of the same shape for GPTQ's panels."""
    # The element type follows the numpy dtype the runtime packs into (uint16: bf16 bits).
    dt = pack_layout.packed_dtype(layout)
    el = (ir.IntegerType.get_signless(8) if dt is np.uint8 else
          ir.BF16Type.get() if dt is np.uint16 else ir.F32Type.get())
    return ir.RankedTensorType.get(pack_layout.packed_shape(shape, layout), el)


def _static_2d(value: ir.Value, what: str) -> ir.RankedTensorType:
    t = ir.RankedTensorType(value.type)
    if t.rank != 2:
        raise ValueError(f"{what}: expected a rank-2 tensor, got {t}")
    return t


def emit_pack_weight(w: ir.Value, nr: int = 16) -> ir.Value:
    """Emit `W[N, K] -> packed[N/nr, K, nr]` (expand_shape + linalg.transpose)."""
    t = _static_2d(w, "emit_pack_weight")
    n, k = t.shape
    if ir.ShapedType.is_dynamic_size(n) or ir.ShapedType.is_dynamic_size(k) or n % nr:
        raise ValueError(f"emit_pack_weight: need a static [N, K] weight with N % {nr} == 0, "
                         f"got {t}")
    el = t.element_type
    expanded_t = ir.RankedTensorType.get([n // nr, nr, k], el)
    expanded = tensor.expand_shape(expanded_t, w, [[0, 1], [2]], [], [n // nr, nr, k])
    init = tensor.empty([n // nr, k, nr], el)
    op = linalg.transpose(expanded, outs=[init], permutation=[0, 2, 1])
    return op.results[0] if hasattr(op, "results") else op[0]


def emit_packed_matmul(a: ir.Value, b_packed: ir.Value) -> ir.Value:
    """Emit C[M, N] = A[M, K] @ unpack(B)[K, N] for B packed `[N/NR, K, NR]` (f32).

    The linalg.generic gets `graphir.schedule = "packed_matmul"`; M may be dynamic.
    """
    at = _static_2d(a, "emit_packed_matmul(a)")
    bt = ir.RankedTensorType(b_packed.type)
    if bt.rank != 3:
        raise ValueError(f"emit_packed_matmul: packed B must be [N/NR, K, NR], got {bt}")
    m, k = at.shape
    nb, kb, nr = bt.shape
    if k != kb:
        raise ValueError(f"emit_packed_matmul: K mismatch: a is {at}, packed b is {bt}")
    if any(ir.ShapedType.is_dynamic_size(d) for d in (k, nb, nr)):
        raise ValueError(f"emit_packed_matmul: K and N must be static, got a {at}, b {bt}")
    el = at.element_type
    if not isinstance(el, ir.F32Type) or bt.element_type != el:
        raise ValueError(f"emit_packed_matmul: only f32 is scheduled, got {at} and {bt}")
    dyn = []
    if ir.ShapedType.is_dynamic_size(m):
        dyn = [tensor.dim(a, arith.constant(ir.IndexType.get(), 0))]
    c3_t = ir.RankedTensorType.get([m, nb, nr], el)
    empty = tensor.EmptyOp([m, nb, nr] if not dyn else [dyn[0], nb, nr], el).result
    zero = arith.constant(el, 0.0)
    filled = linalg.fill(zero, outs=[empty])
    d = [ir.AffineDimExpr.get(i) for i in range(4)]  # (m, panel, j, k)
    maps = [ir.AffineMap.get(4, 0, [d[0], d[3]]), ir.AffineMap.get(4, 0, [d[1], d[3], d[2]]),
            ir.AffineMap.get(4, 0, [d[0], d[1], d[2]])]
    iters = ir.ArrayAttr.get([ir.Attribute.parse(f"#linalg.iterator_type<{x}>")
                              for x in ("parallel", "parallel", "parallel", "reduction")])
    op = linalg.GenericOp([c3_t], [a, b_packed], [filled],
                          ir.ArrayAttr.get([ir.AffineMapAttr.get(x) for x in maps]), iters)
    block = op.regions[0].blocks.append(el, el, el)
    with ir.InsertionPoint(block):
        prod = arith.mulf(block.arguments[0], block.arguments[1])
        linalg.YieldOp([arith.addf(block.arguments[2], prod)])
    op.operation.attributes[SCHEDULE_ATTR] = ir.StringAttr.get(PACKED_MATMUL)
    out_t = ir.RankedTensorType.get([m, nb * nr if not ir.ShapedType.is_dynamic_size(nb) else nb],
                                    el)
    return tensor.collapse_shape(out_t, op.result, [[0], [1, 2]])


def _k_tiles(k: int, cfg: MatmulConfig) -> tuple[int, int]:
    """(kc, ku) that divide K exactly, so every k tile has a static size."""
    ku = cfg.ku if k % cfg.ku == 0 else 1
    kc = max(c for c in range(ku, min(cfg.kc, k) + 1, ku) if k % c == 0)
    return kc, ku


def _tile_counts(cfg: MatmulConfig, n_panels: int, k: int, nr: int) -> tuple[int, int, int, int]:
    """(panels per parallel slice, panels per L2 block, kc, ku) for n_panels panels of width nr.

    A slice is one L2 block (its bytes kept when nr is narrower than the config's), or less so
    that there are at least two slices per thread: the loop is scheduled dynamically (see
    toolchain._dynamic_loops), so a slowed-down thread takes fewer slices."""
    ncb = max(1, cfg.ncb * cfg.nr // nr)
    per_slice = min(ncb, max(1, n_panels // (2 * cfg.threads)))
    kc, ku = _k_tiles(k, cfg)
    return per_slice, per_slice, kc, ku


def _tiling_script(i: int, forall: list, fuse: list, k_block: list, rows: list, k_unroll: list,
                   fill: list) -> str:
    """Transform script for matmul #i: thread slices, L2 block, k block, register block, k
    unroll, vectorize, then the same register tiling for its fill; sizes per loop of the op."""
    any_op = "!transform.any_op"
    two = f"({any_op}) -> ({any_op}, {any_op})"
    three = f"({any_op}) -> ({any_op}, {any_op}, {any_op})"
    forall, fuse, k_block, rows, k_unroll, fill = (
        "[" + ", ".join(str(x) for x in sizes) + "]"
        for sizes in (forall, fuse, k_block, rows, k_unroll, fill))
    return f"""
  %mm{i} = transform.structured.match ops{{["linalg.generic"]}} attributes{{{_ID_ATTR} = {i} : i64}} in %root : ({any_op}) -> {any_op}
  %fill{i} = transform.get_producer_of_operand %mm{i}[2] : ({any_op}) -> {any_op}
  %t0_{i}, %fa{i} = transform.structured.tile_using_forall %mm{i} tile_sizes {forall} : {two}
  %f1_{i}, %fa1_{i} = transform.structured.fuse_into_containing_op %fill{i} into %fa{i} : ({any_op}, {any_op}) -> ({any_op}, {any_op})
  %t1_{i}, %lnb{i} = transform.structured.fuse %t0_{i} tile_sizes {fuse} : {two}
  %t2_{i}, %lk{i} = transform.structured.tile_using_for %t1_{i} tile_sizes {k_block} : {two}
  %t3_{i}, %lm{i}:2 = transform.structured.tile_using_for %t2_{i} tile_sizes {rows} : {three}
  %t4_{i}, %lku{i} = transform.structured.tile_using_for %t3_{i} tile_sizes {k_unroll} : {two}
  transform.structured.vectorize %t4_{i} : {any_op}
  %fills{i} = transform.structured.match ops{{["linalg.fill"]}} in %fa1_{i} : ({any_op}) -> {any_op}
  %ft{i}, %fl{i}:2 = transform.structured.tile_using_for %fills{i} tile_sizes {fill} : {three}
  transform.structured.vectorize %ft{i} : {any_op}
"""


def _sequence_for(i: int, cfg: MatmulConfig, n_panels: int, k: int, nr: int,
                  static_m: int | None) -> str:
    per_slice, ncb, kc, ku = _tile_counts(cfg, n_panels, k, nr)
    # A ragged or dynamic M falls back to one row per register block: every tile stays static,
    # so no masks are needed (masked transfers do not lower cleanly yet).
    mr = cfg.mr if static_m is not None and static_m % cfg.mr == 0 else 1
    return _tiling_script(i, [0, per_slice], [0, ncb, 0, 0], [0, 0, 0, kc], [mr, 1, 0, 0],
                          [0, 0, 0, ku], [mr, 1, 0])


def _sequence_rows(i: int, cfg: MatmulConfig, n_panels: int, k: int, nr: int) -> str:
    """The 5-D form (mb, r, panel, j, k) with a static r = MR: one MR x NR register block."""
    per_slice, ncb, kc, ku = _tile_counts(cfg, n_panels, k, nr)
    return _tiling_script(i, [0, 0, per_slice], [0, 0, ncb, 0, 0], [0, 0, 0, 0, kc],
                          [1, 0, 1, 0, 0], [0, 0, 0, 0, ku], [1, 0, 1, 0])


_EPILOGUE = """
  %func = transform.structured.match ops{["func.func"]} in %root : (!transform.any_op) -> !transform.any_op
  transform.apply_patterns to %func {
    transform.apply_patterns.vector.reduction_to_contract
    transform.apply_patterns.vector.transfer_permutation_patterns
    transform.apply_patterns.canonicalization
  } : !transform.any_op
  // Matched in %root: `match ... in` needs exactly one target, and a module has many funcs.
  %loops = transform.structured.match ops{["scf.for"]} in %root : (!transform.any_op) -> !transform.any_op
  transform.loop.hoist_loop_invariant_subsets %loops : !transform.any_op
  transform.yield
}
"""


def apply_matmul_schedule(module: ir.Module, config: MatmulConfig | None = None) -> int:
    """Embed the transform schedule for every op tagged `graphir.schedule = "packed_matmul"`
    or `"packed_matmul_rows"` (tile sizes from `config`, default this host's target's).

    The schedule runs (and is erased) in toolchain.lower(); returns how many ops were tagged.
    Each op's panel width is its packed B's (any multiple of cfg.lanes); the rows form's MR is
    its A operand's.
    """
    if config is None:
        from .cpu_target import host_target

        config = MatmulConfig.for_target(host_target())
    cfg = config
    ops = []

    def visit(op):
        if op.name == "linalg.generic" and SCHEDULE_ATTR in op.attributes and \
                ir.StringAttr(op.attributes[SCHEDULE_ATTR]).value in (PACKED_MATMUL,
                                                                      PACKED_MATMUL_ROWS):
            ops.append(op)
        return ir.WalkResult.ADVANCE

    module.operation.walk(visit)
    if not ops:
        return 0
    body = []
    with module.context, ir.Location.unknown():
        for i, op in enumerate(ops):
            bt = ir.RankedTensorType(op.operands[1].type)
            nb, k, nr = bt.shape
            if nr % cfg.lanes:
                raise ValueError(f"apply_matmul_schedule: packed B panel width {nr} is not a "
                                 f"multiple of {cfg.lanes} f32 lanes")
            m = ir.RankedTensorType(op.operands[0].type).shape[0]
            op.attributes[_ID_ATTR] = ir.IntegerAttr.get(ir.IntegerType.get_signless(64), i)
            if ir.StringAttr(op.attributes[SCHEDULE_ATTR]).value == PACKED_MATMUL_ROWS:
                body.append(_sequence_rows(i, cfg, nb, k, nr))
                continue
            body.append(_sequence_for(i, cfg, nb, k, nr,
                                      None if ir.ShapedType.is_dynamic_size(m) else m))
        text = ("module attributes {transform.with_named_sequence} {\n"
                "transform.named_sequence @__transform_main(%root: !transform.any_op "
                "{transform.readonly}) {" + "".join(body) + _EPILOGUE + "}")
        seq_mod = ir.Module.parse(text)
        module.operation.attributes["transform.with_named_sequence"] = ir.UnitAttr.get()
        for op in list(seq_mod.body.operations):
            module.body.append(op.operation)
    return len(ops)


def run_embedded_schedule(module: ir.Module) -> None:
    """Run `@__transform_main` if the module has one, then erase every transform op."""
    seqs = [op for op in module.body.operations if op.operation.name == "transform.named_sequence"]
    if not seqs:
        return
    with module.context:
        passmanager.PassManager.parse("builtin.module(transform-interpreter)").run(module.operation)
        for op in seqs:
            op.operation.erase()
        if "transform.with_named_sequence" in module.operation.attributes:
            del module.operation.attributes["transform.with_named_sequence"]


_LOWER_VECTORS = """
module attributes {transform.with_named_sequence} {
transform.named_sequence @__transform_main(%root: !transform.any_op {transform.readonly}) {
  %func = transform.structured.match ops{["func.func"]} in %root : (!transform.any_op) -> !transform.any_op
  transform.apply_patterns to %func {
    transform.apply_patterns.vector.transfer_permutation_patterns
    transform.apply_patterns.vector.lower_masked_transfers
    transform.apply_patterns.vector.lower_masks
    transform.apply_patterns.vector.lower_contraction lowering_strategy = "outerproduct"
    transform.apply_patterns.vector.lower_outerproduct
    transform.apply_patterns.vector.lower_multi_reduction lowering_strategy = "innerparallel"
    transform.apply_patterns.canonicalization
  } : !transform.any_op
  // A separate group: shape_cast lowering would fight the unit-dim dropping above forever.
  transform.apply_patterns to %func {
    transform.apply_patterns.vector.transfer_to_scf max_transfer_rank = 1 full_unroll = true
    transform.apply_patterns.vector.lower_transfer max_transfer_rank = 1
    transform.apply_patterns.vector.lower_shape_cast
    transform.apply_patterns.vector.lower_transpose lowering_strategy = "shuffle_1d"
    transform.apply_patterns.canonicalization
  } : !transform.any_op
  transform.yield
}
}
"""


def lower_vectors(module: ir.Module) -> None:
    """After bufferization: unroll n-D vector transfers/contractions to 1-D loads and FMAs."""
    from mlir.dialects.transform import interpreter

    with module.context:
        lib = ir.Module.parse(_LOWER_VECTORS)
        interpreter.apply_named_sequence(module.operation, lib.body.operations[0], lib)
