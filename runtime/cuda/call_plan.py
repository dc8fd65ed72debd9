"""One call key's resolved work: storage, the launch list with its parameters packed, the
CUDA graph. Built once per key by PlanExecutor (the mixin below), then only replayed.

A key is (the dims the plan reads, the bucketed runtime facts, which inputs are device
tensors, the addresses of device buffer inputs). Everything a step's launch rules evaluate is
a function of it, so on a hit the executor evaluates no expression: it stages the inputs into
the fixed addresses recorded here and runs `calls` (or replays `graph`).

Storage is (buffer, byte offset) per value. Non-buffer inputs of one device share an "input
area": the host ones first (filled by one staged copy), then the device ones (filled by a
device-to-device copy each), every region 256-byte aligned.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from graphir.dtype import DType, to_bits

from .plan_values import evaluate

ALIGN = 256  # kernels are specialized for 16-byte aligned pointers; keep regions well above
_POOL_STEP = 1 << 26


def pool_size(nbytes: int) -> int:
    """Headroom for a pooled buffer: the next power of two up to 64 MiB, then 64 MiB steps, so
    a growing prefill reallocates (and drops the captured graphs) only a few times."""
    n = max(int(nbytes), 1)
    if n <= _POOL_STEP:
        return 1 << (n - 1).bit_length()
    return -(-n // _POOL_STEP) * _POOL_STEP


_BITS = {DType.bfloat16: np.dtype(np.uint16), DType.float8_e4m3fn: np.dtype(np.uint8)}


def bits_dtype(dt: DType) -> np.dtype:
    """The numpy dtype of a value's raw device contents (bf16 -> uint16, float8 -> uint8)."""
    return _BITS.get(dt, dt.storage)


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class CallPlan:
    """The resolved work of one key (see the module docstring)."""

    __slots__ = ("key", "env", "storage", "ops", "calls", "areas", "outputs", "seen", "graph",
                 "host_steps", "_staged", "launch", "stat", "used", "slot_graphs")

    def __init__(self, key, env, storage, ops, calls, areas, outputs):
        self.key, self.env, self.storage, self.ops = key, env, storage, ops
        self.calls: list[Callable[[], None]] = calls
        # lid -> (area buffer, host bytes, [(input k, offset, nbytes, dtype, bits dtype, shape)],
        #         [(k, offset, nbytes)] of the device-tensor inputs)
        self.areas: dict[int, tuple] = areas
        # (lid, buffer, offset, nbytes, shape, dtype) per graph output
        self.outputs: list[tuple] = outputs
        self.seen = 0
        self.graph = None
        self.host_steps = any(op[0] == "host" for op in ops)
        self._staged: dict[int, tuple] = {}
        # Set once the key replays (or runs eagerly without graphs): the fast path's launch.
        self.launch: Callable[[], None] | None = None
        self.stat = "replays"
        self.used = 0  # the executor's call counter at this plan's last use (LRU eviction)
        # The fast path's graphs led by the staged upload, one per staging slot
        # (runtime/cuda/slot_graphs.py), made when a hit first needs them.
        self.slot_graphs = None

    def run(self) -> None:
        for f in self.calls:
            f()

    def stage(self, dev: Any, lid: int, host_in: dict, dev_in: dict) -> None:
        """Fill one device's input area: every host input through one staged copy, then a
        device-to-device copy per device-tensor input."""
        buf, host_bytes, host, device = self.areas[lid]
        if host:
            staging = getattr(dev, "staging", None)
            img = staging(host_bytes) if staging else np.empty(host_bytes, np.uint8)
            for k, view, dt, bits_dt in self._views(img, host):
                x = host_in[k]
                if bits_dt is not None and x.dtype != bits_dt:
                    x = to_bits(x, dt)  # bf16 / float8 values given as floats
                np.copyto(view, x, casting="unsafe")
            if staging:
                dev.upload_staged(buf, host_bytes)
            else:
                dev.upload(buf, img[:host_bytes])
        for k, off, nb in device:
            dev.copy(buf, off, dev_in[k], 0, nb)

    def _views(self, img: np.ndarray, host: list) -> list:
        # A staging device hands out the same few pinned arrays: their typed views are
        # made once (a strong reference keeps the id from being reused).
        hit = self._staged.get(id(img))
        if hit is not None and hit[0] is img:
            return hit[1]
        views = []
        for k, off, nb, dt, bits_dt, shape in host:
            v = img[off:off + nb].view(bits_dt).reshape(shape)
            views.append((k, v, dt, bits_dt if dt in _BITS else None))
        if len(self._staged) >= 8:
            self._staged.clear()
        self._staged[id(img)] = (img, views)
        return views


class CallPlanBuilder:
    """PlanExecutor's half that turns (env, inputs) into a CallPlan."""

    def _build(self, key, env: dict, host_in: dict, dev_in: dict) -> CallPlan:
        st, areas = self._storage(env, host_in, dev_in)
        ops = self._resolve(env, st, frozenset(dev_in))
        calls = [self._prepare(op, env, st) for op in ops]
        outputs = []
        for vid in self.plan["outputs"]:
            buf, off = st[vid]
            outputs.append((self._vdev[vid], buf, off, self._nbytes(vid, env),
                            self._shape(vid, env), self._dtype(vid)))
        return CallPlan(key, env, st, ops, calls, areas, outputs)

    # -- memory ------------------------------------------------------------------------------
    def _buffer(self, key, nbytes: int, lid: int, zeroed: bool = False):
        """A pooled device buffer of at least `nbytes` (`zeroed`: all zero when allocated);
        growing it drops every CallPlan (their packed parameters and graphs hold the old
        address)."""
        dev, key = self.group[lid], (lid, key)
        buf = self._pool.get(key)
        if buf is None or dev.nbytes(buf) < nbytes:
            if buf is not None:
                self.group.synchronize()
                self._drop_plans()
            size = pool_size(nbytes)
            buf = dev.alloc(size)
            if zeroed:
                dev.upload(buf, np.zeros(size, np.uint8))
            self._pool[key] = buf
        return buf

    def _storage(self, env, host_in, dev_in) -> tuple[dict, dict]:
        st: dict[int, tuple] = {vid: (buf, 0) for vid, buf in self._const_dev.items()}
        slot_bytes: dict[tuple[int, int], int] = {}
        # A slot number is shared by values of every device; each device has its own memory.
        for v in self.values:
            if v["slot"] is not None and v["view_of"] is None:
                key = (v["slot"], self._vdev[v["id"]])
                slot_bytes[key] = max(slot_bytes.get(key, 0), self._nbytes(v["id"], env))
        layout: dict[int, list] = {}
        for k, vid in enumerate(self.plan["inputs"]):
            lid = self._vdev[vid]
            if self._is_buffer[k]:
                st[vid] = (dev_in[k], 0) if k in dev_in else \
                    (self._buffer(("in", k), self._nbytes(vid, env), lid), 0)
            elif k in self._used_inputs:
                layout.setdefault(lid, []).append((k in dev_in, k, vid))
        areas = {}
        for lid, items in layout.items():
            host, device, off = [], [], 0
            for on_dev, k, vid in sorted(items, key=lambda t: t[0]):
                nb = self._nbytes(vid, env)
                dt = self._dtype(vid)
                (device if on_dev else host).append((k, off, nb, dt, bits_dtype(dt),
                                                     self._shape(vid, env)))
                off = _align(off + nb)
            host_bytes = (host[-1][1] + host[-1][2]) if host else 0
            buf = self._buffer(("area",), off, lid)
            areas[lid] = (buf, host_bytes, host, [(k, o, nb) for k, o, nb, *_ in device])
            for k, o, *_ in host + device:
                st[self.plan["inputs"][k]] = (buf, o)
        for v in self.values:
            vid = v["id"]
            if v["slot"] is not None and v["view_of"] is None:
                key = (v["slot"], self._vdev[vid])
                st[vid] = (self._buffer(("slot", v["slot"]), slot_bytes[key], self._vdev[vid]), 0)
            elif v["kind"] == "output" and v["view_of"] is None:
                st[vid] = (self._buffer(("out", vid), self._nbytes(vid, env), self._vdev[vid]), 0)
        for v in self.values:
            b = self._viewed(v["id"])
            if b != v["id"] and b in st:
                st[v["id"]] = st[b]
        return st, areas

    def _viewed(self, vid: int) -> int:
        """The value whose storage `vid` views (itself when it is no view)."""
        while self.values[vid]["view_of"] is not None:
            vid = self.values[vid]["view_of"]
        return vid

    # -- launch rules -> ops -----------------------------------------------------------------
    def _resolve(self, env, st, dev_ks=frozenset()) -> list:
        """The call's ops; `dev_ks`: the inputs that arrived as device tensors."""
        ops = []
        for i, s in enumerate(self.steps):
            k = s["kernel"]
            if k in ("host", "view"):
                continue
            if k == "host_runtime":
                ops.append(("host", i))
                continue
            if k == "collective":
                ops.append(self._collective(s, i, env, st))
                continue
            lid = self._sdev[i]
            local = dict(env)
            for name, expr in s["attrs"]["lets"]:
                local[name] = evaluate(expr, local)
            var = next(v for v in s["attrs"]["variants"]
                       if v["when"] is None or evaluate(v["when"], local))
            scratch = {}
            for name, dt, count in var["scratch"]:
                nb = evaluate(count, local) * DType[dt].size_in_bytes
                # Zero when allocated: a kernel's counters (a DYN prefill's tile counter) start
                # at zero, and such a kernel leaves them zero for its next launch.
                scratch[name] = (self._buffer(("scratch", i, name), nb, lid, zeroed=True), 0)
            for op in var["ops"]:
                if "copy" in op:
                    (dst, src), nb = op["copy"], evaluate(op["bytes"], local)
                    d, s_ = (self._arg(a, local, st, scratch) for a in (dst, src))
                    dl, sl = (self._vdev[a[1]] if a[0] == "v" else lid for a in (dst, src))
                    if dl != sl:
                        ops.append(("transfer", dl, d[0], d[1], sl, s_[0], s_[1], nb))
                    else:
                        ops.append(("copy", lid, d[0], d[1], s_[0], s_[1], nb))
                else:
                    grid = tuple(evaluate(g, local) for g in op["grid"])
                    args = tuple(self._arg(a, local, st, scratch) for a in op["args"])
                    ops.append(("launch", lid, op["launch"], grid, args,
                                self._early_ok(lid, op, dev_ks)))
        return ops

    def _early_ok(self, lid, op, dev_ks) -> bool:
        """Whether launch `op` may start before the kernels ahead of it end: each argument
        its kernel reads before its PDL wait (kernels/pdl.py) is a weight or constant, or a
        graph input that came as a device tensor (copied in or bound before the graph starts;
        a host input arrives through the upload kernel at the graph's head, which may still
        be writing it)."""
        reads = getattr(self.group[lid], "early_reads", None)
        reads = reads(op["launch"]) if reads is not None else ()
        if not reads:
            return False
        inputs = self.plan["inputs"]
        for j in reads:
            a = op["args"][j]
            if a[0] != "v":
                return False
            v = self._viewed(a[1])
            if v in self._const_dev:
                continue
            k = inputs.index(v) if v in inputs else None
            if k is None or self._is_buffer[k] or k not in dev_ks:
                return False
        return True

    def _arg(self, a, env, st, scratch):
        tag = a[0]
        if tag == "v":
            buf, off = st[a[1]]
            return (buf, off + evaluate(a[2], env) * self._dtype(a[1]).size_in_bytes)
        if tag == "s":
            return scratch[a[1]]
        if tag == "i":
            return int(evaluate(a[1], env))
        if tag == "f":
            return float(a[1])
        return None

    def _plain(self, ref):
        """A (buffer, offset) as the buffer object collectives take."""
        buf, off = ref
        return self.group.offset(buf, off) if off else buf

    def _collective(self, s, i, env, st):
        """A resolved allreduce / allgather: one (device, src, dst) part per rank."""
        dt = self._dtype(s["inputs"][0])
        p = lambda v: self._plain(st[v])  # noqa: E731
        if s["op"] == "allreduce":
            parts = [(self._vdev[a], p(a), p(b)) for a, b in zip(s["inputs"], s["outputs"])]
            return ("allreduce", parts, math.prod(self._shape(s["inputs"][0], env)), dt)
        counts = [math.prod(self._shape(v, env)) for v in s["inputs"]]
        out_shape = self._shape(s["outputs"][0], env)
        ax = s["attrs"]["axis"] % max(len(out_shape), 1)
        outer = math.prod(out_shape[:ax])
        if outer <= 1:
            parts = [(self._vdev[a], p(a), p(b)) for a, b in zip(s["inputs"], s["outputs"])]
            return ("allgather", parts, counts, dt, None)
        # Along an inner axis: gather rank-major into scratch, then place each rank's rows.
        size, total = dt.size_in_bytes, sum(counts) * dt.size_in_bytes
        parts, moves = [], []
        for a, b in zip(s["inputs"], s["outputs"]):
            lid = self._vdev[a]
            tmp = self._buffer(("gather", i), total, lid)
            parts.append((lid, p(a), tmp))
        row, base, col = math.prod(out_shape[ax:]) * size, 0, 0
        for c in counts:
            width = c // outer * size
            for (lid, _, tmp), b in zip(parts, s["outputs"]):
                moves.append((lid, p(b), col, row, tmp, base, width, width, outer))
            base, col = base + c * size, col + width
        return ("allgather", parts, counts, dt, moves)

    # -- ops -> callables --------------------------------------------------------------------
    def _prepare(self, op, env, st) -> Callable[[], None]:
        """A zero-argument callable doing `op`, with whatever can be packed packed now."""
        g, kind = self.group, op[0]
        if kind == "launch":
            dev = g[op[1]]
            if hasattr(dev, "prepare"):
                return dev.prepare(op[2], op[3], op[4], True) if op[5] else \
                    dev.prepare(op[2], op[3], op[4])
            return lambda: dev.launch(op[2], op[3], op[4])
        if kind == "copy":
            dev = g[op[1]]
            if hasattr(dev, "prepare_copy"):
                return dev.prepare_copy(*op[2:])
            return lambda: dev.copy(*op[2:])
        if kind == "transfer":
            return lambda: g.transfer(*op[1:])
        if kind == "allreduce":
            return lambda: g.all_reduce(op[1], op[2], op[3])
        if kind == "allgather":
            def gather():
                g.all_gather(op[1], op[2], op[3])
                for lid, dst, col, row, tmp, base, pitch, width, rows in op[4] or ():
                    g.copy2d(lid, dst, col, row, tmp, base, pitch, width, rows)
            return gather
        step = self.steps[op[1]]
        return lambda: self._host_step(step, env, st)

    def _host_step(self, s, env, st) -> None:
        from graphir.dtype import from_bits, to_bits

        from .plan_values import eval_node

        node = self.graph.nodes[s["attrs"]["node"]]
        arrays = []
        for vid in s["inputs"]:
            buf, off = st[vid]
            raw = self._on(vid).download(buf, off + self._nbytes(vid, env))[off:]
            arrays.append(from_bits(raw, self._dtype(vid)).reshape(self._shape(vid, env)))
        outs, writes = eval_node(node, arrays, env)
        for vid, o in zip(s["outputs"], outs):
            self._write(vid, st, to_bits(o, self._dtype(vid)))
        for w, new in writes.items():
            vid = s["inputs"][w]
            self._write(vid, st, to_bits(new, self._dtype(vid)))

    def _write(self, vid: int, st, bits: np.ndarray) -> None:
        self._on(vid).upload(self._plain(st[vid]), bits)
