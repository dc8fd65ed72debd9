"""The decode kernel under the compile-time tuner, on the CPU: the plan picks each bucket's config
at run time from the batch and the bucketed context (run by the plan executor through Triton's
interpreter against the numpy interpreter), keeps at most a few kernels, `tune()` with a fake
timer picks the fastest candidate per bucket, and the GPU measurer's decode launches and check
run on a fake runtime whose kernels execute under the interpreter."""

import numpy as np
import pytest

from graphir.lowering.triton_gpu import tuning
from graphir.lowering.triton_gpu.backend import lower
from graphir.lowering.triton_gpu.kernels import paged_decode_config as cfg
from graphir.lowering.triton_gpu.kernels import paged_decode_tuning as pdt
from graphir.runtime.cuda.executor import PlanExecutor
from graphir.runtime.interpreter import run
from tests.lowering.triton_gpu.test_backend_interp import InterpDevice
from tests.lowering.triton_gpu.test_paged_decode_plan import NH, NKV, build, step

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim")

A, B, C = "n16tile_w4s3c2", "n8tileh2_w4s3c2", "n32gather_w4s3c2"


def table(entries, shape="*", dtype="fp32"):
    return {"version": 1, "families": {"decode": {dtype: {shape: entries}}}}


class RecordingDevice(InterpDevice):
    """Also records the decode config of every launch."""

    def __init__(self, program):
        super().__init__(program)
        self.configs = []

    def launch(self, key, grid, args):
        conf = self.specs[key].extra.get("config")
        if conf:
            self.configs.append(conf["name"])
        super().launch(key, grid, args)


def executor(g, selector):
    with tuning.using(selector):
        program = lower(g)
    dev = RecordingDevice(program)
    return PlanExecutor(program.plan.to_json(), g, dev, {}), dev, program


def decode_step(program):
    (s,) = [s for s in program.plan.steps if s.op == "flash_attention_ragged"]
    return s


# (new tokens, cache lengths, the config that must run): the bucket is (batch x 2 KV heads,
# context rounded up to 256).
STEPS = [
    ([1, 1], [40, 90], A),                          # 4 units, 256 keys: u16_k2048
    ([1, 0, 1], [2100, 5, 30], B),                  # 6 units, 2304 keys: u16_klong
    ([1] * 10, list(range(3, 93, 9)), C),           # 20 units: u64_k2048
    ([3, 1], [20, 7], "n64gather_w4s5c3"),          # 3 new tokens: the q=4 tile, built-in
]


def test_plan_runs_the_config_of_each_bucket():
    sel = tuning.Selector([("default table", table(
        {"u16_k2048": A, "u16_klong": B, "u64_k2048": C, "u64_klong": C}))])
    g = build(16)
    ex, dev, program = executor(g, sel)
    rng = np.random.default_rng(7)
    for new, cache, want in STEPS:
        args = step(rng, 16, new, cache)
        ref = run(g, *[a.copy() for a in args])[0]
        dev.configs.clear()
        got = ex.execute(*[a.copy() for a in args])[0]
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
        assert dev.configs == [want], (new, cache, dev.configs)
    # One site per query tile; the taller tiles never take the one-token table's choices.
    sites = [s for s in sel.sites if s.family == "decode"]
    assert [s.facts["q"] for s in sites] == cfg.q_tiles(NH, NKV) == [1, 4, 8]
    assert {c.source for s in sites[1:] for c in s.choices} == {"built-in"}


def test_plan_conditions_fold_buckets_with_the_same_config():
    sel = tuning.Selector([("default table", table(
        {"u16_k2048": A, "u16_klong": A, "u64_k2048": C, "u64_klong": C, "u256_k2048": C}))])
    _, _, program = executor(build(16), sel)
    variants = decode_step(program).attrs["variants"]
    whens = [v["when"] for v in variants]
    seqmax = whens[0].split(" ")[0]
    direct = [w[len(seqmax) + 10:] for w in whens if w and w.startswith(f"{seqmax} <= 1 and")
              and w.endswith("num_parts == 1")]
    # u16 (A) | u64 (C) | u256_k2048 (C again: u64's condition does not cover it) | the
    # built-in default everywhere else, folded into one variant without a bucket condition.
    units = "(b) * 2"
    assert [d.rsplit(" and ", 1)[0] for d in direct] == [
        f"{units} <= 16", f"{units} <= 64", f"{units} <= 256 and kv_len <= 2048",
        direct[-1].rsplit(" and ", 1)[0]]
    assert direct[-1].count(" and ") == 0  # only the split test
    configs = [program.kernels[v["ops"][0]["launch"]].extra["config"]["name"]
               for v, w in zip(variants, whens)
               if w and (w == f"{seqmax} <= 1" or w.startswith(f"{seqmax} <= 1 and"))]
    default = cfg.resolve(None, NH, NKV, 16, 16, 1)["name"]
    assert configs == [A, A, C, C, C, C, default, default]
    assert whens[-1] is None  # prefill


def test_kernel_limit_moves_buckets_to_the_next_best_kept_kernel():
    distinct = {cfg.kernel_key(c): c["name"] for c in reversed(cfg.CANDIDATES)}
    names = [n for n in (c["name"] for c in cfg.CANDIDATES) if n in distinct.values()][:9]
    facts = pdt.make_facts("bf16", 32, 8, 128, 128, 1, "CAUSAL")
    buckets = [b for b, _ in pdt.BUCKETS]
    choices = []
    for i, b in enumerate(buckets):
        # Bucket i: its own config fastest, CANDIDATES[0] 1% slower, the others 20% slower.
        cands = [{"config": n, "ms": 1.0 + (0 if j == i else 0.01 if j == 0 else 0.2),
                  "rel_err": 1e-3} for j, n in enumerate(names)]
        choices.append(tuning.Choice(b, cfg.get(names[i]), "tuned", candidates=cands))
    pdt.limit_kernels(choices, 3, facts)
    kept = {cfg.kernel_key(c.config) for c in choices}
    assert len(kept) == 3
    moved = [c for c in choices if "kernel limit" in c.source]
    assert len(moved) == 6 and all(c.config["name"] == names[0] for c in moved)
    # Untimed choices (a shipped table) move to the kept config most buckets use.
    plain = [tuning.Choice(b, cfg.get(n), "default table") for b, n in
             zip(buckets, [A, A, A, B, C, "n64tile_w4s3c3", B, B, B])]
    pdt.limit_kernels(plain, 2, pdt.make_facts("fp32", NH, NKV, 16, 16, 1, "CAUSAL"))
    assert [c.config["name"] for c in plain] == [A, A, A, B, B, B, B, B, B]


def test_plan_keeps_at_most_six_decode_kernels():
    many = {b: c["name"] for (b, _), c in zip(pdt.BUCKETS, cfg.CANDIDATES)}
    sel = tuning.Selector([("default table", table(many, dtype="bf16"))])
    g = build(128)
    from graphir import BufferType, DType, Graph, TensorType, ops

    types = [TensorType(DType.bfloat16, ["t", 32 * 128]),
             BufferType(DType.bfloat16, ["p", 2, 2, 128, 8, 128]),
             TensorType(DType.uint32, ["b + 1"]), TensorType(DType.uint32, ["b"]),
             TensorType(DType.uint32, ["b", "m"])]
    with Graph("decode", input_types=types) as g:
        g.output(ops.flash_attention_ragged(*g.inputs, n_heads=32, n_kv_heads=8, head_dim=128,
                                            layer_idx=0, mask_variant="causal"))
    _, _, program = executor(g, sel)
    mains = {k for k, s in program.kernels.items() if s.name.startswith("paged_decode_partial")}
    assert len(mains) == 6  # 4 for one token, 1 per taller tile
    text = "\n".join(tuning.format_section(tuning.manifest_section(sel)))
    assert "decode flash_attention_ragged" in text and "kernel limit" in text


# -- tune() with a fake timer ---------------------------------------------------------------
def fake_ms(conf, size):
    """Two heads per program win big batches, one head of 32-key blocks small ones, deeper
    pipelines break ties; the rest are equal."""
    units, kv = size
    ms = 1.0
    if conf["HEADS"] == 2 and units >= 64:
        ms -= 0.3 + 0.001 * conf["num_stages"]
    if conf["BLOCK_N"] == 32 and conf["HEADS"] == 1 and units < 64:
        ms -= 0.2 + 0.01 * conf["num_stages"]
    return ms


def test_tune_picks_per_bucket_and_the_plan_follows():
    g = build(16)
    sel = tuning.Selector([("default table", table({}))])
    with tuning.using(sel):
        lower(g)
    calls = []

    def measure(fam, facts, conf, size):
        calls.append((facts["q"], conf["name"], size))
        return {"ms": fake_ms(conf, size), "rel_err": 1e-6}

    sites = [s for s in sel.sites if s.family == "decode"]  # not the prefill fallback's
    t = tuning.tune(sites, measure, "Fake GPU")
    tuning.validate_table(t)
    shapes = t["families"]["decode"]["fp32"]
    assert sorted(shapes) == sorted(f"NH={NH},NKV={NKV},D=16,page=16,q={q},mask=CAUSAL"
                                    for q in (1, 4, 8))
    one = shapes[f"NH={NH},NKV={NKV},D=16,page=16,q=1,mask=CAUSAL"]
    facts = sites[0].facts
    for bucket, entry in one.items():
        size = pdt.TUNE_SIZE[bucket]
        cands = pdt.candidates(bucket, facts)
        assert len(entry["candidates"]) == len(cands)
        assert entry["config"] == min(cands, key=lambda c: fake_ms(c, size))["name"]
    assert {s for q, _, s in calls} == set(pdt.TUNE_SIZE.values())
    assert all(n in {c["name"] for c in pdt.candidates("", dict(facts, q=q))}
               for q, n, _ in calls if q > 1)
    # Lower again with the measured table: a small batch runs the 32-key one-head winner.
    tuned = tuning.Selector([("tuned", t)] + sel.tables)
    ex, dev, _ = executor(g, tuned)
    args = step(np.random.default_rng(3), 16, [1, 1], [30, 60])
    np.testing.assert_allclose(ex.execute(*[a.copy() for a in args])[0],
                               run(g, *[a.copy() for a in args])[0], rtol=1e-5, atol=1e-5)
    assert dev.configs == [one["u16_k2048"]["config"]] == ["n32gather_w4s8c4"]
    assert one["ularge"]["config"] == "n16tileh2_w4s8c4"
    text = "\n".join(tuning.format_section(tuning.manifest_section(
        tuned, requested=True, tuned=True, device="Fake GPU")))
    assert "tuned on Fake GPU" in text and "u16_k2048" in text and "ularge" in text


def test_decode_tables_are_checked():
    with pytest.raises(tuning.TuningError, match="unknown bucket"):
        tuning.validate_table(table({"u32_k2048": A}))
    with pytest.raises(tuning.TuningError, match="unknown decode config 'fast'"):
        tuning.validate_table(table({"ularge": "fast"}))
    with pytest.raises(tuning.TuningError, match="not canonical"):
        tuning.validate_table(table({"ularge": "n64tile_w4s3c3_p256"}))
    assert pdt.bucket_of(16, 2048) == "u16_k2048" and pdt.bucket_of(17, 2049) == "u64_klong"
    assert pdt.bucket_of(1025, 1) == "ularge"
    for b, top in pdt.BUCKETS:
        assert pdt.bucket_of(*pdt.tune_point(b)) == b  # each tuning point lies in its bucket


# -- the GPU measurer on a fake runtime -------------------------------------------------------
@pytest.mark.parametrize("dtype,conf,size", [
    ("fp32", "n16tile_w4s3c2", (4, 300)),         # split: partials + reduce
    ("fp32", "n8tileh2_w4s3c1", (140, 20)),       # 70 programs over 132 slots: one kernel
    ("bf16", "n32gather_w4s3c2_p32", (2, 100)),
    ("fp32", "n16tile_w4s3c2_m", (4, 300)),       # split, merged by the kernel: one kernel
])
def test_gpu_measurer_runs_the_decode_launches(monkeypatch, dtype, conf, size):
    from types import SimpleNamespace

    import graphir.runtime.cuda as rc
    from graphir.lowering.triton_gpu import tuning_gpu
    from tests.lowering.triton_gpu import test_tuning as tt

    monkeypatch.setattr(rc.driver, "device_properties",
                        lambda d=0: SimpleNamespace(name="Fake H200"))
    monkeypatch.setattr(rc, "Stream", lambda device=0: SimpleNamespace(synchronize=lambda: 0))
    for name, fake in (("DeviceBuffer", tt.FakeBuffer), ("Kernel", tt.FakeKernel),
                       ("Event", tt.FakeEvent), ("CudaGraph", tt.FakeGraph)):
        monkeypatch.setattr(rc, name, fake)
    monkeypatch.setattr(tuning_gpu, "compile_specs", lambda specs, arch, workers=None: {
        k: SimpleNamespace(cubin=s, launch_metadata=lambda: {}) for k, s in specs.items()})
    monkeypatch.setattr(tuning_gpu, "L2_ROTATE_BYTES", 1)  # one copy of the cache
    m = tuning_gpu.GpuMeasurer(SimpleNamespace(arch=90))
    fam = tuning.family("decode")
    facts = pdt.make_facts(dtype, 8, 2, 16, 16, 1, "CAUSAL")
    plan = fam.launches(cfg.get(conf), facts, size)
    tt.FakeKernel.launches = []
    r = m(fam, facts, cfg.get(conf), size)
    assert r["rel_err"] < (1e-5 if dtype == "fp32" else 1e-2) and 0 < r["ms"] < float("inf")
    # The reduce follows a split launch unless the config merges its own partials (repeated
    # runs reuse the scratch, so a merge's counters must come back to zero each time).
    reduce = plan["ints"]["num_parts"] > 1 and not cfg.get(conf)["MERGE"]
    assert len(tt.FakeKernel.launches) >= len(plan["ops"]) and \
        ("reduce" in tt.FakeKernel.launches[1]) == reduce
    monkeypatch.setattr(tt.FakeKernel, "launch", lambda self, grid, *a, stream=None: None)
    assert m(fam, facts, cfg.get(conf), size)["rel_err"] == float("inf")
