"""The cuBLASLt wrapper without a GPU: the library search, the calls it makes (against a
recording fake library), its argument checks, the Triton fallback wherever cuBLASLt is
missing or has no algorithm, and the algorithm choice: the pointers' alignment, ranks of the
heuristic's list, records that pin one (restored from bytes, config or rank), the tuner's
measurer per rank."""
import ctypes
import warnings

import pytest

from graphir.runtime.cuda import cublaslt, cublaslt_algo
from graphir.runtime.cuda.device_model import _Kernels

N, K = 48, 40
WS = (0x7000_0000, 1 << 20)


class FakeLt:
    """A recording cuBLASLt. Handles are small ints; the heuristic ranks `algos` algorithms,
    rank r having id 100 + r, tile 10 + r and stages 20 + r (words 0-2 of the opaque struct);
    `fail` names a function that returns CUBLAS_STATUS_NOT_SUPPORTED; AlgoCheck refuses the ids
    in `reject`; config attributes of the wrong byte size are refused as the library does."""

    SIZES = {0: 4, 1: 4, 2: 4, 3: 4, 4: 4, 5: 4, 6: 4, 7: 2, 8: 2}
    WORD = {0: 0, 1: 1, 6: 2}  # config attribute -> word of the opaque struct

    def __init__(self, algos=1, fail=None, version=130100, reject=()):
        self.calls, self.algos, self.fail, self.next = [], algos, fail, 0x100
        self.version, self.reject = version, set(reject)

    def _handle(self, ref):
        self.next += 1
        ref._obj.value = self.next

    def _call(self, name, args):
        if name in ("cublasLtCreate", "cublasLtMatmulDescCreate",
                    "cublasLtMatmulPreferenceCreate", "cublasLtMatrixLayoutCreate"):
            self._handle(args[0])
        elif name == "cublasLtGetVersion":
            return self.version
        elif name == "cublasLtMatmulAlgoGetHeuristic":
            count, results, got = args[7], args[8], args[9]._obj
            got.value = min(count, self.algos)
            for r in range(got.value):
                results[r].algo.data[0:3] = [100 + r, 10 + r, 20 + r]
                results[r].state = 0
        elif name == "cublasLtMatmulAlgoInit":
            if not 100 <= args[7] < 100 + self.algos:
                return 15
            args[8]._obj.data[0] = args[7]
        elif name in ("cublasLtMatmulAlgoConfigGetAttribute",
                      "cublasLtMatmulAlgoConfigSetAttribute"):
            algo, attr, val, size = args[0]._obj, args[1], args[2]._obj, args[3]
            if self.SIZES.get(attr) != size:
                return 7  # CUBLAS_STATUS_INVALID_VALUE: wrong size for the attribute
            w = self.WORD.get(attr)
            if name.endswith("GetAttribute"):
                val.value = algo.data[w] if w is not None else 0
            elif w is not None:
                algo.data[w] = val.value
        elif name == "cublasLtMatmulAlgoCheck":
            return 15 if args[6]._obj.data[0] in self.reject else 0
        elif name == "cublasLtGetStatusString":
            return b"the operation is not supported (fake)"
        return None

    def __getattr__(self, name):
        if not name.startswith("cublasLt"):
            raise AttributeError(name)

        def fn(*args):
            self.calls.append((name, args))
            out = self._call(name, args)
            if out is not None:
                return out
            return 15 if name == self.fail else 0
        return fn

    def named(self, name):
        return [a for n, a in self.calls if n == name]

    def launched_ids(self):
        return [a[12]._obj.data[0] for a in self.named("cublasLtMatmul")]


def _val(x):
    x = getattr(x, "_obj", x)
    return x.value if hasattr(x, "value") else x


def attrs(lib, fn):
    return {int(a[1]): _val(a[2]) for a in lib.named(fn)}


@pytest.fixture
def no_context(monkeypatch):
    from graphir.runtime.cuda import driver

    monkeypatch.setattr(driver, "ensure_context", lambda device=0: None)


def make(lib, **kw):
    kw.setdefault("has_bias", True)
    return cublaslt.CublasLtMatmul("bf16", N, K, lib=lib, workspace=WS, **kw)


def test_descriptors_and_heuristics_are_made_once_ahead_of_launches():
    lib = FakeLt()
    mm = make(lib, m_hints=(1, 64))
    (desc,) = lib.named("cublasLtMatmulDescCreate")
    assert desc[1:] == (cublaslt.COMPUTE_32F, cublaslt.CUDA_TYPES["fp32"])
    assert attrs(lib, "cublasLtMatmulDescSetAttribute") == {
        cublaslt.DESC_TRANSA: cublaslt.OP_T, cublaslt.DESC_TRANSB: cublaslt.OP_N,
        cublaslt.DESC_EPILOGUE: cublaslt.EPILOGUE_BIAS,
        cublaslt.DESC_BIAS_DATA_TYPE: cublaslt.CUDA_TYPES["bf16"]}
    pref = attrs(lib, "cublasLtMatmulPreferenceSetAttribute")
    assert pref[cublaslt.PREF_MAX_WORKSPACE_BYTES] == WS[1]
    # Planned ahead for pointers as aligned as the runtime's allocations (256 bytes).
    assert all(pref[a] == 256 for a in cublaslt.PREF_MIN_ALIGNMENT)
    # Column-major views: weight [K, N] (op T), activations [K, M], output [N, M].
    layouts = [tuple(_val(x) for x in a[1:]) for a in lib.named("cublasLtMatrixLayoutCreate")]
    assert layouts == [(14, K, N, K), (14, K, 1, K), (14, N, 1, N), (14, K, 64, K),
                       (14, N, 64, N)]
    assert [a[7] for a in lib.named("cublasLtMatmulAlgoGetHeuristic")] == [1, 1]
    mm.plan(64)  # cached
    assert len(lib.named("cublasLtMatmulAlgoGetHeuristic")) == 2
    assert mm.plan(64)[3] == "heuristic" and mm.version == 130100


def test_launch_passes_the_weight_as_a_and_runs_on_the_stream(no_context):
    lib = FakeLt()
    mm = make(lib, m_hints=(64,))
    mm.launch((9, 1, 1), 0x1000, 0x2000, 0x3000, 0x4000, 64, N, K, stream=7)
    (call,) = lib.named("cublasLtMatmul")
    ptrs = [_val(call[i]) for i in (3, 5, 8, 10)]
    assert ptrs == [0x2000, 0x1000, 0x4000, 0x4000]  # A=weight, B=activations, C=D=out
    assert _val(call[13]) == WS[0] and call[14] == WS[1] and _val(call[15]) == 7
    assert lib.launched_ids() == [100]  # the heuristic's first choice
    assert _val(call[2]) == 1.0 and _val(call[7]) == 0.0
    assert attrs(lib, "cublasLtMatmulDescSetAttribute")[cublaslt.DESC_BIAS_POINTER] == 0x3000
    run = mm.prepare((9, 1, 1), [0x1100, 0x2000, 0x3000, 0x4000, 64, N, K])
    run(11)
    assert _val(lib.named("cublasLtMatmul")[-1][5]) == 0x1100
    assert _val(lib.named("cublasLtMatmul")[-1][15]) == 11
    mm.launch((0, 1, 1), 0x1000, 0x2000, 0x3000, 0x4000, 0, N, K)  # no rows: nothing queued
    assert len(lib.named("cublasLtMatmul")) == 2


@pytest.mark.parametrize("args,msg", [
    ((0x1000, 0x2000, 0x3000, 0x4000, 4, N + 1, K), "launched with N=49"),
    ((0x1000, 0x2000, 0x3000, 0x4000, -1, N, K), "M must be an int >= 0"),
    ((0x1008, 0x2000, 0x3000, 0x4000, 4, N, K), "pointer a=0x1008 must be non-null and 16"),
    ((0x1000, 0x2000, 0, 0x4000, 4, N, K), "pointer bias=0x0"),
    ((0x1000, 0x2000, 0x3000, 0x4000, 4, N), "takes 7 arguments"),
    ((0x1000, 0x2000, 0x3000, "c", 4, N, K), "expected a device pointer"),
])
def test_bad_launch_arguments_are_clear_errors(no_context, args, msg):
    lib = FakeLt()
    with pytest.raises((ValueError, TypeError), match=msg):
        make(lib).launch((1, 1, 1), *args)
    assert not lib.named("cublasLtMatmul")


@pytest.mark.parametrize("kw,msg", [({"dtype": "fp8"}, "dtype must be one of"),
                                    ({"N": 0}, "N must be a positive int"),
                                    ({"K": 2.5}, "K must be a positive int")])
def test_bad_construction_is_a_clear_error(kw, msg):
    args = {"dtype": "bf16", "N": N, "K": K, **kw}
    with pytest.raises(ValueError, match=msg):
        cublaslt.CublasLtMatmul(args["dtype"], args["N"], args["K"], lib=FakeLt(), workspace=WS)


def test_failed_call_names_the_call_and_status():
    with pytest.raises(cublaslt.CublasLtError,
                       match="cublasLtMatrixLayoutCreate failed: CUBLAS_STATUS_NOT_SUPPORTED"):
        make(FakeLt(fail="cublasLtMatrixLayoutCreate"))


class FakeKernel:
    def __init__(self):
        self.launches = []

    def launch(self, grid, *args, stream=None):
        self.launches.append((grid, args, stream))


def test_no_algorithm_runs_the_fallback_with_the_same_launch(no_context):
    fb = FakeKernel()
    mm = make(FakeLt(algos=0), fallback=lambda: fb)
    with pytest.warns(RuntimeWarning, match="no algorithm for M=3.*Triton fallback"):
        mm.launch((5, 1, 1), 0x1000, 0x2000, 0x3000, 0x4000, 3, N, K, stream=2)
    assert fb.launches == [((5, 1, 1), (0x1000, 0x2000, 0x3000, 0x4000, 3, N, K), 2)]
    with pytest.raises(cublaslt.CublasLtError, match="no algorithm"):
        make(FakeLt(algos=0)).launch((5, 1, 1), 0x1000, 0x2000, 0x3000, 0x4000, 3, N, K)


def test_library_search_and_a_clear_error_when_it_is_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(cublaslt, "_lib", None)
    monkeypatch.setattr(cublaslt, "_error", None)
    missing = str(tmp_path / "libcublasLt.so.13")
    monkeypatch.setenv(cublaslt.LIBCUBLASLT_ENV, missing)
    assert cublaslt.candidates() == [missing]
    with pytest.raises(cublaslt.CublasLtUnavailableError,
                       match="install the nvidia-cublas wheel.*Tried: .*libcublasLt.so.13"):
        cublaslt.load()
    assert cublaslt.is_available() is False
    monkeypatch.delenv(cublaslt.LIBCUBLASLT_ENV)
    assert cublaslt.candidates()[-2:] == ["libcublasLt.so.13", "libcublasLt.so.12"]


def test_manifest_entry_without_the_library_falls_back(monkeypatch):
    def unavailable():
        raise cublaslt.CublasLtUnavailableError("cannot load cuBLASLt (test)")

    monkeypatch.setattr(cublaslt, "load", unavailable)
    entry = {"kind": "cublaslt", "name": "cublaslt_bf16_n48_k40", "fallback": "tri", "dtype":
             "bf16", "N": N, "K": K, "has_bias": False, "m_hints": [16]}
    kernels = _Kernels(None, {"lt": entry}, 0)
    tri = kernels["tri"] = FakeKernel()  # the fallback, already loaded
    with pytest.warns(RuntimeWarning, match="cannot load cuBLASLt.*Triton fallback tri"):
        k = kernels["lt"]
    assert k is tri
    k.launch((3, 1, 1), 1, 2, 1, 4, 16, N, K, stream=0)
    assert tri.launches


def test_heuristic_result_struct_matches_the_c_layout():
    from graphir.lowering.triton_gpu.kernels import matmul_configs as mc

    assert ctypes.sizeof(cublaslt._Algo) == 64
    assert ctypes.sizeof(cublaslt._Heuristic) == 96
    assert mc.LT_RANKS == cublaslt_algo.RANKS  # the tuner's candidates = the ranks timed


# -- alignment and algorithm choice ---------------------------------------------------------
def pref_alignment(lib, pref_handle):
    return {int(a[1]): _val(a[2]) for a in lib.named("cublasLtMatmulPreferenceSetAttribute")
            if _val(a[0]) == pref_handle}[cublaslt.PREF_MIN_ALIGNMENT[0]]


@pytest.mark.parametrize("a_ptr,align", [(0x10000, 256), (0x10080, 128), (0x10010, 16)])
def test_heuristic_is_told_the_pointers_alignment(no_context, a_ptr, align):
    lib = FakeLt()
    mm = make(lib, has_bias=False)
    mm.launch((1, 1, 1), a_ptr, 0x20000, a_ptr, 0x40000, 8, N, K)
    (heur,) = lib.named("cublasLtMatmulAlgoGetHeuristic")
    assert pref_alignment(lib, _val(heur[6])) == align
    assert (8, align) in mm._plans


def test_ranked_lists_the_heuristics_top_algorithms():
    lib = FakeLt(algos=5)
    mm = make(lib)
    ranks = mm.ranked(64, count=8)
    assert [r.algo.data[0] for r in ranks] == [100, 101, 102, 103, 104]
    assert lib.named("cublasLtMatmulAlgoGetHeuristic")[-1][7] == 8
    assert cublaslt_algo.read_config(lib, ranks[3].algo) == {
        "id": 103, "tile": 13, "stages": 23, "splitk": 0, "reduction": 0, "swizzle": 0,
        "custom": 0, "inner_shape": 0, "cluster_shape": 0}


def test_a_pinned_rank_runs_every_m_the_library_accepts(no_context):
    lib = FakeLt(algos=6)
    mm = make(lib, algo={"index": 3, "at_m": 64})
    assert mm.plan(64)[3] == "pinned" and mm.plan(500)[3] == "pinned"
    mm.launch((1, 1, 1), 0x1000, 0x2000, 0x3000, 0x4000, 500, N, K)
    assert lib.launched_ids() == [103]
    # The rank was resolved once, from the list for the tuned M (count = rank + 1).
    assert [a[7] for a in lib.named("cublasLtMatmulAlgoGetHeuristic")] == [4]
    # Less aligned pointers than it was tuned with: the heuristic chooses for them.
    mm.launch((1, 1, 1), 0x1010, 0x2000, 0x3000, 0x4000, 500, N, K)
    assert lib.launched_ids() == [103, 100]
    rec = mm.algo_record(500)
    assert rec["index"] == 3 and rec["at_m"] == 64 and rec["version"] == 130100
    assert rec["config"]["id"] == 103 and len(bytes.fromhex(rec["bytes"])) == 64


def test_a_rejected_or_missing_pin_takes_the_heuristics_choice(no_context):
    mm = make(FakeLt(algos=6, reject={103}), algo={"index": 3, "at_m": 64})
    assert mm.plan(64)[3] == "heuristic" and mm.plan(64)[2].data[0] == 100
    with pytest.warns(RuntimeWarning, match="rank 5 at M=64 is not available"):
        assert make(FakeLt(algos=2), algo={"index": 5, "at_m": 64}).plan(64)[3] == "heuristic"
    assert make(FakeLt(algos=6), algo={"index": 0, "at_m": 64}).pin is None  # rank 0: per M


def test_a_record_restores_from_bytes_then_config_then_rank(no_context):
    rec = make(FakeLt(algos=6), algo={"index": 4, "at_m": 64}).algo_record(64)
    # Same library version: the opaque bytes, no heuristic call.
    lib = FakeLt(algos=6)
    mm = make(lib, algo=rec)
    assert mm.plan(32)[2].data[0:3] == [104, 14, 24]
    assert not lib.named("cublasLtMatmulAlgoGetHeuristic")
    # Another version: rebuilt from the config attributes.
    lib = FakeLt(algos=6, version=120400)
    assert make(lib, algo=rec).plan(32)[2].data[0:3] == [104, 14, 24]
    assert [a[7] for a in lib.named("cublasLtMatmulAlgoInit")] == [104]
    # Another version without that algorithm id: the serving library's own rank 4.
    lib = FakeLt(algos=5, version=120400)
    bad = dict(rec, config=dict(rec["config"], id=999))
    assert make(lib, algo=bad).plan(32)[2].data[0] == 104
    assert [a[7] for a in lib.named("cublasLtMatmulAlgoGetHeuristic")] == [5]


@pytest.mark.parametrize("rec,msg", [
    ([3], "is a mapping"),
    ({"index": -1, "at_m": 4}, "'index' must be an int >= 0"),
    ({"index": 1, "at_m": 0}, "'at_m' must be an int >= 1"),
    ({"index": 1, "at_m": 4, "bytes": "00"}, "is 64 bytes, got 1"),
    ({"index": 1, "at_m": 4, "bytes": "00" * 64}, "needs the library 'version'"),
    ({"index": 1, "at_m": 4, "config": {"id": "x"}}, "'config' must map names to ints"),
])
def test_bad_algorithm_records_are_clear_errors(rec, msg):
    with pytest.raises(ValueError, match=msg):
        cublaslt_algo.validate_record(rec)


def test_manifest_entry_pins_its_algorithm_and_a_bad_pin_is_dropped(monkeypatch, no_context):
    lib = FakeLt(algos=6)
    monkeypatch.setattr(cublaslt, "load", lambda: lib)
    monkeypatch.setattr(cublaslt, "_shared", lambda device, lib: (0x77, WsBuf()))
    entry = {"kind": "cublaslt", "name": "lt", "fallback": "tri", "dtype": "bf16", "N": N,
             "K": K, "has_bias": False, "m_hints": [64], "algo": {"index": 2, "at_m": 64}}
    kernels = _Kernels(None, {"lt": entry, "bad": dict(entry, algo={"index": "x"})}, 0)
    kernels["lt"].launch((1, 1, 1), 0x1000, 0x2000, 0x1000, 0x4000, 64, N, K)
    assert lib.launched_ids() == [102]
    with pytest.warns(RuntimeWarning, match="ignoring the pinned algorithm"):
        assert kernels["bad"].pin is None


class WsBuf:
    ptr, nbytes = WS


def test_the_tuner_times_each_rank_and_refuses_a_missing_one(monkeypatch):
    from graphir.lowering.triton_gpu import tuning_gpu

    monkeypatch.setattr(cublaslt, "load", lambda: FakeLt(algos=3))
    monkeypatch.setattr(cublaslt, "_shared", lambda device, lib: (0x77, WsBuf()))
    m = tuning_gpu.GpuMeasurer.__new__(tuning_gpu.GpuMeasurer)
    m.device, m._libs = 0, {}
    plan = {"library": "cublaslt", "dtype": "bf16", "N": N, "K": K, "has_bias": False}
    lt = m._library(dict(plan, algo={"index": 2, "at_m": 256}), 256)
    assert lt.plan(256)[2].data[0] == 102 and lt.algo_record(256)["index"] == 2
    assert m._library(dict(plan, algo={"index": 0, "at_m": 256}), 256).pin is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a missing rank is a failed candidate, not a warning
        with pytest.raises(RuntimeError, match="lists no rank-5 algorithm for M=256"):
            m._library(dict(plan, algo={"index": 5, "at_m": 256}), 256)
    monkeypatch.setattr(cublaslt, "load", lambda: FakeLt(algos=3, reject={101}))
    m._libs.clear()
    with pytest.raises(RuntimeError, match="refuses its rank-1 algorithm for M=256"):
        m._library(dict(plan, algo={"index": 1, "at_m": 256}), 256)
