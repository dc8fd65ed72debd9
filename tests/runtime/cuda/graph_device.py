"""The stand-in device of the CUDA executor's CPU tests (tests/runtime/cuda/test_executor_*):
the interpreter device of tests/lowering/triton_gpu (byte tensors on the CPU, kernels through
Triton's interpreter) plus "CUDA graphs" that record the launch list at capture and replay
exactly that list (a replay whose key resolved to other launches computes wrong numbers, which
the float64-checked reference comparison catches), a ring of staging slots, device tensors
(torch CPU tensors) and output views; a small graph, its program and a paged cache stepped
against the interpreter.

Importing it switches Triton to its interpreter (or skips the importing test module when
Triton was already imported compiled)."""
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


def _bytes(t):
    """A tensor's bytes, flat and aliasing it (an empty one flattened first: numpy gives an
    empty array zero strides, which torch's dtype view refuses)."""
    return t.view(torch.uint8).reshape(-1) if t.numel() else t.reshape(-1).view(torch.uint8)


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
        return _bytes(t), tuple(t.shape), str(t.dtype).removeprefix("torch.")

    # The executor's fast path (CudaDevice has the same methods).
    def read_tensor(self, t):
        if not isinstance(t, torch.Tensor):
            return None
        self.reads += 1
        return (_bytes(t), t.data_ptr(), t.shape,
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
