"""The compile-time tuner without a GPU: table format and precedence, `tune()` with a fake
timing function, the manifest's "tuning" section, the plan a table produces (a cuBLASLt choice
keeps its Triton fallback) run under the interpreter, and `--tune` on a machine without a GPU."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from graphir import DType, Graph, TensorType, ops
from graphir.lowering.triton_gpu import tuning
from graphir.lowering.triton_gpu.backend import _library_entry, lower
from graphir.lowering.triton_gpu.kernels import matmul_configs as mc

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim")

FACTS = {"dtype": "bf16", "N": 6144, "K": 4096, "bias": False}
BUCKETS = [b for b, _ in mc.BUCKETS]
ROOT = Path(__file__).resolve().parents[3]


def table(entries, dtype="bf16", shape="*"):
    return {"version": 1, "families": {"matmul": {dtype: {shape: entries}}}}


class FakeMeasure:
    """Times from a formula of the config (cuBLASLt's rank 2 fastest at large M, returning its
    algorithm record as the GPU measurer does); some candidates fail."""

    def __init__(self, fail=(), bad=()):
        self.fail, self.bad, self.calls, self.prepared = set(fail), set(bad), [], []

    def prepare(self, items):
        self.prepared += [(f.name, c["name"], s) for f, _, c, s in items]

    def __call__(self, fam, facts, cfg, size):
        self.calls.append((cfg["name"], size))
        if cfg["name"] in self.fail:
            raise RuntimeError("compile failed: out of resources")
        out = {"rel_err": 0.5 if cfg["name"] in self.bad else 3e-3}
        if cfg["kind"] == "cublaslt":
            rank = cfg["ALGO_INDEX"]
            out["ms"] = (0.001 + 0.0001 * abs(rank - 2)) if size >= 1024 else 1.0
            out["params"] = {"algo": {"index": rank, "at_m": size, "config": {"id": 100 + rank}}}
        else:
            out["ms"] = 0.01 + 0.0001 * len(cfg["name"]) + 0.00001 * cfg["num_stages"]
        return out


# -- tables ---------------------------------------------------------------------------------
def test_shipped_table_is_valid_and_names_known_configs():
    t = tuning.load_table()
    for dtype in ("bf16", "fp16", "fp32"):
        entry = t["families"]["matmul"][dtype]["*"]
        assert sorted(entry) == sorted(BUCKETS)
        for name in entry.values():
            assert mc.get(name)["kind"] != "cublaslt"  # defaults stay runnable anywhere


def test_untuned_compiles_take_the_measured_shipped_table():
    t = tuning.load_table()
    assert t["device"] == "NVIDIA H200" and "Measured" in t["provenance"]["matmul"]
    shipped = t["families"]["matmul"]["bf16"]
    # No `using` block: select() answers from the shipped table, as an untuned compile does.
    for facts in (FACTS, dict(FACTS, bias=True)):  # a bias takes its shape's entry too
        got = {c.bucket: c for c in tuning.select("matmul", facts)}
        for b in BUCKETS:
            want = shipped["N=6144,K=4096"][b]
            name = want if isinstance(want, str) else want["config"]
            assert got[b].config["name"] == name and got[b].source == "default table"
            if not isinstance(want, str):
                assert got[b].fallback["name"] == want["fallback"]
    other = {c.bucket: c.config["name"] for c in tuning.select("matmul", dict(FACTS, N=1000))}
    assert other == shipped["*"]
    odd = {c.bucket: c.config for c in tuning.select("matmul", dict(FACTS, N=1000, K=1002))}
    assert all(c["kind"] != "tma" for c in odd.values())  # TMA entries skipped: K % 8 != 0
    # The plan of an untuned compile runs those choices.
    program = lower(matmul_graph(N=6144, K=4096))
    names = {s.name for s in program.kernels.values()}
    assert "cublaslt_bf16_n6144_k4096" in names
    # a GEMV at one row; x is a graph input and B a weight: it may read them before its wait
    assert "matmul_bf16_" + shipped["N=6144,K=4096"]["m1"] + "_late" in names
    assert shipped["N=6144,K=4096"]["m1"].startswith("gemv")


@pytest.mark.parametrize("bad,msg", [
    ({"version": 2}, "not a version-1"),
    (table({"m3": "decode"}), "unknown bucket"),
    (table({"m1": "t999"}), "unknown matmul config 't999'"),
    (table({"m1": {"fallback": "decode"}}), "a choice is a config name"),
    (table({"m1": {"config": "cublaslt", "fallback": "t64x64x128_g1_w4_s4_k2"}}),
     "cannot stand in for 'cublaslt'"),
    ({"version": 1, "families": {"conv": {}}}, "unknown kernel family 'conv'"),
])
def test_bad_tables_are_clear_errors(bad, msg):
    with pytest.raises(tuning.TuningError, match=msg):
        tuning.validate_table(bad, "t.json")


def test_unreadable_table(tmp_path):
    p = tmp_path / "t.json"
    p.write_text("{not json")
    with pytest.raises(tuning.TuningError, match="cannot read tuning table"):
        tuning.load_table(p)


def test_precedence_tuned_then_shape_then_star_then_builtin():
    shipped = table({"m1": "decode", "m16": "decode"})
    shipped["families"]["matmul"]["bf16"]["N=6144,K=4096"] = {"m16": "t16x32x512_g1_w4_s3"}
    tuned = table({"m1": "gemv8x1024_w4_s1"}, shape="N=6144,K=4096")
    sel = tuning.Selector([("tuned", tuned), ("default table", shipped)])
    got = {c.bucket: (c.config["name"], c.source) for c in sel.choose("matmul", FACTS, "s")}
    assert got["m1"] == ("gemv8x1024_w4_s1", "tuned")
    assert got["m16"] == ("t16x32x512_g1_w4_s3", "default table")
    assert got["m64"] == (mc.default_config("m64")["name"], "built-in")
    assert [s.where for s in sel.sites] == ["s"]


def test_ineligible_choice_is_skipped_and_cublaslt_gets_a_fallback():
    shipped = table({"large": "tma128x256x64_g8_w8_s3", "m1": "cublaslt"})
    sel = tuning.Selector([("default table", shipped)])
    odd = dict(FACTS, K=4098)  # TMA rows need K % 8 == 0
    by = {c.bucket: c for c in sel.choose("matmul", odd)}
    assert by["large"].source == "built-in" and by["large"].config["kind"] == "tile"
    assert by["m1"].config["name"] == "cublaslt"
    assert by["m1"].fallback["name"] == mc.default_config("m1")["name"]


def test_static_size_chooses_one_bucket():
    sel = tuning.Selector([("default table", table({}))])
    (ch,) = sel.choose("matmul", FACTS, size=300)
    assert ch.bucket == "m1024" and sel.sites[0].size == 300


# -- tune() ---------------------------------------------------------------------------------
def test_tune_records_every_candidate_and_picks_the_fastest_passing_one():
    sel = tuning.Selector([("default table", table({}))])
    sel.choose("matmul", FACTS, "qkv")
    sel.choose("matmul", FACTS, "qkv again")  # same facts: measured once
    fast = "gemv8x1024_w4_s1"
    m = FakeMeasure(fail={"gemv32x256_w4_s1"}, bad={fast})
    t = tuning.tune(sel.sites, m, "Fake GPU")
    tuning.validate_table(t)
    entry = t["families"]["matmul"]["bf16"]["N=6144,K=4096"]
    assert sorted(entry) == sorted(BUCKETS)
    assert {s for _, s in m.calls} == set(mc.TUNE_M.values())
    assert len(m.calls) == sum(len(mc.candidates(b, "bf16", 6144, 4096)) for b in BUCKETS)
    assert sorted(m.prepared) == sorted(("matmul", c, s) for c, s in m.calls)
    m1 = {c["config"]: c for c in entry["m1"]["candidates"]}
    assert "out of resources" in m1["gemv32x256_w4_s1"]["error"]
    assert "over" in m1[fast]["error"]  # too inaccurate: timed but never wins
    timed = [c for c in m1.values() if "error" not in c]
    assert entry["m1"]["config"] == min(timed, key=lambda c: c["ms"])["config"] != fast
    # cuBLASLt's rank 2 wins the large buckets with its algorithm record (only the winner
    # keeps one); its fallback is the fastest single-launch Triton config.
    for b in ("m1024", "large"):
        assert entry[b]["config"] == "cublaslt_h2"
        assert entry[b]["params"]["algo"] == {"index": 2, "at_m": mc.TUNE_M[b],
                                              "config": {"id": 102}}
        assert all("params" not in c for c in entry[b]["candidates"])
        assert {f"cublaslt_h{r}" for r in range(1, mc.LT_RANKS)} | {"cublaslt"} <= \
            {c["config"] for c in entry[b]["candidates"]}
        fb = mc.get(entry[b]["fallback"])
        assert fb["kind"] != "cublaslt" and fb.get("SPLIT_K", 1) == 1
    assert "params" not in entry["m1"]  # a Triton winner needs none


def test_tune_when_nothing_passes_keeps_the_default():
    sel = tuning.Selector([("default table", table({}))])
    sel.choose("matmul", FACTS, size=1)
    names = [c["name"] for c in mc.candidates("m1", "bf16", 6144, 4096)]
    t = tuning.tune(sel.sites, FakeMeasure(fail=names))
    e = t["families"]["matmul"]["bf16"]["N=6144,K=4096"]["m1"]
    assert e["config"] == mc.default_config("m1")["name"] and "no candidate passed" in e["note"]


def test_manifest_section_and_its_text():
    sel = tuning.Selector([("default table", table({}))])
    sel.choose("matmul", FACTS, "matmul -> %3")
    t = tuning.tune(sel.sites, FakeMeasure(fail={"decode"}), "Fake GPU")
    tuned = tuning.Selector([("tuned", t)] + sel.tables)
    tuned.choose("matmul", FACTS, "matmul -> %3")
    sec = tuning.manifest_section(tuned, requested=True, tuned=True, device="Fake GPU")
    json.dumps(sec)  # plain JSON
    (step,) = sec["steps"]
    assert step["family"] == "matmul" and step["facts"] == FACTS
    large = step["buckets"][-1]
    assert large["winner"] == "cublaslt_h2" and large["source"] == "tuned" and large["fallback"]
    assert large["params"]["algo"]["index"] == 2
    assert large["max_M"] is None and step["buckets"][0]["max_M"] == 1
    assert all("ms" in c or "error" in c for c in large["candidates"])
    text = "\n".join(tuning.format_section(sec))
    assert "tuned on Fake GPU" in text and "cublaslt" in text and "fallback" in text
    assert "decode" in text and "failed: RuntimeError" in text
    assert 'params {"algo": {"at_m": 4096, "config": {"id": 102}, "index": 2}}' in text


# -- plans ----------------------------------------------------------------------------------
def matmul_graph(dtype=DType.bfloat16, N=48, K=40, bias=False):
    types = [TensorType(dtype, ["n", K]), TensorType(dtype, [N, K])]
    if bias:
        types.append(TensorType(dtype, [N]))
    with Graph("mm", input_types=types) as g:
        x, w = g.inputs[:2]
        y = ops.fused_qkv_matmul(x, w, g.inputs[2]) if bias else ops.matmul(x, w,
                                                                             transpose_b=True)
        g.output(y)
    return g


def test_plan_variants_follow_the_table_and_keep_the_cublaslt_fallback():
    lt = {"config": "cublaslt", "fallback": "decode"}
    shipped = table({"m1": "gemv16x512_w4_s1", "m16": lt, "m64": lt,
                     "m256": "t64x64x128_g1_w4_s4_k2", "m1024": "t64x64x128_g1_w4_s4_k2",
                     "large": "prefill"})
    with tuning.using(tuning.Selector([("default table", shipped)])) as sel:
        program = lower(matmul_graph())
    (step,) = [s for s in program.plan.steps if s.op == "matmul"]
    variants = step.attrs["variants"]
    # Equal adjacent choices share a variant: m1 | m16-m64 | m256-m1024 | large.
    assert [v["when"] for v in variants] == ["n <= 1", "n <= 64", "n <= 1024", None]
    lt = program.kernels[variants[1]["ops"][0]["launch"]]
    assert lt.extra["kind"] == "cublaslt" and lt.extra["N"] == 48 and lt.extra["K"] == 40
    fb = program.kernels[lt.extra["fallback"]]
    assert fb.extra["config"] == "decode"
    entry = _library_entry(lt)
    assert entry["kind"] == "cublaslt" and "cubin" not in entry
    assert [p["name"] for p in entry["params"]] == ["a_ptr", "b_ptr", "bias_ptr", "c_ptr", "M",
                                                     "N", "K"]
    assert len(variants[2]["ops"]) == 2 and variants[2]["scratch"][0][1] == "float32"
    assert sel.sites[0].facts == {"dtype": "bf16", "N": 48, "K": 40, "bias": False}


def test_a_pinned_cublaslt_rank_reaches_the_kernel_entry():
    rec = {"index": 3, "at_m": 8192, "align": 256, "version": 130100, "bytes": "ab" * 64,
           "config": {"id": 66, "tile": 31}}
    shipped = table({"m1024": {"config": "cublaslt_h1", "fallback": "prefill"},
                     "large": {"config": "cublaslt_h3", "fallback": "prefill",
                               "params": {"algo": rec}}})
    tuning.validate_table(shipped)
    with tuning.using(tuning.Selector([("default table", shipped)])):
        program = lower(matmul_graph())
    (step,) = [s for s in program.plan.steps if s.op == "matmul"]
    by_when = {v["when"]: program.kernels[v["ops"][0]["launch"]] for v in step.attrs["variants"]}
    m1024, large = by_when["n <= 1024"], by_when[None]
    # Same fallback, different algorithms: two entries, named by rank and tuned M.
    assert m1024.name == "cublaslt_bf16_n48_k40_h1m1024"
    assert large.name == "cublaslt_bf16_n48_k40_h3m8192"
    # No measurement behind the m1024 choice: serving takes rank 1 of its own list at M=1024.
    assert _library_entry(m1024)["algo"] == {"index": 1, "at_m": 1024}
    assert _library_entry(large)["algo"] == rec and _library_entry(large)["m_hints"] == [4096]
    # The same rank in adjacent buckets pins each bucket's own algorithm: no shared variant.
    both = table({"m1024": {"config": "cublaslt_h2", "fallback": "prefill"},
                  "large": {"config": "cublaslt_h2", "fallback": "prefill"}})
    with tuning.using(tuning.Selector([("default table", both)])):
        program = lower(matmul_graph())
    (step,) = [s for s in program.plan.steps if s.op == "matmul"]
    names = [program.kernels[v["ops"][0]["launch"]].name for v in step.attrs["variants"][-2:]]
    assert names == ["cublaslt_bf16_n48_k40_h2m1024", "cublaslt_bf16_n48_k40_h2m4096"]
    with pytest.raises(tuning.TuningError, match="'params' must be a mapping"):
        tuning.validate_table(table({"large": {"config": "cublaslt_h3", "params": [1]}}))


@pytest.mark.parametrize("bias", [False, True])
def test_tuned_plan_runs_every_bucket_under_the_interpreter(bias):
    from graphir.runtime.cuda.executor import PlanExecutor
    from tests.lowering.triton_gpu.test_backend_interp import InterpDevice

    shipped = table({"m1": "gemv16x512_w4_s1", "m16": "cublaslt",
                     "m64": "t64x64x128_g1_w4_s4_k2", "m256": "tma128x128x64_g8_w8_s4_p"})
    g = matmul_graph(DType.float32, bias=bias)
    shipped["families"]["matmul"]["fp32"] = copy.deepcopy(
        shipped["families"]["matmul"].pop("bf16"))
    with tuning.using(tuning.Selector([("default table", shipped)])):
        program = lower(g)
    dev = InterpDevice(program)
    ex = PlanExecutor(program.plan.to_json(), g, dev, {})
    rng = np.random.default_rng(1)
    w = rng.standard_normal((48, 40)).astype(np.float32)
    b = rng.standard_normal(48).astype(np.float32)
    for M in (1, 3, 17, 64, 130):
        x = rng.standard_normal((M, 40)).astype(np.float32)
        (got,) = ex.execute(*([x, w, b] if bias else [x, w]))
        want = x.astype(np.float64) @ w.T.astype(np.float64) + (b if bias else 0)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    launched = set(dev.launched)
    assert any(n.startswith("cublaslt_fp32_n48_k40") for n in launched)  # ran its fallback
    assert any("splitk_reduce" in n for n in launched) and any("tma" in n for n in launched)


# -- the compile option and the CLI ---------------------------------------------------------
def test_tune_option_and_cache_salt():
    from graphir.lowering.triton_gpu.backend import build

    with pytest.raises(ValueError, match="unknown cuda compile options.*known: \\['tune'\\]"):
        build(None, None, tunes=True)
    plain, tuned = tuning.cache_salt(False), tuning.cache_salt(True)
    assert plain == {"tuning_table": tuning.table_digest()}
    assert "tune_device" in tuned and tuned["tuning_table"] == plain["tuning_table"]


def test_cli_tune_without_a_gpu_says_so_and_inspect_shows_the_choices(tmp_path):
    src = tmp_path / "mm.py"
    src.write_text("from graphir import DType, Graph, TensorType, ops\n"
                   "def build():\n"
                   "    t = [TensorType(DType.bfloat16, ['n', 64]), "
                   "TensorType(DType.bfloat16, [32, 64])]\n"
                   "    with Graph('mm', input_types=t) as g:\n"
                   "        g.output(ops.matmul(g.inputs[0], g.inputs[1], transpose_b=True))\n"
                   "    return g\n")
    env = {"GRAPHIR_CACHE_DIR": str(tmp_path / "cache"), "TRITON_CACHE_DIR": str(tmp_path / "tc"),
           "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    cli = [sys.executable, "-m", "graphir.tools.cli"]
    art = tmp_path / "mm.gart"
    p = subprocess.run(cli + ["compile", f"{src}:build", "--target", "cuda:sm_90", "-o", str(art),
                              "--tune", "-q"], capture_output=True, text=True, env=env,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "--tune needs a CUDA GPU" in p.stderr and "tuning_defaults.json" in p.stderr
    assert "RuntimeWarning" not in p.stderr  # said once, plainly
    p = subprocess.run(cli + ["inspect", str(art)], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    assert "tuning    default table tuning_defaults.json" in p.stdout
    assert "matmul matmul -> %" in p.stdout and "m1 " in p.stdout and "large" in p.stdout
    # Triton kernels launch with programmatic dependent launch; cuBLASLt entries do not.
    kernel_lines = [ln for ln in p.stdout.splitlines() if ln.startswith("  matmul")]
    assert any(ln.endswith("[PDL]") for ln in kernel_lines), p.stdout
    assert not any("cublaslt" in ln and ln.endswith("[PDL]") for ln in kernel_lines), p.stdout
    # Both operands are graph inputs: the one-row GEMV reads them before its wait, and says so.
    late = [ln for ln in kernel_lines if "_late" in ln]
    assert len(late) == 1 and late[0].endswith(
        "[PDL]  (reads a_ptr, b_ptr, bias_ptr before the wait)"), p.stdout
    p = subprocess.run(cli + ["compile", f"{src}:build", "--target", "cpu", "-o",
                              str(tmp_path / "c.gart"), "--tune"], capture_output=True,
                       text=True, env=env)
    assert p.returncode == 1 and "--tune applies to cuda targets" in p.stderr


# -- the GPU measurer, on a fake runtime whose kernels run under the interpreter -------------
class FakeBuffer:
    def __init__(self, shape, dtype):
        from graphir.runtime.cuda.memory import dtype_name, itemsize

        self.shape, self.dtype = tuple(shape), dtype_name(dtype)
        self.nbytes = int(np.prod(self.shape)) * itemsize(self.dtype)
        self.data = torch_bytes(self.nbytes)

    @classmethod
    def empty(cls, shape, dtype="uint8", device=0):
        return cls((shape,) if isinstance(shape, int) else shape, dtype)

    @classmethod
    def from_numpy(cls, array, dtype=None, device=0):
        buf = cls(array.shape, dtype)
        buf.data[:] = torch_from(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
        return buf

    def memset(self, byte, stream=None):
        self.data.fill_(byte)

    def to_numpy(self):
        from graphir.runtime.cuda.memory import numpy_dtype

        return self.data.numpy().copy().view(numpy_dtype(self.dtype)).reshape(self.shape)


def torch_bytes(n):
    import torch

    return torch.full((max(n, 1),), 0xAB, dtype=torch.uint8)


def torch_from(a):
    import torch

    return torch.from_numpy(a.copy())


class FakeKernel:
    launches = []

    def __init__(self, spec):
        self.spec = spec

    @classmethod
    def from_cubin(cls, cubin, md, device=0):
        return cls(cubin)

    def launch(self, grid, *args, stream=None):
        from tests.lowering.triton_gpu.test_backend_interp import TORCH

        FakeKernel.launches.append(self.spec.name)
        call = []
        for (_, ty), a in zip(self.spec.runtime_params(), args):
            call.append(a.data.view(TORCH[ty[1:]]) if ty.startswith("*") else a)
        if grid[0] * grid[1] * grid[2]:
            run = self.spec.interpretable()
            run.fn[grid](*call, **run.constexprs)


class FakeEvent:
    clock = 0.0

    def __init__(self, **kw):
        self.t = 0.0

    def record(self, stream=None):
        FakeEvent.clock += 10.0  # ms: long enough that one launch fills a timed batch
        self.t = FakeEvent.clock

    def elapsed_time(self, end):
        return end.t - self.t


class FakeGraph:
    def capture(self, stream):
        import contextlib

        return contextlib.nullcontext(self)

    def replay(self, stream=None):
        pass

    def destroy(self):
        pass


def test_gpu_measurer_checks_then_times_through_the_runtime(monkeypatch):
    from types import SimpleNamespace

    import graphir.runtime.cuda as rc
    from graphir.lowering.triton_gpu import tuning_gpu

    monkeypatch.setattr(rc.driver, "device_properties",
                        lambda d=0: SimpleNamespace(name="Fake H200"))
    monkeypatch.setattr(rc, "Stream", lambda device=0: SimpleNamespace(synchronize=lambda: 0))
    for name, fake in (("DeviceBuffer", FakeBuffer), ("Kernel", FakeKernel),
                       ("Event", FakeEvent), ("CudaGraph", FakeGraph)):
        monkeypatch.setattr(rc, name, fake)
    monkeypatch.setattr(tuning_gpu, "compile_specs", lambda specs, arch, workers=None: {
        k: SimpleNamespace(cubin=s, launch_metadata=lambda: {}) for k, s in specs.items()})
    monkeypatch.setattr(tuning_gpu, "L2_ROTATE_BYTES", 1)  # one copy of the weight
    m = tuning_gpu.GpuMeasurer(SimpleNamespace(arch=90))
    fam = tuning.family("matmul")
    facts = {"dtype": "bf16", "N": 24, "K": 72, "bias": True}
    m.prepare([(fam, facts, mc.get("t64x64x128_g1_w4_s4_k2"), 5)])
    assert any("splitk_reduce" in k for k in m.compiled)
    for name in ("t64x64x128_g1_w4_s4_k2", "gemv16x512_w4_s1", "tma128x128x64_g8_w8_s4_p"):
        FakeKernel.launches = []
        r = m(fam, facts, mc.get(name), 5)
        assert 0 < r["rel_err"] < 1e-2 and 0 < r["ms"] < float("inf"), (name, r)
        assert FakeKernel.launches and all(name in n or "reduce" in n
                                           for n in FakeKernel.launches)
    assert m.device_name == "Fake H200"
    # A kernel that writes nothing leaves the NaN poison: the check fails, nothing is timed.
    monkeypatch.setattr(FakeKernel, "launch", lambda self, grid, *a, stream=None: None)
    r = m(fam, facts, mc.get("gemv16x512_w4_s1"), 5)
    assert r["rel_err"] == float("inf") and r["ms"] == float("inf")


def test_unavailable_reason_without_a_gpu():
    from types import SimpleNamespace

    from graphir.lowering.triton_gpu.tuning_gpu import unavailable_reason

    assert unavailable_reason(SimpleNamespace(arch=90))  # this machine has no GPU
