"""Programmatic dependent launch (PDL): the prelude every Triton kernel starts with.

A kernel launched with CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION may start while the
kernel before it in the stream is still running: its launch and setup overlap that kernel's
tail instead of following it (0.3 us a launch, 0.9 us a split-K pair in a CUDA graph on an
H200: tools/gpu_sweeps/pdl.py). Correctness then rests on `griddepcontrol.wait`, which blocks
until every prerequisite grid has finished and its writes are visible, so it must come before
the kernel's first global load or store. `pdl_wait` issues it, then (one-wave grids) lets the
next kernel launch: it waits the same way before touching memory, so the chain stays ordered.

A kernel launched without the attribute finds no prerequisite grid in flight and passes the
wait at once, so the prelude costs nothing there. The offline compiler (aot.compile_kernel)
marks a cubin `launch_pdl` only when its PTX issues the wait before any global memory access;
every other kernel (Gluon kernels, library calls) is launched the ordinary way, fully
serialized. The Triton interpreter has no inline assembly: there the prelude is empty.
"""

from __future__ import annotations

import re

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait

PDL_ON = tl.constexpr(not triton.knobs.runtime.interpret)


@triton.jit
def pdl_wait():
    """Wait for the kernels this one depends on; when the grid fits on the SMs at once, let
    the next kernel launch now. A grid of more programs leaves that to its programs' exits:
    the next kernel's programs, resident early, then wait on SMs that the rest of this grid
    needed (H200: a 256-program decode at B64 x 4096 lost 25%, the B64 decode step 7%, while
    the one-wave split-K decode at B1 x 1024 gained 15%; tools/gpu_sweeps/pdl.py)."""
    if PDL_ON:
        gdc_wait()
        _launch_dependents_if_one_wave()


@triton.jit
def _launch_dependents_if_one_wave():
    """griddepcontrol.launch_dependents when the grid (%nctaid) has no more programs than the
    device has SM identifiers (%nsmid), in one asm block: tl.num_programs and a branch around
    the trigger break Triton's warp-specialization pass (matmul_tma's loop)."""
    tl.inline_asm_elementwise(
        "{ .reg .u32 x, y, z, n; .reg .u64 g, t; .reg .pred p;"
        " mov.u32 x, %nctaid.x; mov.u32 y, %nctaid.y; mov.u32 z, %nctaid.z;"
        " mov.u32 n, %nsmid; mul.wide.u32 g, x, y; cvt.u64.u32 t, z; mul.lo.u64 g, g, t;"
        " cvt.u64.u32 t, n; setp.le.u64 p, g, t; @p griddepcontrol.launch_dependents;"
        " mov.u32 $0, 0; }",
        "=r", [], dtype=tl.int32, is_pure=False, pack=1)


# PTX instructions that touch global memory (or generic addresses, which may be global): loads,
# stores, atomics and reductions, async and bulk (TMA) copies, prefetches. Shared, local and
# parameter accesses are the kernel's own and may precede the wait.
_GLOBAL_ACCESS = re.compile(
    r"^\s*(?:@!?%\w+\s+)?(?:(?:ld|st|atom|red|prefetch|prefetchu)"
    r"(?!\.(?:param|shared|local|const)\b)(?:\.|\s)|cp\.|multimem\.)", re.M)


def waits_before_memory(ptx: str, early_reads: tuple[int, ...] = ()) -> bool:
    """Whether PTX issues `griddepcontrol.wait` before its first global memory access: only
    then may the kernel be launched with programmatic stream serialization.

    `early_reads` lists parameter indices (pointers to buffers its predecessors do not write:
    weights, a graph input; the lowering and the runtime see to that) that plain global loads
    before the wait may read: each such load's address must then be computed from those
    parameters, 32-bit scalar parameters, special registers and constants alone
    (`_clean_addresses`), nothing before the wait may store, and no branch before it may jump
    past it (so every path waits before its first store). Any other access refuses the
    kernel.

    In either case no branch before the wait may leave the code before it: a warp that jumps
    past the wait runs what follows it unordered. The warp-specialized TMA matmul's worker
    warps do (Triton puts the wait in its default partition only), and they write their TMA
    descriptors into the kernel's global scratch before any barrier: launched early behind a
    launch of the same kernel, which shares that scratch, they would rewrite descriptors its
    programs still use. Such kernels launch the ordinary way."""
    at = ptx.find("griddepcontrol.wait")
    if at < 0:
        return False
    head = ptx[:at]
    body = head[head.find("{", head.find(".entry")) + 1:]
    if _leaves_head(body):
        return False
    if not early_reads:
        return _GLOBAL_ACCESS.search(ptx, 0, at) is None
    narrow = {int(i) for t, i in _PARAM_DECL.findall(head) if t in ("u32", "s32", "b32")}
    defs: dict[str, list[tuple[str, str]]] = {}
    accesses = []
    for line in body.splitlines():
        for ins in line.split("//")[0].split(";"):
            ins = _GUARD.sub("", ins.strip())
            if not ins or ins.startswith((".", "$", "{", "}")) or ins.endswith(":"):
                continue
            op, _, rest = ins.partition(" ")
            if _GLOBAL_ACCESS.match(ins):
                accesses.append((op, rest))
            if op.startswith(_NO_DEST):
                continue
            dst, _, srcs = _split_first(rest)
            for r in _REG.findall(dst):
                defs.setdefault(r, []).append((op, srcs))
    ok = _clean_addresses(defs, set(early_reads), narrow)
    return all(op.startswith("ld.global") and all(r in ok or _SPECIAL.match(r)
                                                  for r in _REG.findall(_bracket(rest)))
               for op, rest in accesses)


def _leaves_head(body: str) -> bool:
    """Whether code before the wait branches outside it (past the wait), or somewhere the
    text does not say (an indirect branch, a call)."""
    labels = set(_LABEL.findall(body))
    for m in _BRANCH.finditer(body):
        if m[1].startswith(("brx", "call")) or m[2] not in labels:
            return True
    return False


_BRANCH = re.compile(r"^\s*(?:@!?%\w+\s+)?((?:bra|brx|call)\S*)\s+([^;,\s]+)", re.M)
_PARAM_DECL = re.compile(r"\.param\s+\.(\w+)[^,\n)]*?_param_(\d+)")
_PARAM_USE = re.compile(r"_param_(\d+)")
_GUARD = re.compile(r"^@!?%\w+\s+")
_LABEL = re.compile(r"^\s*(\$?[A-Za-z_][\w$]*):", re.M)
_REG = re.compile(r"%[A-Za-z_]\w*(?:\.[xyz])?")
_NO_DEST = ("st.", "red.", "prefetch", "cp.", "bar", "membar", "fence", "bra", "ret",
            "griddepcontrol", "multimem")
# Special registers whose values are the launch's geometry, not memory.
_SPECIAL = re.compile(r"^%(?:(?:n?ctaid|n?tid|nclusterid|clusterid|cluster_ctaid)\.[xyz]"
                      r"|nsmid|smid|laneid|warpid|nwarpid)$")


def _split_first(rest: str) -> tuple[str, str, str]:
    """(first operand, ',', the rest) of an operand list whose first may be a {vector}."""
    depth = 0
    for i, c in enumerate(rest):
        depth += c == "{"
        depth -= c == "}"
        if c == "," and depth == 0:
            return rest[:i], ",", rest[i + 1:]
    return rest, "", ""


def _bracket(rest: str) -> str:
    """The [address] operand of a memory instruction."""
    lo = rest.find("[")
    return rest[lo:rest.find("]", lo) + 1] if lo >= 0 else rest


def _clean_addresses(defs: dict, allowed: set, narrow: set) -> set:
    """The registers whose every value before the wait derives from allowed pointer
    parameters, 32-bit scalar parameters, special registers and constants: no memory, no
    other pointer. Two fixed points over the definitions: `clean` (greatest: a loop's
    registers may vouch for each other) drops a register with any definition reading memory,
    another parameter or a register not clean; `grounded` (least) keeps one that some
    definition reaches from clean ground without going around a cycle, so a register that no
    definition starts is refused."""
    def operands(srcs):
        return [r for r in _REG.findall(srcs) if not _SPECIAL.match(r)]

    def sound(op, srcs):
        if op.startswith("ld.param"):
            m = _PARAM_USE.search(srcs)
            return m is not None and (int(m[1]) in allowed or int(m[1]) in narrow)
        return not op.startswith(("ld", "atom", "tex", "suld", "shfl", "vote", "match", "redux"))

    clean = {r for r, ds in defs.items() if all(sound(op, srcs) for op, srcs in ds)}
    changed = True
    while changed:
        bad = {r for r in clean if any(x not in clean for _, srcs in defs[r]
                                       for x in operands(srcs))}
        clean -= bad
        changed = bool(bad)
    grounded: set = set()
    changed = True
    while changed:
        new = {r for r in clean - grounded
               if any(all(x in grounded for x in operands(srcs)) for _, srcs in defs[r])}
        grounded |= new
        changed = bool(new)
    return grounded


@triton.jit
def pdl_trigger():
    """Let the next kernel launch now: it waits for this one before touching what this one
    writes (pdl_wait), or reads before its wait only what no kernel here writes."""
    if PDL_ON:
        tl.inline_asm_elementwise("griddepcontrol.launch_dependents; mov.u32 $0, 0;", "=r", [],
                                  dtype=tl.int32, is_pure=False, pack=1)
