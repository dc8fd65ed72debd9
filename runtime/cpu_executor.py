"""Runs a CPU artifact: the plan's kernels from its .so (through ctypes, no MLIR needed),
views, in-process collectives, and slot memory sized per call from the bound dims.

Before its library is opened, an artifact's target (e.g. cpu:x86-64:avx512) is checked against
this CPU: code built for an ISA the host lacks would die of SIGILL mid-call, so it is refused
with an ArtifactError naming the missing features."""
from __future__ import annotations

import threading
from typing import Mapping, Sequence

import numpy as np

from graphir import progress
from graphir.dim import Dim
from graphir.dtype import DType, from_bits, round_to, to_bits
from graphir.lowering.artifact import Artifact, ArtifactError
from graphir.lowering.mlir_cpu.cpu_target import check_host
from graphir.lowering.mlir_cpu.pack_layout import pack_numpy, packed_dtype, packed_shape
from graphir.lowering.plan import Plan, value_table

from .cpu import CpuLibrary
from .cpu_replay import Replay, Trace
from .dim_checks import DimCheck
from .interpreter import _bind_weight, _check_input, bind_dims, check_buffers_writable
from .ragged import RaggedCheck

_BITS = {DType.bfloat16: np.uint16, DType.float8_e4m3fn: np.uint8}


def _storage_dtype(dt: DType) -> np.dtype:
    return np.dtype(_BITS.get(dt, dt.storage))


ALIGN = 64   # bytes: a cache line, and an AVX-512 vector


def aligned_empty(nbytes: int, align: int = ALIGN) -> np.ndarray:
    """uint8 `[nbytes]` starting on an `align`-byte boundary. numpy puts large arrays 16 bytes
    past a page start, so every 64-byte vector load of such a buffer straddles two cache lines:
    W packed on a line ran the AVX-512 matmul 20-30% faster on an Intel Xeon (BENCHMARKS.md,
    CPU matmul on an Intel AVX-512 Xeon)."""
    buf = np.empty(nbytes + align, np.uint8)
    off = -buf.ctypes.data % align
    return buf[off:off + nbytes]


def pack_operand(a: np.ndarray, layout: str) -> np.ndarray:
    """A matmul operand in the panel layout a kernel takes pre-packed (lowering/mlir_cpu/
    pack_layout.py): "nk<NR>" packs W [N, K] (used transposed), "kn<NR>" W [K, N], both to f32
    [N/NR, K, NR]; "nk<NR>p" / "kn<NR>p" to bf16 pairs [N/NR, K/2, 2 NR] (uint16 bits); on a
    cache line either way (aligned_empty), packed straight into it."""
    try:
        shape = packed_shape(np.shape(a), layout)
        dtype = packed_dtype(layout)
        out = aligned_empty(int(np.prod(shape)) * np.dtype(dtype).itemsize).view(dtype)
        return pack_numpy(a, layout, out.reshape(shape))
    except ValueError as e:
        raise ValueError(f"pack_operand: {e}") from None


def _as_input(k: int, t, a) -> np.ndarray:
    """A call's input as the kernels take it: a bf16 (float8) input may come as floats (rounded
    on every call; a buffer converted back after it) or as the raw bits the kernels hold, uint16
    (uint8), used as is, so a bf16 KV cache kept as bits is updated in place with no
    conversion of the whole cache per step."""
    bits = _BITS.get(getattr(t, "dtype", None))
    if bits is not None and isinstance(a, np.ndarray) and a.dtype == bits:
        return a
    return _check_input(k, t, a)


_UNSEEN = object()   # a signature with no replay entry yet


def _check_abi(plan: Plan, lib: CpuLibrary, art: Artifact) -> None:
    """Hold each step's pre-packed operands (its "prepack" attr) to what its kernel in the
    library was compiled for: the manifest's digest is over the manifest alone, so a manifest
    rewritten with one attr lost would otherwise pass the kernel unpacked bytes."""
    try:
        abi = lib.abi()
    except ValueError as e:
        raise ArtifactError(f"{art.path}: {e}") from None
    if abi is None:
        raise ArtifactError(f"{art.path}: {art.manifest['library']} does not declare its "
                            f"kernels' operand layouts (built by an older graphir); recompile it")
    for i, s in enumerate(plan.steps):
        if s.kernel == "view" or s.kernel.startswith("runtime"):
            continue
        have = s.attrs.get("prepack") or []
        want = abi.get(s.kernel, [])
        if have != want:
            raise ArtifactError(f"{art.path}: step {i} ({s.kernel}) passes pre-packed operands "
                                f"{have}, its kernel was compiled for {want}")


class CpuModel:
    """A loaded CPU artifact. `execute(*inputs)` returns numpy arrays; buffer inputs (the KV
    cache) are updated in place. bf16 / float8 inputs: floats, or their raw bits as uint16 /
    uint8 arrays (_as_input)."""

    def __init__(self, art: Artifact, weights: Mapping[str, np.ndarray], collectives=None):
        # collectives: the process group a rank graph's collectives (attribute world_size) go
        # through (graphir.runtime.distributed); None runs them between in-process devices.
        self._collectives = collectives
        try:
            check_host(art.target)
        except ValueError as e:
            raise ArtifactError(f"{art.path}: {e}") from None
        self.artifact = art
        self.graph = art.graph()
        self._checks = None  # (DimCheck, RaggedCheck), built on the first call
        self._sigs: dict[tuple, tuple] = {}   # input signature -> (dims, bounds, FastFacts)
        self._replays: dict[tuple, Replay | None] = {}   # signature -> its replay (cpu_replay)
        self._slot_version = 0   # bumped when slot memory is reallocated (replays hold it)
        self.plan = Plan.from_json(art.manifest["plan"])
        self._lib = CpuLibrary(art.file(art.manifest["library"]))
        _check_abi(self.plan, self._lib, art)
        self._lock = threading.Lock()
        vid, _ = value_table(self.graph)
        self._in_types = [v.type for v in self.graph.inputs]
        self._dtypes = [DType.from_short(v.dtype) for v in self.plan.values]
        self._fixed: dict[int, np.ndarray] = {}
        self._dims: dict[int, list[Dim]] = {}
        self._layouts: dict[tuple, tuple] = {}   # per-call shapes by bound dims (_layout)
        self._fns = {}
        for s in self.plan.steps:
            if s.kernel != "view" and not s.kernel.startswith("runtime") and s.kernel not in self._fns:
                n_in = len(s.inputs) + (1 if s.attrs.get("symbols") else 0)
                n_out = len([o for o in s.outputs if self.plan.values[o].kind != "buffer"])
                self._fns[s.kernel] = self._lib.function(s.kernel, n_in, n_out)
        self._packed: dict[tuple[int, str], np.ndarray] = {}
        self._slot_memory = [np.empty(0, np.uint8) for _ in range(self.plan.n_slots)]
        n_weights = sum(n.op == "weight" for n in self.graph.nodes)
        n_steps = sum(bool(s.attrs.get("prepack") or s.attrs.get("at_load"))
                      for s in self.plan.steps)
        with progress.bar(n_weights + n_steps, desc="load weights", unit="step") as bar:
            bar.stage(f"binding {n_weights} weights")
            self._bind_weights(weights, vid, bar)
            bar.stage("packing and load-time steps")
            self._bind_load_time(bar)

    def _bind_weights(self, weights, vid, bar) -> None:
        """Check every weight (name, shape, dtype) and keep it, and the constants, as bits."""
        for n in self.graph.nodes:
            if n.op == "weight":
                a = _bind_weight(n, weights)
                self._fixed[vid[id(n.results[0])]] = to_bits(a, n.results[0].type.dtype)
                bar.stage(n.attrs["name"], advance=1, refresh=False)
            elif n.op == "constant":
                t = n.results[0].type
                self._fixed[vid[id(n.results[0])]] = to_bits(round_to(n.attrs["value"], t.dtype), t.dtype)

    def _bind_load_time(self, bar=progress.NULL) -> None:
        """Run the steps marked "at_load" once (they read weights only) and pack the operands
        steps take pre-packed; then drop weight copies no call reads."""
        fixed = self._fixed
        self._at_load: set[int] = set()   # values made at load: no slot memory per call
        for s in self.plan.steps:
            if s.kernel == "view":
                if s.inputs[0] in fixed:
                    fixed[s.outputs[0]] = fixed[s.inputs[0]].reshape(self._shape(s.outputs[0], {}))
                continue
            if s.attrs.get("prepack") or s.attrs.get("at_load"):
                bar.stage(s.kernel, advance=1, refresh=False)
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
        dims = self._dims.get(v)
        if dims is None:   # parsed once: a dim expression's text is not re-read every call
            dims = self._dims[v] = [Dim(d) for d in self.plan.values[v].shape]
        return tuple(d.evaluate(env) for d in dims)

    def execute(self, *inputs: np.ndarray) -> list[np.ndarray]:
        g = self.graph
        if len(inputs) != len(g.inputs):
            raise ValueError(f"graph {g.name!r} takes {len(g.inputs)} inputs, got {len(inputs)}")
        arrays = [_as_input(k, t, a) for k, (t, a) in enumerate(zip(self._in_types, inputs))]
        check_buffers_writable(self._in_types, arrays)
        with self._lock:
            # The kernels index with the metadata unchecked: validate it all before any runs.
            sig = tuple((a.shape, a.dtype) for a in arrays)
            env = self._checked_dims(arrays, sig)
            rp = self._replays.get(sig, _UNSEEN)
            if rp is None or (rp is not _UNSEEN and rp.slot_version == self._slot_version):
                if rp is not None and all(a.flags.c_contiguous for a in arrays):
                    outs, fresh = rp.run(arrays)
                    return self._outputs(dict(zip(self.plan.outputs, outs)), fresh)
                return self._run(arrays, env)
            # unseen, or traced before another signature regrew the slot memory: (re)trace
            trace = Trace()
            out = self._run(arrays, env, trace)
            if len(self._replays) >= self._MAX_SIGNATURES:
                self._replays.clear()
            self._replays[sig] = Replay.build(trace, arrays, self._slot_version)
            return out

    _MAX_SIGNATURES = 64

    def _checked_dims(self, arrays, sig: tuple) -> dict[str, int]:
        """The call's bound dims, after the dim and ragged-metadata checks. Per input
        signature `sig` (shapes, dtypes) the dims and their checks are worked out once; the ragged
        metadata then takes the fast check (runtime/ragged.py FastFacts: byte comparisons with
        the last call's offsets and lookup table, a scalar read of a cache length) and the full
        one, which names the fault, whenever the fast one is not sure. Solving the dims and
        the full check each call cost ~300 us of a 2.5 ms CPU decode step."""
        entry = self._sigs.get(sig)
        if self._checks is None:
            self._checks = (DimCheck(self.graph), RaggedCheck(self.graph))
            self._meta = {k for grp in self._checks[1].groups
                          for k in (grp.offsets, grp.lookup) if k is not None}
        ragged = self._checks[1]
        if entry is None:
            env = bind_dims(self._in_types, arrays)
            self._checks[0].check(env)
            bounds = ragged.bounds(env)
            ragged.check(lambda k: arrays[k], env, bounds)
            fast = ragged.fast(bounds, [a.shape for a in arrays], [a.dtype for a in arrays], [])
            if len(self._sigs) >= self._MAX_SIGNATURES:
                self._sigs.clear()
            self._sigs[sig] = (env, bounds, fast)
            return env
        env, bounds, fast = entry
        blobs = [a.tobytes() if k in self._meta else None for k, a in enumerate(arrays)]
        if fast is None or fast(arrays, blobs) is None:
            ragged.check(lambda k: arrays[k], env, bounds)
        return env

    def _run(self, arrays, env, trace: Trace | None = None) -> list[np.ndarray]:
        """The general path (trace: recorded for a replay, cpu_replay.py)."""
        plan, vals = self.plan, dict(self._fixed)
        writeback = []
        for vid_, a, t in zip(plan.inputs, arrays, self._in_types):
            k = to_bits(a, t.dtype)
            if self.plan.values[vid_].kind == "buffer" and k is not a:
                writeback.append((a, k, t.dtype))
            if trace is not None and k is not a:
                trace.ok = False   # a converted input: its copy is this call's alone
            vals[vid_] = k
        steps, need = self._layout(env)
        slots = self._slots(need)
        fresh = set()   # ids of the arrays this call allocated (no slot): nothing else holds them
        for s, info, sym in steps:
            if s.kernel == "view":
                vals[s.outputs[0]] = vals[s.inputs[0]].reshape(info)
            elif s.kernel.startswith("runtime"):
                self._runtime_op(s, vals)
                if trace is not None:
                    trace.ok = False
            else:
                outs = []
                for o, shape, dt, slot, n in info:
                    if slot is None:
                        arr = np.empty(shape, dt)
                        fresh.add(id(arr))
                    else:
                        arr = slots[slot][:n].view(dt).reshape(shape)
                    vals[o] = arr
                    outs.append(arr)
                ins = self._inputs_of(s, vals)
                if sym is not None:
                    ins.append(sym)
                self._fns[s.kernel](ins, outs)
                if trace is not None:
                    trace.calls.append((self._fns[s.kernel], ins, outs))
        for user, k, dt in writeback:
            user[...] = from_bits(k, dt)
        if trace is not None:
            trace.fresh, trace.outputs = fresh, [vals[o] for o in plan.outputs]
        return self._outputs(vals, fresh)

    def _outputs(self, vals, fresh: set) -> list[np.ndarray]:
        """The plan's outputs as host values the caller owns: a conversion's new array or a
        buffer this call allocated is handed over as is (an 8 MB prefill output copied cost
        0.6 ms), anything that shares memory the executor keeps (slots, weights, inputs, a
        buffer already handed over) is copied."""
        out, given = [], set()
        for o in self.plan.outputs:
            k = vals[o]
            v = from_bits(k, self._dtypes[o])
            shared = np.may_share_memory(v, k)
            if shared and (id(k) not in fresh or id(k) in given):
                v = np.array(v, copy=True)
            elif shared:
                given.add(id(k))
            out.append(v)
        return out

    _MAX_LAYOUTS = 64

    def _layout(self, env) -> tuple[list, list[int]]:
        """([(step, its output layout, its symbols array)], bytes per slot) for the bound dims
        `env`, worked out once per distinct env: a decode loop repeats one env for a page's
        worth of steps, and evaluating every dim expression each call cost more host time than
        the kernels of a small step. Output layout: a view's shape, or (value, shape, storage
        dtype, slot, bytes) per output of a kernel."""
        key = tuple(sorted(env.items()))
        lay = self._layouts.get(key)
        if lay is None:
            if len(self._layouts) >= self._MAX_LAYOUTS:   # the oldest goes first
                del self._layouts[next(iter(self._layouts))]
            lay = self._layouts[key] = self._make_layout(env)
        return lay

    def _make_layout(self, env) -> tuple[list, list[int]]:
        plan, steps = self.plan, []
        for s in self._steps:
            if s.kernel == "view":
                steps.append((s, self._shape(s.outputs[0], env), None))
            elif s.kernel.startswith("runtime"):
                steps.append((s, None, None))
            else:
                outs = []
                for o in s.outputs:
                    shape, dt = self._shape(o, env), _storage_dtype(self._dtypes[o])
                    outs.append((o, shape, dt, plan.values[o].slot,
                                 int(np.prod(shape)) * dt.itemsize))
                syms = s.attrs.get("symbols")
                sym = np.array([env[x] for x in syms], np.int64) if syms else None
                if sym is not None:
                    sym.flags.writeable = False   # shared by every call of this env
                steps.append((s, outs, sym))
        need = [0] * plan.n_slots
        for v in plan.values:
            if v.slot is not None and v.view_of is None and v.id not in self._at_load:
                n = int(np.prod(self._shape(v.id, env))) * \
                    _storage_dtype(self._dtypes[v.id]).itemsize
                need[v.slot] = max(need[v.slot], n)
        return steps, need

    def _slots(self, need: list[int]) -> list[np.ndarray]:
        """Slot memory for this call. Kept across calls (calls hold the lock and outputs are
        copied out): fresh pages would cost a page fault and a kernel zeroing per 4 KiB, about
        as long as a small kernel."""
        if any(k.size < n for k, n in zip(self._slot_memory, need)):
            self._slot_version += 1   # the replays' descriptors point at the old memory
            self._slot_memory = [k if k.size >= n else aligned_empty(n)
                                 for k, n in zip(self._slot_memory, need)]
        return self._slot_memory

    def _runtime_op(self, s, vals) -> None:
        # Collectives between in-process virtual devices, computed like their references.
        ins = [from_bits(vals[i], self._dtypes[i]).astype(np.float64) if self._dtypes[i].is_float
               else vals[i] for i in s.inputs]
        if s.attrs.get("world_size") is not None:
            results = [self._process_collective(s, ins[0])]
        elif s.op == "allreduce":
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


    def _process_collective(self, s, x: np.ndarray) -> np.ndarray:
        """This process's part of a collective over processes (a rank graph's step)."""
        c = self._collectives
        if c is None:
            raise RuntimeError(f"gir.{s.op} {{world_size = {s.attrs['world_size']}}} is one "
                               f"process's part of a collective over processes: load the "
                               f"artifact through graphir.runtime.distributed")
        if s.op == "allreduce":
            return c.all_reduce(x)
        if s.op == "allgather":
            return c.all_gather(x, s.attrs.get("axis", 0))
        raise NotImplementedError(f"the CPU runtime cannot run gir.{s.op} across processes")


def load(art: Artifact, weights: Mapping[str, np.ndarray], devices: Sequence,
         collectives=None, copy_outputs: bool = False) -> CpuModel:
    """`copy_outputs` is accepted for the sessions' sake: the CPU's outputs are always new
    arrays the caller owns (CpuModel._outputs)."""
    return CpuModel(art, weights, collectives)
