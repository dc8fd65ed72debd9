"""Run a cuda `.gart` artifact: cubins over libcuda, the plan's steps as launches.

`load(artifact, weights, devices)` verifies the artifact (hashes, via load_artifact), loads every
cubin, computes the load-time "host" steps (RoPE tables, stacked weights) with the op
references, and uploads what the device steps read. `model.execute(*inputs)` binds the symbolic
dims from the input shapes, derives the ragged-batch facts (longest new-token run, longest
cache) from the offsets and cache lengths on the host, evaluates every step's launch rules
(expressions in the manifest, see lowering/triton_gpu/lowerings_base.py) and launches.

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

import ast
import math
from functools import lru_cache
from types import SimpleNamespace
from typing import Any, Mapping, Sequence

import numpy as np

from graphir.dim import Dim
from graphir.dtype import DType, bf16_bits, bf16_from_bits, round_to
from graphir.types import BufferType, ChainType

_FUNCS = {"min": min, "max": max, "cdiv": lambda a, b: -(-a // b)}
_BIN = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
        ast.FloorDiv: lambda a, b: a // b, ast.Mod: lambda a, b: a % b}
_CMP = {ast.Lt: lambda a, b: a < b, ast.LtE: lambda a, b: a <= b, ast.Gt: lambda a, b: a > b,
        ast.GtE: lambda a, b: a >= b, ast.Eq: lambda a, b: a == b, ast.NotEq: lambda a, b: a != b}


_NODES = (ast.Expression, ast.Constant, ast.Name, ast.Load, ast.BinOp, ast.UnaryOp, ast.USub,
          ast.Compare, ast.BoolOp, ast.And, ast.Or, ast.Call, *_BIN, *_CMP)


@lru_cache(maxsize=4096)
def _compile(text: str):
    """Validate a rule against the whitelist once, then compile it (evaluated many times)."""
    tree = ast.parse(text, mode="eval")
    for n in ast.walk(tree):
        ok = isinstance(n, _NODES)
        if isinstance(n, ast.Constant):
            ok = isinstance(n.value, (int, float, bool))
        if isinstance(n, ast.Call):
            ok = isinstance(n.func, ast.Name) and n.func.id in _FUNCS and not n.keywords
        if isinstance(n, ast.Name) and n.id in ("__builtins__",):
            ok = False
        if not ok:
            raise ValueError(f"launch rule {text!r}: unsupported syntax {ast.dump(n)[:60]}")
    return compile(tree, "<launch rule>", "eval")


_GLOBALS = {"__builtins__": {}, **_FUNCS}


def evaluate(text: str, env: Mapping[str, Any]):
    """Value of a launch-rule expression (ints, + - * // %, comparisons, and/or, min/max/cdiv)."""
    code = _compile(text)
    try:
        return eval(code, _GLOBALS, env)  # noqa: S307  (whitelisted AST, no builtins)
    except NameError as e:
        raise ValueError(f"launch rule {text!r}: unknown name ({e})") from None


# -- host <-> device value conversion -------------------------------------------------------
def _f8_table() -> np.ndarray:
    codes = np.arange(256, dtype=np.int64)
    s, ex, m = codes >> 7, (codes >> 3) & 15, codes & 7
    mag = np.where(ex == 0, m / 8.0 * 2.0 ** -6, (1 + m / 8.0) * 2.0 ** (ex - 7.0))
    vals = np.where(s == 1, -mag, mag)
    vals[(ex == 15) & (m == 7)] = np.nan
    return vals


_F8 = _f8_table()


def to_device_bits(a, dtype: DType) -> np.ndarray:
    """The bytes a device tensor of `dtype` holds for host values `a` (bf16/f8 as raw bits)."""
    a = np.asarray(a)
    if dtype is DType.bfloat16:
        if a.dtype == np.uint16:
            return a
        # float32 storage already holding bf16 values (the host side's form): exact bits.
        r = round_to(a, dtype) if a.dtype != np.float32 else bf16_bits(a)
        return r if r.dtype == np.uint16 else bf16_bits(r)
    if dtype is DType.float8_e4m3fn:
        if a.dtype == np.uint8:
            return a
        r = round_to(a, dtype).astype(np.float64)
        order = np.argsort(np.nan_to_num(_F8, nan=1e9), kind="stable")
        pos = np.searchsorted(_F8[order], np.where(r == 0, np.copysign(0.0, r), r))
        codes = order[np.clip(pos, 0, 255)].astype(np.uint8)
        return np.where(np.signbit(r) & (r == 0), np.uint8(0x80), codes).astype(np.uint8)
    return np.ascontiguousarray(round_to(a, dtype))


def from_device_bits(bits: np.ndarray, dtype: DType) -> np.ndarray:
    """Host values (the interpreter's storage) from a device tensor's raw contents."""
    if dtype is DType.bfloat16:
        return bf16_from_bits(bits.view(np.uint16))
    if dtype is DType.float8_e4m3fn:
        return _F8[bits.view(np.uint8)].astype(np.float32)
    return bits.view(dtype.storage)


def eval_node(node, arrays: Sequence[np.ndarray], env: Mapping[str, int] | None = None):
    """Run one node's float64 reference as the interpreter does; (results, written buffers)."""
    env = dict(env or {})
    opdef = node.opdef
    args = [a.astype(np.float64) if a.dtype.kind == "f" else a for a in arrays]
    res = lambda v: v.evaluate(env) if isinstance(v, Dim) else (  # noqa: E731
        tuple(res(x) for x in v) if isinstance(v, tuple) else v)
    attrs = {k: res(v) for k, v in node.attrs.items()}
    types = [r.type for r in node.results if not isinstance(r.type, ChainType)]
    attrs["_out_shapes"] = [tuple(res(tuple(t.shape))) for t in types]
    attrs["_in_types"] = [v.type for v in node.operands]
    attrs["_out_types"] = types
    outs = list(opdef.reference(args, attrs))
    results = [round_to(np.asarray(o), t.dtype) for o, t in zip(outs, types)]
    ins = [v for v in node.operands if not isinstance(v.type, ChainType)]
    writes = {w: round_to(np.asarray(o), ins[w].type.dtype)
              for w, o in zip(opdef.writes, outs[len(types):])}
    return results, writes


class PlanExecutor:
    """Executes a plan (manifest 'plan' dict) on a device object (see CudaDevice)."""

    def __init__(self, plan: dict, graph, device, weights: Mapping[str, Any],
                 use_graphs: bool = True):
        from runtime.cuda.multi_device import DeviceGroup, logical_devices, placement
        from runtime.interpreter import bind_dims  # noqa: F401  (fail early if missing)

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
        from lowering.plan import value_table

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
                bits = to_device_bits(arr, self._dtype(vid))
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
        from runtime.interpreter import bind_dims

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
                cache[vid] = from_device_bits(raw, self._dtype(vid)).reshape(shape)
            return cache[vid]

        self._runtime_facts(env, host_of)
        storage = self._storage(env, in_vids, dev_in)
        plan_ops = self._resolve(env, storage)
        for k, x in host_in.items():
            vid = in_vids[k]
            self._on(vid).upload(storage[vid], to_device_bits(x, self._dtype(vid)))
        for k, (h, _) in dev_in.items():
            if not isinstance(self.in_types[k], BufferType):
                vid = in_vids[k]
                self._on(vid).copy(storage[vid], 0, h, 0, self._nbytes(vid, env))
        self._run(plan_ops, env, storage)
        for k, x in host_in.items():
            if isinstance(self.in_types[k], BufferType):
                vid = in_vids[k]
                raw = self._on(vid).download(storage[vid], self._nbytes(vid, env))
                x[...] = from_device_bits(raw, self._dtype(vid)).reshape(x.shape)
        if return_numpy is None:
            return_numpy = not dev_in
        outs = []
        for vid in self.plan["outputs"]:
            nb, shape, dt = self._nbytes(vid, env), self._shape(vid, env), self._dtype(vid)
            if return_numpy:
                outs.append(from_device_bits(self._on(vid).download(storage[vid], nb), dt)
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
            arrays.append(from_device_bits(raw, self._dtype(vid)).reshape(self._shape(vid, env)))
        outs, writes = eval_node(node, arrays, env)
        for vid, o in zip(s["outputs"], outs):
            self._on(vid).upload(st[vid], to_device_bits(o, self._dtype(vid)))
        for w, new in writes.items():
            vid = s["inputs"][w]
            self._on(vid).upload(st[vid], to_device_bits(new, self._dtype(vid)))


import re  # noqa: E402

_RT = re.compile(r"rt_(?:seqmax_\d+|kvmax_\d+_\d+)")


def _exprs(step):
    a = step["attrs"]
    yield from (x for _, x in a.get("lets", []))
    for v in a.get("variants", []):
        if v["when"]:
            yield v["when"]


def _dev_name(dt: DType) -> str:
    return dt.name


class CudaDevice:
    """PlanExecutor's device on libcuda: DeviceBuffers, cubin kernels, one stream, graphs."""

    supports_graphs = True

    def __init__(self, kernels: Mapping[str, Any], device: int = 0):
        from runtime.cuda import Stream

        self.kernels, self.device = kernels, device
        self.stream = Stream(device=device)
        self._keep: list = []

    def alloc(self, nbytes: int):
        from runtime.cuda import DeviceBuffer

        return DeviceBuffer.empty(nbytes, "uint8", self.device)

    def nbytes(self, buf) -> int:
        return buf.nbytes

    def upload_new(self, bits: np.ndarray):
        buf = self.alloc(max(bits.nbytes, 1))
        self.upload(buf, bits)
        return buf

    def upload(self, buf, bits: np.ndarray) -> None:
        raw = np.ascontiguousarray(bits).reshape(-1).view(np.uint8)
        if raw.nbytes:
            # From pageable memory the copy returns once the bytes are staged; the array is
            # still kept until the call's final synchronize.
            self._keep.append(raw)
            buf.view((raw.nbytes,), "uint8").copy_from_numpy(raw, stream=self.stream)

    def download(self, buf, nbytes: int) -> np.ndarray:
        out = np.empty(nbytes, np.uint8)
        if nbytes:
            self.stream.synchronize()
            buf.view((nbytes,), "uint8").copy_to_numpy(out)
        return out

    def copy(self, dst, dst_off, src, src_off, nbytes) -> None:
        if nbytes:
            d = dst.view((nbytes,), "uint8", dst_off)
            d.copy_from(src.view((nbytes,), "uint8", src_off), stream=self.stream)

    def launch(self, key, grid, args) -> None:
        k = self.kernels[key]
        vals = [a[0].ptr + a[1] if isinstance(a, tuple) else a for a in args]
        k.launch(grid, *vals, stream=self.stream)

    def key(self, op):
        """A hashable form of a resolved op with buffers replaced by their addresses."""
        def conv(a):
            if isinstance(a, tuple):
                return tuple(conv(x) for x in a)
            return a.ptr if hasattr(a, "ptr") else a
        return conv(op)

    def import_tensor(self, obj):
        from runtime.cuda import DeviceBuffer, from_dlpack

        buf = obj if isinstance(obj, DeviceBuffer) else from_dlpack(obj, stream=self.stream)
        return buf, buf.shape, buf.dtype

    def export(self, buf, nbytes, shape, dtype):
        from runtime.cuda import DeviceBuffer

        out = DeviceBuffer.empty(shape, dtype, self.device)
        out.copy_from(buf.view(shape, dtype), stream=self.stream)
        return out

    def synchronize(self) -> None:
        self.stream.synchronize()
        self._keep.clear()

    def capture(self, fn):
        from runtime.cuda import CudaGraph

        g = CudaGraph()
        with g.capture(self.stream):
            fn()
        return g

    def replay(self, g) -> None:
        g.replay(self.stream)


class CudaModel:
    """A loaded cuda artifact: `execute(*inputs)` returns the graph's outputs."""

    def __init__(self, executor: PlanExecutor, artifact):
        self.executor, self.artifact = executor, artifact

    def _source(self, vid: int) -> int:
        while vid in self._alias:
            vid = self._alias[vid]
        return vid

    def execute(self, *inputs, return_numpy: bool | None = None):
        return self.executor.execute(*inputs, return_numpy=return_numpy)

    __call__ = execute


class _Kernels(dict):
    """The artifact's kernels loaded on one GPU, each on first use."""

    def __init__(self, art, table: Mapping[str, Any], device: int):
        super().__init__()
        self._art, self._table, self._device = art, table, device

    def __missing__(self, key):
        from runtime.cuda import Kernel

        md = self._table[key]
        k = self[key] = Kernel.from_cubin(self._art.file(md["cubin"]).read_bytes(), md,
                                          self._device)
        return k


def load(artifact, weights: Mapping[str, Any], devices=None, *, use_graphs: bool = True,
         peer: str = "auto"):
    """Open a cuda artifact and bind `weights`.

    The graph's devices (see runtime.cuda.multi_device) run on the GPUs `devices` names, in
    order (default: device id N on GPU N). A graph over several devices gets one stream per
    GPU, peer copies for transfer_to (`peer="host"` stages them through the host) and NCCL
    for allreduce / allgather.
    """
    from lowering.artifact import load_artifact
    from runtime.cuda import driver
    from runtime.cuda.multi_device import CudaDeviceGroup, logical_devices

    art = load_artifact(artifact.path if hasattr(artifact, "path") else artifact)
    m = art.manifest
    if m.get("backend") != "triton_gpu":
        raise ValueError(f"{art.path}: not a cuda (triton_gpu) artifact: target {art.target}")
    graph = art.graph()
    lids = logical_devices(graph)
    if devices:
        if len(devices) < len(lids):
            raise ValueError(f"graph {graph.name!r} runs on {len(lids)} devices (ids {lids}); "
                             f"load was given {len(devices)}: {list(devices)}")
        gpus = {lid: int(getattr(d, "id", d)) for lid, d in zip(lids, devices)}
    else:
        gpus = {lid: lid for lid in lids}
    n = driver.device_count()
    if max(gpus.values()) >= n:
        raise ValueError(f"graph {graph.name!r} needs GPUs {sorted(gpus.values())} (one per "
                         f"device of the graph) but this machine has {n} CUDA device(s)")
    members = {lid: CudaDevice(_Kernels(art, m["kernels"], o), o) for lid, o in gpus.items()}
    dev = CudaDeviceGroup(members, peer=peer) if len(members) > 1 else members[lids[0]]
    ex = PlanExecutor(m["plan"], graph, dev, weights, use_graphs)
    return CudaModel(ex, art)
