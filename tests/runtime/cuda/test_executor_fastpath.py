"""The CUDA executor's per-call fast path on the CPU: call keys, CUDA-graph capture and replay,
one staged upload per call, the output pool, and the host check of the ragged metadata.

The device is the interpreter device of tests/lowering/triton_gpu (byte tensors on the CPU,
kernels through Triton's interpreter) plus "CUDA graphs" that record the launch list at capture
and replay exactly that list: a replay whose key resolved to other launches computes wrong
numbers, which the float64-checked reference comparison catches.
"""
import os
import sys

import numpy as np
import pytest

if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    if "triton" in sys.modules:
        pytest.skip("triton was imported in compiled mode in this process; run this file on its "
                    "own to use the interpreter", allow_module_level=True)
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from graphir import DType, Graph, TensorType, ops  # noqa: E402
from graphir.runtime.interpreter import run  # noqa: E402
from graphir.types import BufferType  # noqa: E402
from tests.lowering.triton_gpu.test_backend_interp import InterpDevice  # noqa: E402

NH, NKV, D, PAGE, ROPE_ROWS, POOL = 2, 1, 16, 16, 400, 64
QKV = (NH + 2 * NKV) * D


class GraphDevice(InterpDevice):
    """InterpDevice with recorded-and-replayed "graphs", device tensors (torch CPU tensors
    stand in), a staging area with one upload per call, and output views."""

    supports_graphs = True

    def __init__(self, program):
        super().__init__(program)
        self._rec = None
        self.captured, self.replays, self.staged, self.syncs, self.kept = [], 0, 0, 0, []
        self.reads = 0

    def launch(self, key, grid, args):
        if self._rec is not None:
            self._rec.append(("launch", key, grid, args))
        else:
            super().launch(key, grid, args)

    def copy(self, dst, doff, src, soff, nbytes):
        if self._rec is not None:
            self._rec.append(("copy", dst, doff, src, soff, nbytes))
        else:
            super().copy(dst, doff, src, soff, nbytes)

    def capture(self, fn):
        self._rec = []
        try:
            fn()
        finally:
            rec, self._rec = self._rec, None
        self.captured.append(rec)
        return rec

    @property
    def plan_graphs(self):
        """The captures of plans, without the hits' graphs led by their slot's upload."""
        return [g for g in self.captured if not g or g[0][0] != "stage"]

    def replay(self, g):
        self.replays += 1
        for op in g:
            if op[0] == "stage":  # a slot graph's upload: that slot's bytes at replay time
                self._upload(*op[1:])
            else:
                (super().launch if op[0] == "launch" else super().copy)(*op[1:])

    def import_tensor(self, t):
        return t.view(torch.uint8).reshape(-1), tuple(t.shape), str(t.dtype).removeprefix("torch.")

    # The executor's fast path (CudaDevice has the same methods).
    def read_tensor(self, t):
        if not isinstance(t, torch.Tensor):
            return None
        self.reads += 1
        return (t.view(torch.uint8).reshape(-1), t.data_ptr(), t.shape,
                str(t.dtype).removeprefix("torch."), 0)

    def staging_view(self, nbytes):
        return memoryview(self.staging(nbytes))

    def copy_in(self, dst, off, handle, nbytes):
        self.copy(dst, off, handle, 0, nbytes)

    # Like the pinned ring: a few slots, each array coming back while it is large enough;
    # a call's work is queued when it ends (end_call moves to the next slot).
    staging_depth = 3

    def staging(self, nbytes):
        if not hasattr(self, "_imgs"):
            self._imgs, self._slot = [None] * self.staging_depth, 0
        img = self._imgs[self._slot]
        if img is None or img.nbytes < nbytes:
            img = self._imgs[self._slot] = np.empty(nbytes, np.uint8)
        return img

    def staging_slot(self):
        return self._slot, self._imgs[self._slot]

    def upload_staged(self, buf, nbytes):
        img = self._imgs[self._slot]
        if self._rec is not None:
            self._rec.append(("stage", buf, img, nbytes))
        else:
            self._upload(buf, img, nbytes)

    def _upload(self, buf, img, nbytes):
        self.staged += 1
        buf[:nbytes].copy_(torch.from_numpy(img[:nbytes].copy()))

    def end_call(self, keep=None):
        self.kept.append(keep)
        if hasattr(self, "_imgs"):
            self._slot = (self._slot + 1) % self.staging_depth

    def view(self, buf, off, shape, dtype):
        dt = getattr(torch, dtype)
        n = int(np.prod(shape)) * torch.empty((), dtype=dt).element_size()
        return buf[off:off + n].view(dt).reshape(shape)

    def export(self, buf, nbytes, shape, dtype, off=0):
        return self.view(buf, off, shape, dtype).clone()

    def synchronize(self):
        self.syncs += 1


def build_graph():
    """rope_split_store -> flash_attention_ragged -> x2, with an unused max_lengths input."""
    types = [TensorType(DType.float32, ["total_seq_len", QKV]),
             TensorType(DType.uint32, ["batch + 1"]),
             BufferType(DType.float32, ["total_num_pages", 2, 1, PAGE, NKV, D]),
             TensorType(DType.uint32, ["batch"]),
             TensorType(DType.uint32, ["batch", "max_num_pages"]),
             TensorType(DType.float32, [ROPE_ROWS, D]),
             TensorType(DType.uint32, ["steps", 2])]
    names = ["qkv", "input_row_offsets", "kv_blocks", "cache_lengths", "lookup_table", "freqs",
             "max_lengths"]
    with Graph("fastpath", input_types=types, input_names=names) as g:
        qkv, offs, blocks, clen, lut, freqs, _ = g.inputs
        q = ops.rope_split_store(qkv, freqs, offs, clen, lut, blocks, n_heads=NH, n_kv_heads=NKV,
                                 head_dim=D, layer_idx=0, interleaved=False)
        o = ops.flash_attention_ragged(q, blocks, offs, clen, lut, n_heads=NH, n_kv_heads=NKV,
                                       head_dim=D, layer_idx=0)
        g.output(o * 2.0)
    return g


@pytest.fixture(scope="module")
def program():
    from graphir.lowering.triton_gpu.backend import lower

    g = build_graph()
    return g, lower(g)


def executor(program, **kw):
    from graphir.runtime.cuda.executor import PlanExecutor

    g, prog = program
    dev = GraphDevice(prog)
    return PlanExecutor(prog.plan.to_json(), g, dev, {}, **kw), dev


class Cache:
    """A paged cache and its sequences: the executor's copy (a "device" tensor) and the
    reference's numpy copy, stepped together."""

    def __init__(self, rng, lens, pages_per_seq=20, pool=POOL):
        self.rng = rng
        self.ref = rng.standard_normal((pool, 2, 1, PAGE, NKV, D)).astype(np.float32)
        self.dev = torch.from_numpy(self.ref.copy())
        self.clen = np.array(lens, np.uint32)
        self.lut = rng.permutation(pool)[:len(lens) * pages_per_seq] \
            .reshape(len(lens), pages_per_seq).astype(np.uint32)
        self.freqs = rng.standard_normal((ROPE_ROWS, D)).astype(np.float32)

    def inputs(self, new, steps=1):
        offs = np.concatenate([[0], np.cumsum(new)]).astype(np.uint32)
        qkv = self.rng.standard_normal((int(offs[-1]), QKV)).astype(np.float32)
        maxl = np.ones((steps, 2), np.uint32)
        return qkv, offs, self.clen.copy(), self.lut, self.freqs, maxl

    def step(self, ex, new, steps=1, check=True):
        qkv, offs, clen, lut, freqs, maxl = self.inputs(new, steps)
        (y,) = ex.execute(torch.from_numpy(qkv), offs, self.dev, clen, lut, freqs, maxl)
        y = y.clone()
        if check:
            (want,) = run(ex.graph, qkv, offs, self.ref, clen, lut, freqs, maxl)
            np.testing.assert_allclose(y.numpy(), want, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(self.dev.numpy(), self.ref, rtol=1e-6, atol=1e-6)
        self.clen = self.clen + np.asarray(new, np.uint32)
        return y


def test_decode_loop_captures_once_then_replays(program):
    ex, dev = executor(program)
    dev.syncs = 0                               # loading synchronized once
    cache = Cache(np.random.default_rng(1), [37, 90])
    cache.step(ex, [5, 3])                      # prefill: a key of its own, run eagerly
    for _ in range(8):
        cache.step(ex, [1, 1])
    assert ex.stats == {"plans_built": 2, "captures": 1, "replays": 6, "eager": 2,
                        "fast_hits": 6,          # every replay after the capturing call
                        "direct_hits": 0, "direct_builds": 0,  # qkv at a new address each call
                        "slot_captures": 3}      # the hits' graphs: one a staging slot
    assert len(dev.captured) == 4 and dev.replays == 7
    # The hits' graphs begin with the upload of their own slot, then the plan's launches.
    first = dev.captured[0]
    slots = [g[0][2] for g in dev.captured[1:]]
    assert all(g[0][0] == "stage" and g[1:] == first for g in dev.captured[1:])
    assert len({id(a) for a in slots}) == 3 and all(a is b for a, b in zip(slots, dev._imgs))
    # One staged upload per call, nothing synchronized, device inputs held until the stream
    # passes the call.
    assert dev.staged == 9 and dev.syncs == 0
    assert len(dev.kept) == 9
    assert all(sum(isinstance(x, torch.Tensor) for x in k) == 2 for k in dev.kept)


def test_keys_tell_apart_launch_lists_of_the_same_length(program):
    # Two batch sizes alternate; their launch lists have as many launches (the graph cache
    # once keyed on that count alone) but other grids and sizes.
    ex, dev = executor(program)
    b = Cache(np.random.default_rng(3), [11, 64, 7])
    a = Cache(np.random.default_rng(2), [20, 33])
    a.ref, a.dev = b.ref, b.dev                 # one cache: the KV address is no help here
    for _ in range(3):
        b.step(ex, [1, 1, 1])                   # the larger first: no pool growth later
        a.step(ex, [1, 1])
    assert ex.stats["plans_built"] == 2 and ex.stats["captures"] == 2
    assert ex.stats["replays"] == 2
    g1, g2 = dev.plan_graphs
    assert len(g1) == len(g2) and [op[2] for op in g1] != [op[2] for op in g2]


def test_a_new_kv_bucket_is_a_new_key(program):
    ex, _ = executor(program)
    cache = Cache(np.random.default_rng(4), [253, 40])
    seen = set()
    for _ in range(5):                          # longest cache + new: 254 ... 258
        cache.step(ex, [1, 1])
        # Collected each step: a pooled buffer that grows for the second key (more decode
        # partitions at 512 keys) drops the plans built before it.
        seen |= {k[1] for k in ex._plans}
    facts = sorted(seen)
    assert [f[ex._fact_names.index("rt_kvmax_1_3_b256")] for f in facts] == [256, 512]
    assert ex.stats == {"plans_built": 2, "captures": 2, "replays": 1, "eager": 2,
                        "fast_hits": 1, "direct_hits": 0, "direct_builds": 0,
                        "slot_captures": 1}


def test_an_unused_input_shape_does_not_change_the_key(program):
    ex, _ = executor(program)
    cache = Cache(np.random.default_rng(5), [12, 30])
    for steps in (4, 3, 2, 1):                  # max_lengths shrinks every step (MAX does)
        cache.step(ex, [1, 1], steps=steps)
    assert ex.stats["plans_built"] == 1 and ex.stats["replays"] == 2


def test_the_address_of_a_device_buffer_input_is_part_of_the_key(program):
    ex, _ = executor(program)
    a = Cache(np.random.default_rng(6), [9, 17])
    b = Cache(np.random.default_rng(7), [9, 17])
    for _ in range(3):
        a.step(ex, [1, 1])
        b.step(ex, [1, 1])
    assert ex.stats["plans_built"] == 2 and ex.stats["captures"] == 2


BAD = {
    "offsets start past 0": (lambda i: i[1].__setitem__(0, 1), "must start at 0"),
    "offsets decrease": (lambda i: i[1].__setitem__(1, 3), r"decrease at index 2"),
    "offsets end short": (lambda i: i[1].__setitem__(2, 1),
                          r"end at 1 \(index 2\) but the ragged input .* has 2 rows"),
    "page past the pool": (lambda i: i[3].__setitem__((1, 1), POOL),
                           rf"page id {POOL} at lookup_table\[1, 1\] .*pool of {POOL} pages"),
    "cache beyond its pages": (lambda i: i[2].__setitem__(0, 20 * PAGE),
                               r"sequence 0 needs 321 positions .* holds 20 pages of 16"),
    "position past the rope table": (lambda i: i[2].__setitem__(1, ROPE_ROWS),
                                     rf"sequence 1 reaches position {ROPE_ROWS} .* RoPE table's "
                                     rf"{ROPE_ROWS} rows"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_metadata_is_refused_before_anything_is_written(program, case):
    ex, dev = executor(program)
    cache = Cache(np.random.default_rng(8), [40, 13], pages_per_seq=20)
    for _ in range(3):
        cache.step(ex, [1, 1])                  # a captured graph exists
    mutate, msg = BAD[case]
    qkv, offs, clen, lut, freqs, maxl = cache.inputs([1, 1])
    lut = lut.copy()
    mutate([qkv, offs, clen, lut])
    before, stats = cache.dev.clone(), dict(ex.stats)
    launched, replays = len(dev.launched), dev.replays
    with pytest.raises(ValueError, match=msg):
        ex.execute(torch.from_numpy(qkv), offs, cache.dev, clen, lut, freqs, maxl)
    assert torch.equal(cache.dev, before) and ex.stats == stats
    assert len(dev.launched) == launched and dev.replays == replays
    cache.step(ex, [1, 1])                      # the next good call replays as before
    assert ex.stats["replays"] == stats["replays"] + 1


def test_outputs_stay_valid_until_the_next_call_unless_copied(program):
    for copy in (False, True):
        ex, _ = executor(program, copy_outputs=copy)
        cache = Cache(np.random.default_rng(9), [5, 8])
        qkv, offs, clen, lut, freqs, maxl = cache.inputs([1, 1])
        (y1,) = ex.execute(torch.from_numpy(qkv), offs, cache.dev, clen, lut, freqs, maxl)
        first = y1.clone()
        (y2,) = ex.execute(torch.from_numpy(qkv * 0.5), offs, cache.dev, clen, lut, freqs, maxl)
        assert not torch.equal(first, y2)
        assert torch.equal(y1, first) == copy    # the pool's view was overwritten


def test_numpy_inputs_run_synchronously_and_copy_the_cache_back(program):
    ex, dev = executor(program)
    dev.syncs = 0
    cache = Cache(np.random.default_rng(10), [7, 21])
    for new in ([2, 3], [1, 1], [1, 1]):
        qkv, offs, clen, lut, freqs, maxl = cache.inputs(new)
        blocks = cache.dev.numpy().copy()
        (y,) = ex.execute(qkv, offs, blocks, clen, lut, freqs, maxl)
        (want,) = run(ex.graph, qkv, offs, cache.ref, clen, lut, freqs, maxl)
        assert isinstance(y, np.ndarray)
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(blocks, cache.ref, rtol=1e-6, atol=1e-6)
        cache.dev = torch.from_numpy(blocks)
        cache.clen = cache.clen + np.asarray(new, np.uint32)
    assert dev.syncs == 3


# -- the fast path (a hit: known signature and facts) -----------------------------------------
def test_int64_metadata_is_converted_on_the_fast_path(program):
    ex, _ = executor(program)
    cache = Cache(np.random.default_rng(11), [14, 3])
    for _ in range(4):
        qkv, offs, clen, lut, freqs, maxl = cache.inputs([1, 1])
        args = (qkv, offs.astype(np.int64), cache.dev, clen.astype(np.int64),
                lut.astype(np.int64), freqs, maxl)
        (y,) = ex.execute(torch.from_numpy(args[0]), *args[1:])
        (want,) = run(ex.graph, qkv, offs, cache.ref, clen, lut, freqs, maxl)
        np.testing.assert_allclose(y.numpy(), want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(cache.dev.numpy(), cache.ref, rtol=1e-6, atol=1e-6)
        cache.clen = cache.clen + 1
    assert ex.stats["fast_hits"] == 2


def test_evicted_and_dropped_plans_never_serve_a_hit(program, monkeypatch):
    from graphir.runtime.cuda import executor as mod

    monkeypatch.setattr(mod, "MAX_PLANS", 2)
    ex, _ = executor(program)
    small = Cache(np.random.default_rng(12), [10, 20])
    big = Cache(np.random.default_rng(13), [30, 5, 8, 9], pages_per_seq=10)
    big.ref, big.dev = small.ref, small.dev
    other = Cache(np.random.default_rng(14), [3, 4, 5], pages_per_seq=10)
    other.ref, other.dev = small.ref, small.dev
    for _ in range(3):
        small.step(ex, [1, 1])                  # captured, then a hit
    for _ in range(3):
        big.step(ex, [1, 1, 1, 1])              # larger: the pools grow, every plan dropped
    for _ in range(3):
        other.step(ex, [1, 1, 1])               # a third key: the least recently used goes
    for _ in range(3):
        small.step(ex, [1, 1])                  # rebuilt: numbers checked every step
    assert len(ex._plans) == 2
    plans = set(map(id, ex._plans.values()))
    assert all(id(io.cp) in plans for e in ex._sigs.values() for io in e.plans.values())
    assert ex.stats["plans_built"] == 4 and ex.stats["fast_hits"] == 4


def test_a_staging_slot_regrown_for_a_larger_call_gets_its_graphs_recaptured(program):
    # The hits' graphs copy from one staging slot each; a call with more metadata (a wider
    # lookup table) regrows the slots (new memory), after which the first plan's graphs must
    # read the new slots, not the old ones (holding an earlier step's metadata: wrong
    # numbers, caught by the reference).
    ex, dev = executor(program)
    narrow = Cache(np.random.default_rng(21), [30, 12])
    wide = Cache(np.random.default_rng(22), [28, 14], pages_per_seq=60, pool=2 * POOL)
    for _ in range(5):
        narrow.step(ex, [1, 1])
    assert ex.stats["slot_captures"] == 3
    before = list(dev._imgs)
    for _ in range(5):
        wide.step(ex, [1, 1])
    assert all(a is not b for a, b in zip(before, dev._imgs))  # every slot regrown
    n = ex.stats["slot_captures"]
    for _ in range(4):
        narrow.step(ex, [1, 1])                 # numbers checked against the interpreter
    assert ex.stats["plans_built"] == 2         # the same plan, its slots' graphs anew
    assert ex.stats["slot_captures"] == n + 3


def test_without_graphs_a_hit_runs_the_prepared_launches(program):
    ex, dev = executor(program, use_graphs=False)
    cache = Cache(np.random.default_rng(15), [6, 11])
    for _ in range(4):
        cache.step(ex, [1, 1])                  # numbers checked against the interpreter
    assert ex.stats == {"plans_built": 1, "captures": 0, "replays": 0, "eager": 4,
                        "fast_hits": 3, "direct_hits": 0, "direct_builds": 0,
                        "slot_captures": 0}
    assert dev.captured == [] and dev.replays == 0


def test_host_inputs_too_large_for_bytes_are_staged_from_views(program, monkeypatch):
    from graphir.runtime.cuda import fast_path

    monkeypatch.setattr(fast_path, "BLOB_MAX", 8)  # every metadata input counts as large
    ex, _ = executor(program)
    cache = Cache(np.random.default_rng(16), [21, 2])
    for _ in range(3):
        cache.step(ex, [1, 1])
    for _ in range(2):                          # a lookup table large and of another dtype:
        qkv, offs, clen, lut, freqs, maxl = cache.inputs([1, 1])  # a new signature, a hit
        (y,) = ex.execute(torch.from_numpy(qkv), offs, cache.dev, clen, lut.astype(np.int64),
                          freqs, maxl)
        (want,) = run(ex.graph, qkv, offs, cache.ref, clen, lut, freqs, maxl)
        np.testing.assert_allclose(y.numpy(), want, rtol=1e-5, atol=1e-5)
        cache.clen = cache.clen + 1
    assert ex.stats["fast_hits"] == 2


# -- device tensors read in place (a graph per repeated address) ------------------------------
def aligned(a: np.ndarray, align: int = 256) -> torch.Tensor:
    """A torch copy of `a` at an `align`-byte aligned address (as CUDA allocations are)."""
    raw = torch.empty(a.nbytes + align, dtype=torch.uint8)
    off = -raw.data_ptr() % align
    t = raw[off:off + a.nbytes].view(getattr(torch, a.dtype.name)).view(a.shape)
    t.copy_(torch.from_numpy(a))
    return t


def checked(ex, cache, x, qkv, rest):
    """One call with qkv given as the device tensor x; numbers checked, cache stepped."""
    offs, clen, lut, freqs, maxl = rest
    (y,) = ex.execute(x, offs, cache.dev, clen, lut, freqs, maxl)
    (want,) = run(ex.graph, qkv, offs, cache.ref, clen, lut, freqs, maxl)
    np.testing.assert_allclose(y.numpy(), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cache.dev.numpy(), cache.ref, rtol=1e-6, atol=1e-6)
    cache.clen = cache.clen + 1


def test_a_device_input_at_a_repeated_address_is_read_in_place(program):
    ex, dev = executor(program)
    copies = []
    dev.copy_in = lambda *a, _f=dev.copy_in: (copies.append(a[2]), _f(*a))
    cache = Cache(np.random.default_rng(17), [37, 90])
    x = None
    for i in range(6):                          # new numbers at one address
        qkv, *rest = cache.inputs([1, 1])
        if x is None:
            x = aligned(qkv)
        else:
            x.copy_(torch.from_numpy(qkv))
        checked(ex, cache, x, qkv, rest)
    # build + eager, capture, a copying hit, the direct graph captured, then replayed: only
    # the one hit copied x
    assert ex.stats["captures"] == 1 and ex.stats["fast_hits"] == 4
    assert ex.stats["direct_builds"] == 1 and ex.stats["direct_hits"] == 3
    assert len(copies) == 1 and len(dev.plan_graphs) == 1
    # The direct "graphs" (one a staging slot, led by its upload) read x's own storage,
    # never the input area.
    (entry,) = ex._sigs.values()
    (io,) = entry.plans.values()
    (d,) = io.direct.values()
    graphs = d.bound.slot_graphs.graphs
    assert len(graphs) == 3 and all(g[0][0] == "stage" for g in graphs)
    assert all(any(a[0].data_ptr() == x.data_ptr() for op in g if op[0] == "launch"
                   for a in op[3] if isinstance(a, tuple)) for g in graphs)
    # another address: copied, right numbers; back to the first: its graph again
    qkv, *rest = cache.inputs([1, 1])
    checked(ex, cache, aligned(qkv), qkv, rest)
    assert len(copies) == 2
    qkv, *rest = cache.inputs([1, 1])
    x.copy_(torch.from_numpy(qkv))
    checked(ex, cache, x, qkv, rest)
    assert len(copies) == 2 and ex.stats["direct_hits"] == 4


def test_an_input_inside_a_buffer_the_graph_writes_is_copied_first(program):
    # qkv given as a view into the KV blocks the call writes: read in place, the numbers
    # would depend on the write order; the copy takes them before anything runs.
    ex, dev = executor(program)
    cache = Cache(np.random.default_rng(18), [40, 21])
    flat = cache.dev.view(-1)
    for _ in range(4):
        qkv, *rest = cache.inputs([1, 1])
        n = qkv.size
        start = (-flat.data_ptr() % 256) // 4 + 256  # aligned, inside the pool
        x = flat[start:start + n].view(qkv.shape)
        x.copy_(torch.from_numpy(qkv))
        cache.ref.reshape(-1)[start:start + n] = qkv.reshape(-1)
        checked(ex, cache, x, qkv, rest)
    assert ex.stats["fast_hits"] == 2 and ex.stats["direct_builds"] == 0


def test_calls_from_two_threads_do_not_mix(program):
    # A call's staging, uploads and launches use the executor's one staging area and its
    # plans' fixed device areas: calls from two threads must not interleave (execute holds a
    # lock). Threads switch as often as CPython allows, so an unlocked executor mixes them.
    import threading

    from graphir.runtime.cuda.executor import PlanExecutor
    from tests.threads import run_in_threads

    class OneStream(GraphDevice):
        """Kernels one at a time, as a stream runs them (Triton's interpreter is not
        thread-safe either)."""

        def __init__(self, prog):
            super().__init__(prog)
            self._one = threading.Lock()

        def launch(self, key, grid, args):
            with self._one:
                super().launch(key, grid, args)

    g, prog = program
    # Outputs of their own (copy_outputs), kept past the next call of the other thread.
    ex = PlanExecutor(prog.plan.to_json(), g, OneStream(prog), {}, copy_outputs=True)

    def worker(seed):
        cache = Cache(np.random.default_rng(seed), [30 + seed, 90])
        for _ in range(3):
            cache.step(ex, [1, 1])

    run_in_threads(worker, (1, 2))
