"""cuda's 4-bit weights in the nib layout: the rewrite into it, and the way back for other backends.

The cuda backend rewrites `qmatmul(x, weight...)` of a 4-bit GGUF (Q4_0, Q4_1, Q4_K), GGUF
Q6_K or GPTQ (4-bit, no desc_act) weight into `nib_matmul(x, nib_repack(weight...))` (ops/quant_nib.py)
when the weight operands are computable at load time (weights and constants only): the
executor then repacks once at load and the kernels read 16-byte aligned codes and scales.
A graph holding these ops compiled for a backend without them (the CPU) gets the qmatmul back.
"""
from __future__ import annotations

from graphir.ops.quant.gptq import resolve_group_size
from graphir.ops.quant_nib import nib_format

from .plan import host_nodes
from .registry import lowering_for, register_backend_rewrite, register_decomposition

# The switch (tools/gpu_sweeps/quant_nib.py measures the nib kernels against the block kernels).
NIB_ENABLED = True
_GPTQ_ATTRS = ("group_size", "sym", "checkpoint_format")


@register_backend_rewrite("qmatmul", "cuda")
def qmatmul_to_nib(node, rw) -> bool:
    fmt = nib_format(node.attrs)
    # Without the cuda lowerings registered the decomposition would turn it straight back.
    if not NIB_ENABLED or fmt is None or lowering_for("nib_matmul", "cuda") is None:
        return False
    x, weights = node.operands[0], list(node.operands[1:])
    if not x.type.shape[-1].is_static:
        return False
    # The repack must be a load-time step: its operands computable from weights alone.
    host = host_nodes(rw.graph)
    if not all(w.node is not None and id(w.node) in host for w in weights):
        return False
    k = int(x.type.shape[-1])
    a = node.attrs
    if fmt.startswith("gptq"):
        group = resolve_group_size(a["group_size"], k)
        out = int(weights[0].type.shape[1])
        extra = {n: a[n] for n in _GPTQ_ATTRS}
    else:
        group, out, extra = 32, int(weights[0].type.shape[0]), {}
    if k % 32 or group % 32:
        return False
    parts = rw.create("nib_repack", weights, dict(encoding=a["encoding"], fmt=fmt, k=k, **extra),
                      before=node)
    y = rw.create("nib_matmul", [x] + list(parts), dict(fmt=fmt, out=out, group=group),
                  before=node)
    rw.replace(node, y)
    return True


def repack_of(node):
    """The nib_repack whose results, in order, are nib_matmul `node`'s weight operands, or None
    (operands written by hand or computed otherwise: nothing vouches for their layout's extras,
    such as q4_k's words in the scales' spare bits)."""
    rep = node.operands[1].node
    if rep is None or rep.op != "nib_repack" or \
            [id(v) for v in node.operands[1:]] != [id(r) for r in rep.results]:
        return None
    return rep


@register_decomposition("nib_matmul")
def nib_matmul_back(node, rw) -> bool:
    """nib_matmul(x, nib_repack(w...)) -> qmatmul(x, w...) where nib ops have no lowering."""
    rep = repack_of(node)
    if rep is None:
        return False
    a = rep.attrs
    attrs = {"encoding": a["encoding"]}
    if a["encoding"] == "GPTQ":
        attrs.update({n: a[n] for n in _GPTQ_ATTRS}, desc_act=False, bits=4)
    y = rw.create("qmatmul", [node.operands[0]] + list(rep.operands), attrs, before=node)
    rw.replace(node, y)
    return True


@register_decomposition("nib_repack")
def nib_repack_unused(node, rw) -> bool:
    """A repack nothing reads any more (its nib_matmul went back to qmatmul) is dropped."""
    users = rw.graph.users()
    outs = {id(v) for v in rw.graph.outputs}
    if any(users.get(id(r)) or id(r) in outs for r in node.results):
        return False
    rw.erase(node)
    return True
