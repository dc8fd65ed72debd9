"""parallel_runtime.c's memrefCopy (the strided memref.copy bufferization emits, e.g. for a split
of a matmul's result) against numpy: random shapes, element sizes, strided and offset views on
both sides, size-0 and size-1 dimensions, ranks 0 to 5; and through a compiled graph."""
import ctypes

import numpy as np
import pytest

from graphir.lowering.mlir_cpu import toolchain


class _Unranked(ctypes.Structure):
    _fields_ = [("rank", ctypes.c_int64), ("descriptor", ctypes.c_void_p)]


def _descriptor(base: np.ndarray, view: np.ndarray):
    """A ranked memref descriptor of `view` (a view into `base`): allocated, aligned, offset,
    sizes, strides (in elements), as MLIR lays it out."""
    item = view.itemsize
    offset = (view.__array_interface__["data"][0] - base.ctypes.data) // item
    fields = [base.ctypes.data, base.ctypes.data, offset, *view.shape,
              *(s // item for s in view.strides)]
    desc = (ctypes.c_int64 * len(fields))(*fields)
    return desc, _Unranked(view.ndim, ctypes.cast(desc, ctypes.c_void_p))


@pytest.fixture(scope="module")
def memref_copy(tmp_path_factory):
    import os

    old = os.environ.get("GRAPHIR_CACHE_DIR")
    os.environ["GRAPHIR_CACHE_DIR"] = str(tmp_path_factory.mktemp("rt"))
    try:
        lib = ctypes.CDLL(str(toolchain._runtime_artifact("so")))
    finally:
        if old is None:
            del os.environ["GRAPHIR_CACHE_DIR"]
        else:
            os.environ["GRAPHIR_CACHE_DIR"] = old
    fn = lib.memrefCopy
    fn.argtypes = [ctypes.c_int64, ctypes.POINTER(_Unranked), ctypes.POINTER(_Unranked)]
    fn.restype = None
    return fn


def _random_view(rng, base_shape, view_shape):
    """A view of `view_shape` into an array of `base_shape` at a random start, every axis
    stepped by 1 or 2 where it fits."""
    index = []
    for n, m in zip(base_shape, view_shape):
        step = int(rng.choice([1, 2])) if 2 * m <= n else 1
        start = int(rng.integers(0, n - step * (m - 1))) if m else 0
        index.append(slice(start, start + step * m if m else start, step))
    return tuple(index)


@pytest.mark.parametrize("dtype", [np.uint8, np.float16, np.float32, np.float64, np.complex128])
def test_strided_copies_match_numpy(memref_copy, dtype):
    rng = np.random.default_rng(7)
    for case in range(300):
        rank = int(rng.integers(0, 6))
        shape = tuple(int(rng.choice([0, 1, 2, 3, 5, 8])) if case % 25 == 0 else
                      int(rng.integers(1, 7)) for _ in range(rank))
        bases = [np.asarray(rng.standard_normal([2 * n + 3 for n in shape]).astype(dtype))
                 for _ in range(2)]
        idx = [_random_view(rng, b.shape, shape) + (...,) for b in bases]   # views at rank 0 too
        # A third of the cases copy a slice into a dense array (a split), a third a dense array
        # into a slice (a concat), a third between two stepped views.
        dense = case % 3
        if dense < 2:
            bases[dense] = np.ascontiguousarray(bases[dense][idx[dense]])
            idx[dense] = (...,)
        (src_base, dst_base), (src_idx, dst_idx) = bases, idx
        src, dst = src_base[src_idx], dst_base[dst_idx]
        want = dst_base.copy()
        want[dst_idx] = src
        sd, su = _descriptor(src_base, src)
        dd, du = _descriptor(dst_base, dst)
        memref_copy(src.itemsize, ctypes.byref(su), ctypes.byref(du))
        np.testing.assert_array_equal(dst_base, want, err_msg=f"case {case}: shape {shape}, "
                                      f"src strides {src.strides}, dst strides {dst.strides}")


def test_split_of_a_matmul_result_through_memref_copy(tmp_path, monkeypatch):
    """The compiled case that reaches memrefCopy: the matmul schedule's canonicalization folds
    the split's copies into slices of the result, which bufferize to memref.copy."""
    from graphir import DeviceRef, DType, Graph, TensorType, ops
    from graphir.lowering.driver import compile_graph
    from graphir.runtime.session import InferenceSession

    monkeypatch.setenv("GRAPHIR_CACHE_DIR", str(tmp_path))
    rng = np.random.default_rng(3)
    dev = DeviceRef.CPU()
    w = rng.standard_normal((48, 32)).astype(np.float32)
    with Graph("mm_split", input_types=[TensorType(DType.float32, ["T", 32], dev)]) as g:
        y = ops.matmul(g.inputs[0], ops.constant(w, DType.float32, dev), transpose_b=True)
        a, b = ops.split(y, [40, 8], axis=1)
        c, d = ops.split(b.reshape([b.shape[0], 2, 4]), [1, 3], axis=2)
        g.output(a, c, d)
    from graphir.tools.compile_cmd import cpu_stage_text

    assert "memref.copy" in cpu_stage_text(g, "bufferized")   # the path under test
    model = InferenceSession().load(compile_graph(g, "cpu"))
    x = rng.standard_normal((37, 32)).astype(np.float32)
    got = model.execute(x)
    full = x.astype(np.float64) @ w.T.astype(np.float64)
    want = [full[:, :40], full[:, 40:].reshape(37, 2, 4)[:, :, :1],
            full[:, 40:].reshape(37, 2, 4)[:, :, 1:]]
    for gv, wv in zip(got, want):
        np.testing.assert_allclose(gv, wv, rtol=1e-4, atol=1e-4)
