"""Run a cuda `.gart` artifact: cubins over libcuda, the plan's steps as launches.

`load(artifact, weights, devices)` verifies the artifact (hashes, via load_artifact), loads every
cubin, computes the load-time "host" steps (RoPE tables, stacked weights) with the op
references, and uploads what the device steps read.

`model.execute(*inputs)`, per call:
  1. inputs: numpy arrays or DLPack-capable device tensors (torch CUDA tensors, DeviceBuffer);
  2. the ragged metadata is checked on the host (runtime/ragged.py: offsets, page ids, lengths
     vs pages and the RoPE table) before anything is written, which also gives the runtime
     facts (most new tokens, longest cache + new tokens) the launch rules read, bucketed as
     the lowering declared them (lowering/triton_gpu/lowerings/base.py);
  3. the call's key -- the dims the plan reads, the bucketed facts, which inputs are device
     tensors and the addresses of device buffer inputs -- selects a CallPlan
     (runtime/cuda/call_plan.py): storage, launch list and packed kernel parameters, built
     the first time a key is seen (launch rules evaluated once), reused after;
  4. the host inputs are copied into one pinned staging buffer and reach the device in one
     asynchronous copy; device-tensor inputs are copied device to device into the same fixed
     addresses, so the launches never change within a key (on the fast path, device tensors
     that keep arriving at the same addresses get a graph of their own that reads them in
     place, with no copy: see runtime/cuda/fast_path.py);
  5. the launches run; the second call of a key captures them into a CUDA graph and every
     later call of that key replays it (a decode loop replays until its context length crosses
     a bucket of the KV length, 256 tokens).
A call whose input signature and facts were seen since its key was captured skips steps 2-3
as written here: runtime/cuda/fast_path.py does them in one pass over the inputs (a few
microseconds; three driver calls in all, four when a device tensor is copied: its graphs,
one per staging slot, begin with the upload), falling back to this general path when unsure.
Nothing is synchronized unless the call needs host results (numpy outputs, a numpy KV buffer
copied back). Loading with `stream=torch.cuda.current_stream()` runs on the caller's stream and
imports torch tensors from their attributes (no per-call DLPack handshake); see CudaDevice.
`stats` counts plans built, captures, replays and eager runs.

Inputs: a buffer input (the KV blocks) given as a device tensor is read and written in place;
given as numpy it is uploaded and copied back after the call. Outputs are numpy when no input
was a device tensor (or `return_numpy=True`), else DeviceBuffers (DLPack-exportable) that live
in the executor's output pool: like torch.compile's "reduce-overhead" CUDA-graph outputs, they
stay valid until the next call of this model, which overwrites them; keep one longer by
copying it (or load with `copy_outputs=True` for fresh buffers on every call, MAX-style, at
the price of an allocation and a device copy per output).

Several devices: a graph whose values sit on gpu:0, gpu:1, ... runs each step on the device of
its values (runtime/cuda/multi_device.py: placement, per-device streams and memory, peer copies
for transfer_to, NCCL for allreduce / allgather); such plans are not captured into CUDA graphs
and each call ends synchronized.

The plan runner (`PlanExecutor`) is device-neutral; the tests drive it with Triton's interpreter.
"""
from __future__ import annotations

import re
import threading
from collections import OrderedDict
from types import SimpleNamespace
from typing import Any, Mapping

import numpy as np

from graphir import progress
from graphir.dim import Dim
from graphir.dtype import DType, from_bits, round_to, to_bits
from graphir.runtime.ragged import RaggedCheck
from graphir.types import BufferType, ChainType

from . import slot_graphs
from .call_plan import CallPlanBuilder
from .fast_path import _BUFFER, _USED, FastPath, _address
from .plan_values import (_RT, _dev_name, _exprs, bucketed, eval_node, evaluate,  # noqa: F401
                          fact_names, parse_fact, step_exprs)

MAX_PLANS = 32     # call keys remembered (each may hold a CUDA graph)
_NAME = re.compile(r"[A-Za-z_]\w*")


class PlanExecutor(CallPlanBuilder, FastPath):
    """Executes a plan (manifest 'plan' dict) on a device object (see CudaDevice)."""

    def __init__(self, plan: dict, graph, device, weights: Mapping[str, Any],
                 use_graphs: bool = True, *, copy_outputs: bool = False):
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
        self.copy_outputs = copy_outputs
        self._dtypes = [DType.from_short(v["dtype"]) for v in self.values]
        self._dims = [[Dim(d) for d in v["shape"]] for v in self.values]
        self._pool: dict = {}
        self._plans: OrderedDict = OrderedDict()
        self._binds: dict = {}
        # fast_hits: calls (among the replays / eager runs) that took the fast path;
        # direct_hits: those of them replaying a graph that reads the device-tensor inputs
        # in place (no copy), direct_builds: such graphs captured (not in `captures`)
        # slot_captures: graphs led by the staged upload, one per (plan, staging slot)
        self.stats = {"plans_built": 0, "captures": 0, "replays": 0, "eager": 0, "fast_hits": 0,
                      "direct_hits": 0, "direct_builds": 0, "slot_captures": 0}
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
        n_weights = sum(n.op == "weight" for n in graph.nodes)
        n_host = sum(s["kernel"] == "host" for s in self.steps)
        with progress.bar(n_weights + n_host, desc="load weights", unit="step") as bar:
            self._prepare_constants(weights, bar)
            self.group.synchronize()  # the weights' host copies can go
        self._prepare_calls()

    def _prepare_calls(self) -> None:
        """What every call needs and never changes: input roles, facts, key dims."""
        in_vids = self.plan["inputs"]
        self._n_in = len(self.in_types)
        self._is_buffer = [isinstance(t, BufferType) for t in self.in_types]
        self._buffer_ks = [k for k, b in enumerate(self._is_buffer) if b]
        self._in_dev = [self._on(vid) for vid in in_vids]
        self._in_names = [_dev_name(t.dtype) for t in self.in_types]
        members = {id(m): m for m in self.group.members.values()}.values()
        self._begin = [m.begin_call for m in members if hasattr(m, "begin_call")]
        # One device with pinned staging: calls run asynchronously (no final synchronize).
        self._async = len(members) == 1 and hasattr(self.dev, "end_call")
        self._ragged = RaggedCheck(self.graph)
        refs = set(self.plan["outputs"])
        for s in self.steps:
            if s["kernel"] == "host":
                continue
            refs.update(s["inputs"] + s["outputs"])
            for var in s["attrs"].get("variants", []):
                for op in var["ops"]:
                    refs.update(a[1] for a in op.get("args", []) + op.get("copy", [])
                                if a[0] == "v")
        for vid in list(refs):
            while self.values[vid]["view_of"] is not None:
                vid = self.values[vid]["view_of"]
                refs.add(vid)
        self._used_inputs = {k for k, vid in enumerate(in_vids) if vid in refs}
        self._fact_specs = []
        for name in fact_names(self.steps):
            kind, vids, bucket = parse_fact(name)
            srcs = tuple(self._source(v) for v in vids)
            ks = tuple(in_vids.index(v) if v in in_vids else None for v in srcs)
            ok = all(k is not None or v in self.host_values for v, k in zip(srcs, ks))
            self._fact_specs.append((name, kind, srcs, ks, bucket, ok))
        self._fact_names = [f[0] for f in self._fact_specs]
        # The key holds only the dims something reads: an unused input's shape (max_lengths
        # shrinking every step, say) never forces a new plan.
        dims = set().union(*[d.symbols for t in self.in_types for d in t.shape])
        names = set()
        for s in self.steps:
            for x in step_exprs(s):
                names.update(_NAME.findall(x))
        unused = {vid for k, vid in enumerate(in_vids) if k not in self._used_inputs}
        for v in self.values:
            if v["id"] not in unused:
                for d in self._dims[v["id"]]:
                    names.update(d.symbols)
        self._key_dims = tuple(sorted(names & dims))
        # The fast path (see _signature / _hit): one device that stages asynchronously and
        # reads device tensors cheaply, outputs returned as views.
        self._read = getattr(self.dev, "read_tensor", None)
        self._fast = self._async and self._read is not None and not self.copy_outputs \
            and hasattr(self.dev, "staging_view") and hasattr(self.dev, "copy_in")
        self._roles = [_BUFFER if self._is_buffer[k] else _USED if k in self._used_inputs
                       else None for k in range(self._n_in)]
        self._wanted = [(kind, ks[0] if kind == "seqmax" else tuple(ks), bucket)
                        for _, kind, _, ks, bucket, _ in self._fact_specs]
        self._sigs: dict = {}
        self._tick = 0
        # Hits launch graphs led by their upload, one per staging slot (slot_graphs.py).
        self._slot_graphs = self._fast and self.use_graphs and slot_graphs.ENABLED \
            and hasattr(self.dev, "staging_slot")
        self._lock = threading.Lock()  # execute: one call at a time

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

    def _prepare_constants(self, weights, bar=progress.NULL) -> None:
        bar.stage("binding weights")
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
                bar.stage(name, advance=1, refresh=False)
            elif n.op == "constant":
                host[self._vid_of_node(i)] = round_to(n.attrs["value"], n.attrs["dtype"])
        bar.stage("load-time host steps")
        for s in self.steps:
            if s["kernel"] == "host":
                bar.stage(s["op"], advance=1, refresh=False)
                node = self.graph.nodes[s["attrs"]["node"]]
                missing = [v for v in s["inputs"] if v not in host]
                if missing:
                    raise ValueError(f"gir.{node.op} runs at load time on the host and needs "
                                     f"its weights as numpy arrays (got device tensors)")
                outs, _ = eval_node(node, [host[v] for v in s["inputs"]])
                host.update(zip(s["outputs"], outs))
        self.host_values = host
        upload = [v for v in host if v in device_used and v not in self._const_dev]
        bar.add_total(len(upload))
        bar.stage("uploading")
        for vid in upload:
            self._const_dev[vid] = self._on(vid).upload_new(to_bits(host[vid], self._dtype(vid)))
            bar.update()

    def _vid_of_node(self, index: int) -> int:
        return self._node_vids[index]

    # -- per call -------------------------------------------------------------------------------
    def _nbytes(self, vid: int, env) -> int:
        n = self._dtypes[vid].size_in_bytes
        for d in self._dims[vid]:
            n *= d.evaluate(env)
        return n

    def _shape(self, vid: int, env) -> tuple[int, ...]:
        return tuple(d.evaluate(env) for d in self._dims[vid])

    def _source(self, vid: int) -> int:
        while vid in self._alias:
            vid = self._alias[vid]
        return vid

    @property
    def _graphs(self) -> dict:
        """The captured CUDA graphs by call key."""
        return {k: p.graph for k, p in self._plans.items() if p.graph is not None}

    def execute(self, *inputs, return_numpy: bool | None = None):
        """Run the graph on `inputs`; see the module docstring for what happens per call and
        for the lifetime of device outputs. Bad ragged metadata raises ValueError before
        anything is written.

        Calls from several threads run one at a time: a call's staging slot, the device areas
        its upload fills and its launches are the executor's, so two calls interleaved would
        compute with each other's metadata. A device output stays valid only until the next
        call from any thread: threads sharing a model ask for numpy (`return_numpy=True`) or
        load it with `copy_outputs=True` (fresh device buffers each call)."""
        with self._lock:  # the whole call (see above)
            if len(inputs) != self._n_in:
                raise ValueError(f"graph {self.graph.name!r} takes {self._n_in} inputs, got "
                                 f"{len(inputs)}")
            for begin in self._begin:
                begin()
            sig = blobs = None
            if self._fast and return_numpy is None:
                sig, blobs = self._signature(inputs)
                entry = self._sigs.get(sig)
                if entry is not None:
                    io = entry.plans.get(entry.facts(inputs, blobs))
                    if io is not None:
                        direct = io.direct
                        if direct is not None:  # device tensors: a graph of their addresses?
                            k = io.dk
                            key = blobs[k][1] if k >= 0 else \
                                tuple([blobs[c[0]][1] for c in io.copies])
                            d = direct.get(key)
                            if d is None:
                                d = self._direct(io, key, blobs)
                            if d is not io:
                                d.used = self._tick
                                self.stats["direct_hits"] += 1
                            io = d
                        return self._hit(io, inputs, blobs)
            return self._call(inputs, return_numpy, sig, blobs)

    # -- the general path --------------------------------------------------------------------
    def _call(self, inputs, return_numpy, sig, blobs):
        host_in, dev_in, shapes = {}, {}, []
        for k, x in enumerate(inputs):
            if isinstance(x, np.ndarray):
                host_in[k] = x
                shapes.append(x.shape)
            else:
                h, shape = self._import_input(k, x)
                dev_in[k] = h
                shapes.append(shape)
        env, dims_key, bounds = self._bind(tuple(shapes))
        cache: dict[int, np.ndarray] = {}

        def host_of(k: int) -> np.ndarray:
            x = host_in.get(k)
            if x is None:
                x = cache.get(k)
                if x is None:
                    x = cache[k] = self._download_input(k, dev_in[k], env)
            return x

        facts = self._ragged.check(host_of, env, bounds)
        fvals = tuple([self._fact(spec, facts, host_of) for spec in self._fact_specs])
        where = tuple([_address(dev_in[k]) if k in dev_in else None for k in self._buffer_ks])
        key = (dims_key, fvals, where, tuple(dev_in))
        cp = self._plans.get(key)
        if cp is None:
            local = dict(env)
            local.update(zip(self._fact_names, fvals))
            cp = self._build(key, local, host_in, dev_in)
            self._remember(key, cp)
        self._tick += 1
        cp.used = self._tick
        for lid, area in cp.areas.items():
            cp.stage(self.group[lid], lid, host_in, dev_in)
        sync = bool(return_numpy) or not self._async
        for k in self._buffer_ks:
            if k in host_in:
                vid = self.plan["inputs"][k]
                self._on(vid).upload(cp.storage[vid][0], to_bits(host_in[k], self._dtype(vid)))
                sync = True
        self._run(cp)
        for k in self._buffer_ks:
            if k in host_in:
                x, vid = host_in[k], self.plan["inputs"][k]
                raw = self._on(vid).download(cp.storage[vid][0], self._nbytes(vid, cp.env))
                x[...] = from_bits(raw, self._dtype(vid)).reshape(x.shape)
        to_numpy = not dev_in if return_numpy is None else return_numpy
        outs = self._outputs(cp, to_numpy)
        if self._async:
            self.dev.end_call(tuple(dev_in.values()) or None)
        if sync:
            self.group.synchronize()
        elif sig is not None and not to_numpy and cp.launch is not None:
            self._learn(sig, blobs, inputs, bounds, fvals, cp, outs)
        return outs

    def _import_input(self, k: int, x):
        dev, want = self._in_dev[k], self._in_names[k]
        handle, shape, dtype = dev.import_tensor(x)
        if dtype != want:
            raise TypeError(f"input {k}: expected {self.in_types[k].dtype.short} ({want}), got "
                            f"a device tensor of {dtype}")
        gpu, got = getattr(dev, "device", None), getattr(handle, "device", None)
        if isinstance(gpu, int) and isinstance(got, int) and gpu != got:
            raise ValueError(f"input {k} is a tensor on GPU {got}; the graph places it on device "
                             f"{self._vdev[self.plan['inputs'][k]]}, which runs on GPU {gpu}")
        return handle, tuple(shape)

    def _bind(self, shapes: tuple) -> tuple[dict, tuple, list]:
        """The symbolic dims of these input shapes (checked), the part of them a call key
        holds, and the ragged check's bounds; computed once per shape signature."""
        hit = self._binds.get(shapes)
        if hit is None:
            from graphir.runtime.interpreter import bind_dims

            env = bind_dims(self.in_types, [SimpleNamespace(ndim=len(s), shape=tuple(s))
                                            for s in shapes])
            hit = (env, tuple(env.get(n) for n in self._key_dims), self._ragged.bounds(env))
            if len(self._binds) >= 256:
                self._binds.clear()
            self._binds[shapes] = hit
        return hit

    def _download_input(self, k: int, handle, env) -> np.ndarray:
        vid = self.plan["inputs"][k]
        raw = self._on(vid).download(handle, self._nbytes(vid, env))
        return from_bits(raw, self._dtype(vid)).reshape(self._shape(vid, env))

    def _fact(self, spec, facts, host_of) -> int:
        name, kind, srcs, ks, bucket, ok = spec
        value = facts.seq_max.get(ks[0]) if kind == "seqmax" else facts.kv_max.get(ks)
        if value is None:  # metadata no ragged op checked (a lowering's own fact)
            if not ok:
                raise ValueError(f"the cuda executor needs the ragged offsets and cache lengths "
                                 f"as graph inputs (launch rule fact {name})")
            get = [host_of(k) if k is not None else self.host_values[v]
                   for v, k in zip(srcs, ks)]
            o = np.asarray(get[0]).astype(np.int64)
            lens = o[1:] - o[:-1]
            if kind == "kvmax":
                lens = np.asarray(get[1]).astype(np.int64) + lens
            value = int(lens.max()) if lens.size else 0
        return bucketed(value, bucket)

    def _remember(self, key, cp) -> None:
        self.stats["plans_built"] += 1
        if len(self._plans) >= MAX_PLANS:
            old_key = min(self._plans, key=lambda k: self._plans[k].used)
            old = self._plans.pop(old_key)
            if old.graph is not None:
                self.group.synchronize()  # a graph may still be running
            for entry in self._sigs.values():
                entry.plans = {f: io for f, io in entry.plans.items() if io.cp is not old}
        self._plans[key] = cp

    def _drop_plans(self) -> None:
        if any(p.graph is not None for p in self._plans.values()):
            self.group.synchronize()
        self._plans.clear()
        self._sigs.clear()

    def _run(self, cp) -> None:
        if cp.graph is not None:
            self.stats["replays"] += 1
            self.dev.replay(cp.graph)
            return
        cp.seen += 1
        if self.use_graphs and cp.seen >= 2:
            # Captured at the second call of a key: one-off shapes (a prefill) never pay it.
            g = self._capture(cp)
            self.stats["captures"] += 1
            self.dev.replay(g)
            return
        self.stats["eager"] += 1
        cp.run()
        if not self.use_graphs and not cp.host_steps:
            cp.launch, cp.stat = cp.run, "eager"

    def _capture(self, cp):
        """Capture cp's launches into a CUDA graph (nothing runs); cp.launch replays it."""
        cp.graph = g = self.dev.capture(cp.run)
        cp.launch = slot_graphs.graph_launch(self.dev, g)
        return g

    def _outputs(self, cp, return_numpy: bool) -> list:
        outs = []
        for lid, buf, off, nb, shape, dt in cp.outputs:
            d = self.group[lid]
            if return_numpy:
                raw = d.download(buf, off + nb)[off:]
                outs.append(from_bits(raw, dt).reshape(shape).copy())
            elif self.copy_outputs or not hasattr(d, "view"):
                outs.append(d.export(buf, nb, shape, _dev_name(dt), off))
            else:
                outs.append(d.view(buf, off, shape, _dev_name(dt)))
        return outs


def load(artifact, weights, devices=None, **options):
    """Load a cuda artifact onto the GPU(s); see runtime/cuda/device_model.py."""
    from .device_model import load as _load

    return _load(artifact, weights, devices, **options)
