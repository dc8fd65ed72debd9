"""Run a cuda `.gart` artifact: cubins over libcuda, the plan's steps as launches.

`load(artifact, weights, devices)` verifies the artifact (hashes, via load_artifact), loads every
cubin, computes the load-time "host" steps (RoPE tables, stacked weights) with the op
references, and uploads what the device steps read. `model.execute(*inputs)` binds the symbolic
dims from the input shapes, derives the ragged-batch facts (longest new-token run, longest
cache) from the offsets and cache lengths on the host, evaluates every step's launch rules
(expressions in the manifest, see lowering/triton_gpu/lowerings/base.py) and launches.

Inputs are numpy arrays or DLPack-capable device tensors (torch CUDA tensors, DeviceBuffer).
A buffer input (the KV blocks) given as a device tensor is read and written in place; given as
numpy it is uploaded and copied back after the call. Outputs are numpy when no input was a
device tensor (or `return_numpy=True`), else DeviceBuffers (DLPack-exportable).

CUDA graphs: when a call resolves to exactly the launches of an earlier call (same sizes, same
decode-length bucket, same buffer addresses) the second time, the launches are captured once and
every later such call replays the graph (repeated decode steps).

Several devices: a graph whose values sit on gpu:0, gpu:1, ... runs each step on the device of
its values (runtime/cuda/multi_device.py: placement, per-device streams and memory, peer copies
for transfer_to, NCCL for allreduce / allgather); such plans are not captured into CUDA graphs.

The plan runner (`PlanExecutor`) is device-neutral; the tests drive it with Triton's interpreter.
"""
from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any, Mapping

import numpy as np

from graphir.dim import Dim
from graphir.dtype import DType, from_bits, round_to, to_bits
from graphir.types import BufferType, ChainType

from .plan_values import _RT, _dev_name, _exprs, eval_node, evaluate  # noqa: F401


class PlanExecutor:
    """Executes a plan (manifest 'plan' dict) on a device object (see CudaDevice)."""

    def __init__(self, plan: dict, graph, device, weights: Mapping[str, Any],
                 use_graphs: bool = True):
        from graphir.runtime.cuda.multi_device import DeviceGroup, logical_devices, placement
        from graphir.runtime.interpreter import bind_dims  # noqa: F401  (fail early if missing)

        self.plan, self.graph = plan, graph
        self.values = plan["values"]
        self.steps = plan["steps"]
        self.in_types = [v.type for v in graph.inputs if not isinstance(v.type, ChainType)]
        # Each value and step lives on one (logical) device; a plain device object serves
        # every device of the graph (virtual devices), a DeviceGroup gives one per device.
        self.device_ids = logical_devices(graph)
        self._vdev, self._sdev = placement(graph, plan)
        self.group = device if isinstance(device, DeviceGroup) else \
            DeviceGroup({d: device for d in self.device_ids})
        for d in self.device_ids:
            self.group[d]  # noqa: B018  (raises naming the missing device)
        self.dev = self.group[self.device_ids[0]]
        self.use_graphs = use_graphs and len(self.device_ids) == 1 \
            and getattr(self.dev, "supports_graphs", False) \
            and not any(s["kernel"] == "host_runtime" for s in self.steps)
        self._dtypes = [DType.from_short(v["dtype"]) for v in self.values]
        self._dims = [[Dim(d) for d in v["shape"]] for v in self.values]
        self._pool: dict = {}
        self._graphs: dict = {}
        self._seen: dict = {}
        from graphir.lowering.plan import value_table

        vids, _ = value_table(graph)
        self._node_vids = {i: vids[id(n.results[0])] for i, n in enumerate(graph.nodes)
                           if n.results and not isinstance(n.results[0].type, ChainType)}
        # Ragged metadata moved between devices is read on the host from where it came from.
        self._alias = {s["outputs"][0]: s["inputs"][0] for s in self.steps
                       if s["op"] in ("transfer_to", "reshape") and len(s["inputs"]) == 1
                       and len(s["outputs"]) == 1}
        self._check_step_devices()
        self._const_dev: dict[int, Any] = {}
        self._prepare_constants(weights)

    def _on(self, vid: int):
        """The device object holding value `vid`."""
        return self.group[self._vdev[vid]]

    def _check_step_devices(self) -> None:
        for i, s in enumerate(self.steps):
            d = self._sdev.get(i)
            if d is None or d < 0 or s["op"] == "transfer_to":
                continue
            for var in s["attrs"].get("variants", []):
                for op in var["ops"]:
                    args = op.get("args", []) + op.get("copy", [])
                    for a in args:
                        if a[0] == "v" and self._vdev[a[1]] != d:
                            raise ValueError(f"plan step {i} (gir.{s['op']}) on device {d} "
                                             f"uses value {a[1]} on device {self._vdev[a[1]]}")

    def _import(self, vid: int, obj, what: str):
        handle, shape, dtype = self._on(vid).import_tensor(obj)
        want = getattr(self._on(vid), "device", None)
        got = getattr(handle, "device", None)
        if isinstance(want, int) and isinstance(got, int) and want != got:
            raise ValueError(f"{what} is a tensor on GPU {got}; the graph places it on device "
                             f"{self._vdev[vid]}, which runs on GPU {want}")
        return handle, shape, dtype

    # -- load time ----------------------------------------------------------------------------
    def _dtype(self, vid: int) -> DType:
        return self._dtypes[vid]

    def _prepare_constants(self, weights) -> None:
        host: dict[int, np.ndarray] = {}
        device_used = set(self.plan["outputs"])
        for s in self.steps:
            if s["kernel"] != "host":
                device_used.update(s["inputs"])
        weights = dict(weights)
        for i, n in enumerate(self.graph.nodes):
            if n.op == "weight":
                vid = self._vid_of_node(i)
                name = n.attrs["name"]
                if name not in weights:
                    raise ValueError(f"weight {name!r} ({n.results[0].type}) was not given; "
                                     f"weights given: {sorted(weights)}")
                w = weights[name]
                if not isinstance(w, np.ndarray) and hasattr(w, "__dlpack__"):
                    self._const_dev[vid] = self._import(vid, w, f"weight {name!r}")[0]
                    continue
                w, t = np.asarray(w), n.results[0].type
                if tuple(w.shape) != t.static_shape():
                    raise ValueError(f"weight {name!r}: expected shape "
                                     f"{list(t.static_shape())}, got {list(w.shape)}")
                if t.dtype.is_float != (w.dtype.kind == "f") or \
                        (not t.dtype.is_float and w.dtype != t.dtype.storage):
                    raise TypeError(f"weight {name!r}: expected {t.dtype.short} data, got {w.dtype}")
                host[vid] = round_to(w, t.dtype)
            elif n.op == "constant":
                host[self._vid_of_node(i)] = round_to(n.attrs["value"], n.attrs["dtype"])
        for s in self.steps:
            if s["kernel"] == "host":
                node = self.graph.nodes[s["attrs"]["node"]]
                missing = [v for v in s["inputs"] if v not in host]
                if missing:
                    raise ValueError(f"gir.{node.op} runs at load time on the host and needs "
                                     f"its weights as numpy arrays (got device tensors)")
                outs, _ = eval_node(node, [host[v] for v in s["inputs"]])
                host.update(zip(s["outputs"], outs))
        self.host_values = host
        for vid, arr in host.items():
            if vid in device_used and vid not in self._const_dev:
                bits = to_bits(arr, self._dtype(vid))
                self._const_dev[vid] = self._on(vid).upload_new(bits)

    def _vid_of_node(self, index: int) -> int:
        return self._node_vids[index]

    # -- per call -------------------------------------------------------------------------------
    def _nbytes(self, vid: int, env) -> int:
        return math.prod(self._shape(vid, env)) * self._dtypes[vid].size_in_bytes

    def _shape(self, vid: int, env) -> tuple[int, ...]:
        return tuple(d.evaluate(env) for d in self._dims[vid])

    def _buffer(self, key, nbytes: int, lid: int):
        dev, key = self.group[lid], (lid, key)
        buf = self._pool.get(key)
        if buf is None or dev.nbytes(buf) < nbytes:
            if buf is not None:
                dev.synchronize()
                self._graphs.clear()
            buf = dev.alloc(max(nbytes, 1))
            self._pool[key] = buf
        return buf

    def _runtime_facts(self, env, host_of) -> None:
        if not hasattr(self, "_rt_names"):
            self._rt_names = sorted({n for s in self.steps for x in _exprs(s)
                                     for n in _RT.findall(x)})
        for name in self._rt_names:
            parts = [self._source(int(p)) if p.isdigit() else p for p in name.split("_")]
            offs = host_of(int(parts[2])).astype(np.int64)
            lens = offs[1:] - offs[:-1]
            if parts[1] == "seqmax":
                env[name] = int(lens.max()) if lens.size else 0
            else:
                clen = host_of(int(parts[3])).astype(np.int64)
                env[name] = int((clen + lens).max()) if lens.size else 0

    def _source(self, vid: int) -> int:
        while vid in self._alias:
            vid = self._alias[vid]
        return vid

    def execute(self, *inputs, return_numpy: bool | None = None):
        from graphir.runtime.interpreter import bind_dims

        if len(inputs) != len(self.in_types):
            raise ValueError(f"graph {self.graph.name!r} takes {len(self.in_types)} inputs, got "
                             f"{len(inputs)}")
        host_in, dev_in, shapes = {}, {}, []
        for k, (t, x) in enumerate(zip(self.in_types, inputs)):
            if isinstance(x, np.ndarray):
                host_in[k] = x
                shapes.append(SimpleNamespace(ndim=x.ndim, shape=x.shape))
            else:
                handle, shape, dtype = self._import(self.plan["inputs"][k], x, f"input {k}")
                if dtype != _dev_name(t.dtype):
                    raise TypeError(f"input {k}: expected {t.dtype.short} ({_dev_name(t.dtype)}), "
                                    f"got a device tensor of {dtype}")
                dev_in[k] = (handle, shape)
                shapes.append(SimpleNamespace(ndim=len(shape), shape=tuple(shape)))
        env = bind_dims(self.in_types, shapes)
        in_vids = self.plan["inputs"]
        cache: dict[int, np.ndarray] = {}

        def host_of(vid):
            if vid in cache:
                return cache[vid]
            if vid in self.host_values:
                return self.host_values[vid]
            if vid not in in_vids:
                raise ValueError("the cuda executor needs the ragged offsets and cache lengths "
                                 "as graph inputs")
            k = in_vids.index(vid)
            if k in host_in:
                cache[vid] = np.asarray(host_in[k])
            else:
                h, shape = dev_in[k]
                raw = self._on(vid).download(h, self._nbytes(vid, env))
                cache[vid] = from_bits(raw, self._dtype(vid)).reshape(shape)
            return cache[vid]

        self._runtime_facts(env, host_of)
        storage = self._storage(env, in_vids, dev_in)
        plan_ops = self._resolve(env, storage)
        for k, x in host_in.items():
            vid = in_vids[k]
            self._on(vid).upload(storage[vid], to_bits(x, self._dtype(vid)))
        for k, (h, _) in dev_in.items():
            if not isinstance(self.in_types[k], BufferType):
                vid = in_vids[k]
                self._on(vid).copy(storage[vid], 0, h, 0, self._nbytes(vid, env))
        self._run(plan_ops, env, storage)
        for k, x in host_in.items():
            if isinstance(self.in_types[k], BufferType):
                vid = in_vids[k]
                raw = self._on(vid).download(storage[vid], self._nbytes(vid, env))
                x[...] = from_bits(raw, self._dtype(vid)).reshape(x.shape)
        if return_numpy is None:
            return_numpy = not dev_in
        outs = []
        for vid in self.plan["outputs"]:
            nb, shape, dt = self._nbytes(vid, env), self._shape(vid, env), self._dtype(vid)
            if return_numpy:
                outs.append(from_bits(self._on(vid).download(storage[vid], nb), dt)
                            .reshape(shape).copy())
            else:
                outs.append(self._on(vid).export(storage[vid], nb, shape, _dev_name(dt)))
        self.group.synchronize()
        return outs

    def _storage(self, env, in_vids, dev_in) -> dict[int, Any]:
        st: dict[int, Any] = dict(self._const_dev)
        slot_bytes: dict[tuple[int, int], int] = {}
        # A slot number is shared by values of every device; each device has its own memory.
        for v in self.values:
            if v["slot"] is not None and v["view_of"] is None:
                key = (v["slot"], self._vdev[v["id"]])
                slot_bytes[key] = max(slot_bytes.get(key, 0), self._nbytes(v["id"], env))
        for k, vid in enumerate(in_vids):
            if k in dev_in and isinstance(self.in_types[k], BufferType):
                st[vid] = dev_in[k][0]
            else:
                st[vid] = self._buffer(("in", k), self._nbytes(vid, env), self._vdev[vid])
        for v in self.values:
            vid = v["id"]
            if v["slot"] is not None and v["view_of"] is None:
                key = (v["slot"], self._vdev[vid])
                st[vid] = self._buffer(("slot", v["slot"]), slot_bytes[key], self._vdev[vid])
            elif v["kind"] == "output" and v["view_of"] is None:
                st[vid] = self._buffer(("out", vid), self._nbytes(vid, env), self._vdev[vid])
        for v in self.values:
            b = v["id"]
            while self.values[b]["view_of"] is not None:
                b = self.values[b]["view_of"]
            if b != v["id"] and b in st:
                st[v["id"]] = st[b]
        return st

    def _resolve(self, env, st) -> list:
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
                nb = evaluate(count, local) * np.dtype(dt).itemsize
                scratch[name] = self._buffer(("scratch", i, name), nb, lid)
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
                    ops.append(("launch", lid, op["launch"], grid, args))
        return ops

    def _arg(self, a, env, st, scratch):
        tag = a[0]
        if tag == "v":
            return (st[a[1]], evaluate(a[2], env) * self._dtype(a[1]).size_in_bytes)
        if tag == "s":
            return (scratch[a[1]], 0)
        if tag == "i":
            return int(evaluate(a[1], env))
        if tag == "f":
            return float(a[1])
        return None

    def _collective(self, s, i, env, st):
        """A resolved allreduce / allgather: one (device, src, dst) part per rank."""
        dt = self._dtype(s["inputs"][0])
        if s["op"] == "allreduce":
            parts = [(self._vdev[a], st[a], st[b]) for a, b in zip(s["inputs"], s["outputs"])]
            return ("allreduce", parts, math.prod(self._shape(s["inputs"][0], env)), dt)
        counts = [math.prod(self._shape(v, env)) for v in s["inputs"]]
        out_shape = self._shape(s["outputs"][0], env)
        ax = s["attrs"]["axis"] % max(len(out_shape), 1)
        outer = math.prod(out_shape[:ax])
        if outer <= 1:
            parts = [(self._vdev[a], st[a], st[b]) for a, b in zip(s["inputs"], s["outputs"])]
            return ("allgather", parts, counts, dt, None)
        # Along an inner axis: gather rank-major into scratch, then place each rank's rows.
        size, total = dt.size_in_bytes, sum(counts) * dt.size_in_bytes
        parts, moves = [], []
        for a, b in zip(s["inputs"], s["outputs"]):
            lid = self._vdev[a]
            tmp = self._buffer(("gather", i), total, lid)
            parts.append((lid, st[a], tmp))
        row, base, col = math.prod(out_shape[ax:]) * size, 0, 0
        for c in counts:
            width = c // outer * size
            for (lid, _, tmp), b in zip(parts, s["outputs"]):
                moves.append((lid, st[b], col, row, tmp, base, width, width, outer))
            base, col = base + c * size, col + width
        return ("allgather", parts, counts, dt, moves)

    def _run(self, ops, env, st) -> None:
        if not self.use_graphs:
            return self._launch_all(ops, env, st)
        key = tuple(self.dev.key(op) for op in ops)
        g = self._graphs.get(key)
        if g is None:
            self._seen[key] = self._seen.get(key, 0) + 1
            if self._seen[key] < 2:
                return self._launch_all(ops, env, st)
            if len(self._graphs) >= 16:
                self._graphs.clear()
            g = self._graphs[key] = self.dev.capture(lambda: self._launch_all(ops, env, st))
        self.dev.replay(g)

    def _launch_all(self, ops, env, st) -> None:
        g = self.group
        for op in ops:
            kind = op[0]
            if kind == "launch":
                g[op[1]].launch(op[2], op[3], op[4])
            elif kind == "copy":
                g[op[1]].copy(*op[2:])
            elif kind == "transfer":
                g.transfer(*op[1:])
            elif kind == "allreduce":
                g.all_reduce(op[1], op[2], op[3])
            elif kind == "allgather":
                g.all_gather(op[1], op[2], op[3])
                for lid, dst, col, row, tmp, base, pitch, width, rows in op[4] or ():
                    g.copy2d(lid, dst, col, row, tmp, base, pitch, width, rows)
            else:
                self._host_step(self.steps[op[1]], env, st)

    def _host_step(self, s, env, st) -> None:
        node = self.graph.nodes[s["attrs"]["node"]]
        arrays = []
        for vid in s["inputs"]:
            raw = self._on(vid).download(st[vid], self._nbytes(vid, env))
            arrays.append(from_bits(raw, self._dtype(vid)).reshape(self._shape(vid, env)))
        outs, writes = eval_node(node, arrays, env)
        for vid, o in zip(s["outputs"], outs):
            self._on(vid).upload(st[vid], to_bits(o, self._dtype(vid)))
        for w, new in writes.items():
            vid = s["inputs"][w]
            self._on(vid).upload(st[vid], to_bits(new, self._dtype(vid)))



def load(artifact, weights, devices=None, **options):
    """Load a cuda artifact onto the GPU(s); see runtime/cuda/device_model.py."""
    from .device_model import load as _load

    return _load(artifact, weights, devices, **options)

