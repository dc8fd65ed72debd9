"""Runs a CPU artifact: the plan's kernels from its .so (through ctypes, no MLIR needed),
views, in-process collectives, and slot memory sized per call from the bound dims."""
from __future__ import annotations

import threading
from typing import Mapping, Sequence

import numpy as np

from graphir.dim import Dim
from graphir.dtype import DType, from_bits, round_to, to_bits
from graphir.lowering.artifact import Artifact
from graphir.lowering.plan import Plan, value_table

from .cpu import CpuLibrary
from .interpreter import _bind_weight, _check_input, bind_dims

_BITS = {DType.bfloat16: np.uint16, DType.float8_e4m3fn: np.uint8}


def _storage_dtype(dt: DType) -> np.dtype:
    return np.dtype(_BITS.get(dt, dt.storage))


def pack_operand(a: np.ndarray, layout: str, nr: int = 16) -> np.ndarray:
    """A matmul operand in the panel layout a kernel takes pre-packed (lowering/mlir_cpu/
    schedules.py): "nk16" packs W [N, K] (used transposed), "kn16" W [K, N]; f32 [N/nr, K, nr]."""
    a = np.asarray(a, np.float32)
    if layout == "nk16":
        n, k = a.shape
        return np.ascontiguousarray(a.reshape(n // nr, nr, k).transpose(0, 2, 1))
    if layout == "kn16":
        k, n = a.shape
        return np.ascontiguousarray(a.reshape(k, n // nr, nr).transpose(1, 0, 2))
    raise ValueError(f"pack_operand: unknown layout {layout!r}")


class CpuModel:
    """A loaded CPU artifact. `execute(*inputs)` returns numpy arrays; buffer inputs (the KV
    cache) are updated in place."""

    def __init__(self, art: Artifact, weights: Mapping[str, np.ndarray]):
        self.artifact = art
        self.graph = art.graph()
        self.plan = Plan.from_json(art.manifest["plan"])
        self._lib = CpuLibrary(art.file(art.manifest["library"]))
        self._lock = threading.Lock()
        vid, _ = value_table(self.graph)
        self._in_types = [v.type for v in self.graph.inputs]
        self._dtypes = [DType.from_short(v.dtype) for v in self.plan.values]
        self._fixed: dict[int, np.ndarray] = {}
        for n in self.graph.nodes:
            if n.op == "weight":
                a = _bind_weight(n, weights)
                self._fixed[vid[id(n.results[0])]] = to_bits(a, n.results[0].type.dtype)
            elif n.op == "constant":
                t = n.results[0].type
                self._fixed[vid[id(n.results[0])]] = to_bits(round_to(n.attrs["value"], t.dtype), t.dtype)
        self._fns = {}
        for s in self.plan.steps:
            if s.kernel != "view" and not s.kernel.startswith("runtime") and s.kernel not in self._fns:
                n_in = len(s.inputs) + (1 if s.attrs.get("symbols") else 0)
                n_out = len([o for o in s.outputs if self.plan.values[o].kind != "buffer"])
                self._fns[s.kernel] = self._lib.function(s.kernel, n_in, n_out)
        self._packed: dict[tuple[int, str], np.ndarray] = {}
        self._bind_load_time()

    def _bind_load_time(self) -> None:
        """Run the steps marked "at_load" once (they read weights only) and pack the operands
        steps take pre-packed; then drop weight copies no call reads."""
        fixed = self._fixed
        self._at_load: set[int] = set()   # values made at load: no slot memory per call
        for s in self.plan.steps:
            if s.kernel == "view":
                if s.inputs[0] in fixed:
                    fixed[s.outputs[0]] = fixed[s.inputs[0]].reshape(self._shape(s.outputs[0], {}))
                continue
            for i, layout in s.attrs.get("prepack", []):
                v = s.inputs[i]
                if (v, layout) not in self._packed and v in fixed:
                    self._packed[(v, layout)] = pack_operand(from_bits(fixed[v], self._dtypes[v]),
                                                             layout)
            if s.attrs.get("at_load"):
                outs = [np.empty(self._shape(o, {}), _storage_dtype(self._dtypes[o]))
                        for o in s.outputs]
                self._fns[s.kernel](self._inputs_of(s, fixed), outs)
                fixed.update(zip(s.outputs, outs))
                self._at_load.update(s.outputs)
        self._steps = self._per_call_steps()
        used = set(self.plan.outputs)
        for s in self._steps:
            packed = {i for i, _ in s.attrs.get("prepack", [])}
            used.update(v for j, v in enumerate(s.inputs) if j not in packed)
        for v in [v for v in fixed if v not in used]:
            del fixed[v]

    def _per_call_steps(self):
        return [s for s in self.plan.steps if not s.attrs.get("at_load")
                and not (s.kernel == "view" and s.outputs[0] in self._fixed)]

    def _inputs_of(self, s, vals) -> list[np.ndarray]:
        packed = dict(s.attrs.get("prepack", []))
        return [self._packed[(v, packed[i])] if i in packed else vals[v]
                for i, v in enumerate(s.inputs)]

    def _shape(self, v: int, env) -> tuple[int, ...]:
        return tuple(Dim(d).evaluate(env) for d in self.plan.values[v].shape)

    def execute(self, *inputs: np.ndarray) -> list[np.ndarray]:
        g = self.graph
        if len(inputs) != len(g.inputs):
            raise ValueError(f"graph {g.name!r} takes {len(g.inputs)} inputs, got {len(inputs)}")
        arrays = [_check_input(k, t, a) for k, (t, a) in enumerate(zip(self._in_types, inputs))]
        env = bind_dims(self._in_types, arrays)
        with self._lock:
            return self._run(arrays, env)

    def _run(self, arrays, env) -> list[np.ndarray]:
        plan, vals = self.plan, dict(self._fixed)
        writeback = []
        for vid_, a, t in zip(plan.inputs, arrays, self._in_types):
            k = to_bits(a, t.dtype)
            if self.plan.values[vid_].kind == "buffer" and k is not a:
                writeback.append((a, k, t.dtype))
            vals[vid_] = k
        slots = self._slots(env)
        for s in self._steps:
            if s.kernel == "view":
                vals[s.outputs[0]] = vals[s.inputs[0]].reshape(self._shape(s.outputs[0], env))
            elif s.kernel.startswith("runtime"):
                self._runtime_op(s, vals)
            else:
                outs = []
                for o in s.outputs:
                    info = plan.values[o]
                    shape, dt = self._shape(o, env), _storage_dtype(self._dtypes[o])
                    if info.slot is not None:
                        n = int(np.prod(shape)) * dt.itemsize
                        arr = slots[info.slot][:n].view(dt).reshape(shape)
                    else:
                        arr = np.empty(shape, dt)
                    vals[o] = arr
                    outs.append(arr)
                ins = self._inputs_of(s, vals)
                syms = s.attrs.get("symbols")
                if syms:
                    ins.append(np.array([env[x] for x in syms], np.int64))
                self._fns[s.kernel](ins, outs)
        for user, k, dt in writeback:
            user[...] = from_bits(k, dt)
        return [np.array(from_bits(vals[o], self._dtypes[o]), copy=True) for o in plan.outputs]

    def _slots(self, env) -> list[np.ndarray]:
        need = [0] * self.plan.n_slots
        for v in self.plan.values:
            if v.slot is not None and v.view_of is None and v.id not in self._at_load:
                n = int(np.prod(self._shape(v.id, env))) * _storage_dtype(self._dtypes[v.id]).itemsize
                need[v.slot] = max(need[v.slot], n)
        return [np.empty(n, np.uint8) for n in need]

    def _runtime_op(self, s, vals) -> None:
        # Collectives between in-process virtual devices, computed like their references.
        ins = [from_bits(vals[i], self._dtypes[i]).astype(np.float64) if self._dtypes[i].is_float
               else vals[i] for i in s.inputs]
        if s.op == "allreduce":
            total = ins[0]
            for a in ins[1:]:
                total = total + a
            results = [total] * len(s.outputs)
        elif s.op == "allgather":
            results = [np.concatenate(ins, axis=s.attrs.get("axis", 0))] * len(s.outputs)
        elif s.op == "transfer_to":
            results = ins
        else:
            raise NotImplementedError(f"the CPU runtime cannot run gir.{s.op}")
        for o, r in zip(s.outputs, results):
            dt = self._dtypes[o]
            vals[o] = to_bits(round_to(r, dt), dt)


def load(art: Artifact, weights: Mapping[str, np.ndarray], devices: Sequence) -> CpuModel:
    return CpuModel(art, weights)
