"""The prefill kernel as a tuner family, without a GPU: its candidates and names, the plan
variants a table produces (routed by batch x query tiles, run under the interpreter against
the numpy interpreter), `tune()` with a fake timing function, and the measurer's launch and
check run through Triton's interpreter on its own random problem."""

import re

import numpy as np
import pytest
import torch

from graphir import BufferType, DType, Graph, TensorType, ops
from graphir.lowering.triton_gpu import tuning
from graphir.lowering.triton_gpu.backend import lower
from graphir.lowering.triton_gpu.kernels import flash_attention_configs as fc
from graphir.lowering.triton_gpu.kernels import flash_attention_tuning as ft
from graphir.runtime.interpreter import run

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim")

FACTS = ft.make_facts("bf16", 32, 8, 128, 128, "CAUSAL")
BUCKETS = [b for b, _ in ft.BUCKETS]


def table(entries, dtype="bf16", key="D=128,mask=CAUSAL"):
    return {"version": 1, "families": {"prefill": {dtype: {key: entries}}}}


def test_candidates_names_and_eligibility():
    fam = tuning.family("prefill")
    cands = fam.candidates("large", FACTS)
    assert cands[0] == fam.default("large", FACTS) and cands[0]["name"] == "m128n64w8s3tmar128"
    assert len({c["name"] for c in cands}) == len(cands) >= 4
    for c in cands:
        assert fc.get(c["name"]) == c  # names round-trip
    # A page that cannot hold a 128-key block has no TMA at BLOCK_N 128.
    small_page = dict(FACTS, page=64)
    assert not fam.eligible(fc.get("m128n128w8s2tma"), small_page)
    assert fam.eligible(fc.get("m128n128w8s2"), small_page)
    assert fam.eligible(fc.get("m128n64w8s3tmar128"), small_page)
    assert fam.candidates("t8", ft.make_facts("fp32", 8, 8, 128, 128, "NULL"))[0]["name"] == \
        "m64n32w4s2"
    with pytest.raises(ValueError, match="not a flash attention config name"):
        fc.get("m128n128")
    with pytest.raises(ValueError, match="maxnreg must be None or an int"):
        fc.get("m128n64w8s3r300")


def test_table_lookup_by_head_dim_and_mask():
    shipped = table({"t8": "m64n64w4s3tma", "large": "m128n128w8s2tma"})
    tuning.validate_table(shipped)
    sel = tuning.Selector([("default table", shipped)])
    got = {c.bucket: (c.config["name"], c.source) for c in sel.choose("prefill", FACTS)}
    assert got == {"t8": ("m64n64w4s3tma", "default table"),
                   "t64": ("m128n64w8s3tmar128", "built-in"),
                   "large": ("m128n128w8s2tma", "default table")}
    other = {c.bucket: c.source for c in sel.choose("prefill", dict(FACTS, mask="NULL"))}
    assert set(other.values()) == {"built-in"}
    # A choice the page cannot run is skipped.
    paged = {c.bucket: c.config["name"] for c in sel.choose("prefill", dict(FACTS, page=32))}
    assert paged["t8"] == fc.config_tag(fc.default_config(128, 32))
    with pytest.raises(tuning.TuningError, match="unknown bucket"):
        tuning.validate_table(table({"t9": "m64n64w4s3tma"}))


def test_plan_variants_fold_equal_choices():
    class Ch:
        def __init__(self, bucket, name):
            self.bucket, self.config = bucket, {"name": name}

    same = ft.plan_variants([Ch("t8", "a"), Ch("t64", "a"), Ch("large", "a")], "b", "s")
    assert [c for c, _ in same] == [None]
    mixed = ft.plan_variants([Ch("t8", "a"), Ch("t64", "b"), Ch("large", "b")], "b", "s")
    assert [c for c, _ in mixed] == ["(b) * cdiv(s, 128) <= 8", None]
    three = ft.plan_variants([Ch("t8", "a"), Ch("t64", "b"), Ch("large", "a")], "b", "s")
    assert [(c, ch.config["name"]) for c, ch in three] == [
        ("(b) * cdiv(s, 128) <= 8", "a"), ("(b) * cdiv(s, 128) <= 64", "b"), (None, "a")]


NH, NKV, D, L, PAGE = 4, 2, 16, 2, 64


def attention_graph():
    F32, U32 = DType.float32, DType.uint32
    types = [TensorType(F32, ["t", NH * D]), BufferType(F32, ["p", 2, L, PAGE, NKV, D]),
             TensorType(U32, ["b + 1"]), TensorType(U32, ["b"]), TensorType(U32, ["b", "m"])]
    with Graph("prefill", input_types=types) as g:
        q, bl, o, c, lt = g.inputs
        g.output(ops.flash_attention_ragged(q, bl, o, c, lt, n_heads=NH, n_kv_heads=NKV,
                                            head_dim=D, layer_idx=1, mask_variant="causal"))
    return g


def test_tuned_plan_routes_by_query_tiles_under_the_interpreter():
    from graphir.runtime.cuda.executor import PlanExecutor
    from tests.lowering.triton_gpu.test_backend_interp import InterpDevice

    shipped = table({"t8": "m64n32w4s2tma", "t64": "m32n32w4s2"}, "fp32", f"D={D}")
    g = attention_graph()
    with tuning.using(tuning.Selector([("default table", shipped)])):
        program = lower(g)
    (step,) = [s for s in program.plan.steps if s.op == "flash_attention_ragged"]
    prefill = [v for v in step.attrs["variants"]
               if program.kernels[v["ops"][0]["launch"]].name.startswith("flash_attention")]
    m = re.fullmatch(r"\((.+)\) \* cdiv\((rt_seqmax_\w+), 128\) <= 8", prefill[0]["when"])
    assert m, prefill[0]["when"]
    assert [v["when"] for v in prefill[1:]] == [f"({m[1]}) * cdiv({m[2]}, 128) <= 64", None]
    dev = InterpDevice(program)
    ex = PlanExecutor(program.plan.to_json(), g, dev, {})
    rng = np.random.default_rng(7)
    seen = {}
    # batch x cdiv(seqmax, 128): 1x1, 2x3 (<= 8: t8); 3x3 (t64); 70x1 would be large.
    for new, cache in (([90], [10]), ([300, 5], [0, 40]), ([260, 17, 140], [3, 0, 0])):
        total = [c + n for c, n in zip(cache, new)]
        need = [-(-t // PAGE) for t in total]
        order = rng.permutation(sum(need) + 1)
        lut = np.full((len(new), max(need) + 1), order[-1], np.uint32)
        k = 0
        for b, n in enumerate(need):
            lut[b, :n] = order[k:k + n]
            k += n
        args = [rng.standard_normal((sum(new), NH * D)).astype(np.float32),
                rng.standard_normal((sum(need) + 1, 2, L, PAGE, NKV, D)).astype(np.float32),
                np.concatenate([[0], np.cumsum(new)]).astype(np.uint32),
                np.asarray(cache, np.uint32), lut]
        want = run(g, *[a.copy() for a in args])[0]
        dev.launched.clear()
        got = ex.execute(*[a.copy() for a in args])[0]
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
        seen[len(new)] = list(dev.launched)
    assert seen[1] == seen[2] == ["flash_attention_fp32_mask1_m64n32w4s2tma"]
    assert seen[3] == ["flash_attention_fp32_mask1_m32n32w4s2"]


class FakeMeasure:
    """Times from a formula: BLOCK_N 128 fastest on large problems, BLOCK_M 64 on small, the
    warp-specialized kernel in the longest-first order a little faster than its tiles'."""

    def __init__(self, fail=()):
        self.fail, self.calls = set(fail), []

    def __call__(self, fam, facts, cfg, size):
        self.calls.append((cfg["name"], size))
        if cfg["name"] in self.fail:
            raise RuntimeError("out of resources")
        small = size[0] * size[1] <= 2048
        ms = 1.0 - (0.1 if (cfg["BLOCK_M"] == 64) == small else 0) \
            - (0.05 if cfg["BLOCK_N"] == 128 else 0) - (0.01 if cfg["USE_TMA"] else 0) \
            - (0.02 if cfg.get("WS") else 0) - (0.005 if cfg.get("LPT") else 0)
        return {"ms": ms, "rel_err": 4e-3}


def test_tune_times_every_bucket_and_the_plan_takes_the_winners():
    sel = tuning.Selector([("default table", {"version": 1, "families": {}})])
    with tuning.using(sel):
        lower(attention_graph_bf16())
    (site,) = [s for s in sel.sites if s.family == "prefill"]
    assert site.facts == ft.make_facts("bf16", 8, 2, 128, 128, "CAUSAL")
    m = FakeMeasure(fail={"m64n64w4s3"})
    t = tuning.tune([site], m, "Fake GPU")
    tuning.validate_table(t)
    entry = t["families"]["prefill"]["bf16"][ft.shape_key(site.facts)]
    assert sorted(entry) == sorted(BUCKETS)
    assert {s for _, s in m.calls} == set(ft.TUNE_SIZE.values())
    assert entry["t8"]["config"] == "m64n64w4s3tma"
    assert entry["large"]["config"] == "m128n128w4s2tmawslpt"
    # A WS winner records the fastest passing Triton config, which soft-capped calls run.
    triton_rows = [r for r in entry["large"]["candidates"]
                   if "error" not in r and not fc.is_ws(fc.get(r["config"]))]
    assert entry["large"]["fallback"] == min(triton_rows, key=lambda r: r["ms"])["config"]
    assert entry["t8"]["fallback"] is None   # a Triton winner needs none
    assert any("out of resources" in c.get("error", "") for c in entry["t8"]["candidates"])
    with tuning.using(tuning.Selector([("tuned", t)])):
        program = lower(attention_graph_bf16())
    names = {s.name for s in program.kernels.values() if s.name.startswith("flash")}
    assert names == {"flash_attention_bf16_mask1_m64n64w4s3tma",
                     "flash_attention_bf16_mask1_m128n128w4s2tmawslpt"}


def attention_graph_bf16():
    B16, U32 = DType.bfloat16, DType.uint32
    types = [TensorType(B16, ["t", 8 * 128]), BufferType(B16, ["p", 2, 1, 128, 2, 128]),
             TensorType(U32, ["b + 1"]), TensorType(U32, ["b"]), TensorType(U32, ["b", "m"])]
    with Graph("prefill16", input_types=types) as g:
        q, bl, o, c, lt = g.inputs
        g.output(ops.flash_attention_ragged(q, bl, o, c, lt, n_heads=8, n_kv_heads=2,
                                            head_dim=128, layer_idx=0, mask_variant="causal"))
    return g


@pytest.mark.parametrize("mask,window", [("CAUSAL", 1), ("SLIDING_WINDOW_CAUSAL", 37)])
def test_measurer_launch_and_check_on_the_interpreter(mask, window):
    # What GpuMeasurer does with the family's launches and bench, through Triton's interpreter
    # on a small problem: the check accepts the kernel's output and rejects wrong or NaN ones.
    facts = ft.make_facts("bf16", 4, 2, 16, 16, mask, window)
    size = (2, 150)
    conf = fc.get("m32n32w4s2")
    plan = ft.tuning_launches(conf, facts, size)
    case = ft.bench(facts, size, seed=3)
    host = {n: s["make"]() for n, s in case["inputs"].items()}
    dev = {n: (torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
               if a.dtype == np.uint16 else torch.from_numpy(a)) for n, a in host.items()}
    (shape, _), = [(o["shape"], o["dtype"]) for o in case["outputs"].values()]
    out = torch.full(shape, float("nan"), dtype=torch.bfloat16)
    vals = dict(dev, out=out, **case["ints"])
    ((i, grid, args),) = plan["ops"]
    spec = plan["specs"][i]
    spec.fn[grid](*[vals[a] for a in args], **spec.constexprs, num_warps=spec.num_warps,
                  num_stages=spec.num_stages)
    raw = out.view(torch.int16).numpy().view(np.uint16)
    err = case["check"]({"out": raw}, host)
    assert err < 1e-2
    assert case["check"]({"out": raw[::-1].copy()}, host) > 0.3  # rows swapped
    nan = raw.copy()
    nan[0, 0] = 0x7FC0
    assert case["check"]({"out": nan}, host) == float("inf")


@pytest.mark.parametrize("name", ["m128n128w4s2tmawspersist", "m128n128w4s2tmawspersistdyn"])
def test_measurer_launch_of_a_persistent_config_on_the_interpreter(name):
    # A persistent config's tuning launch: one program per SM at most, the query tiles and
    # sequences as two more ints (the plan's own ints), run here by its Triton twin; a DYN
    # config also takes its tile counter, zeroed scratch.
    facts = ft.make_facts("bf16", 4, 2, 64, 128, "CAUSAL")
    size = (3, 150)   # 2 query tiles x 4 heads x 3 sequences
    plan = ft.tuning_launches(fc.get(name), facts, size)
    case = ft.bench(facts, size, seed=5)
    ((i, grid, args),) = plan["ops"]
    dyn = name.endswith("dyn")
    assert grid == (24, 1, 1) and args[13:] == ["n_m", "n_b"] + ["tile_counter"] * dyn
    assert plan["scratch"] == [("tile_counter", "int32", 2)] * dyn
    assert plan["ints"] == {"n_m": 2, "n_b": 3}
    host = {n: s["make"]() for n, s in case["inputs"].items()}
    dev = {n: (torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
               if a.dtype == np.uint16 else torch.from_numpy(a)) for n, a in host.items()}
    (shape, _), = [(o["shape"], o["dtype"]) for o in case["outputs"].values()]
    out = torch.full(shape, float("nan"), dtype=torch.bfloat16)
    counter = torch.zeros(2, dtype=torch.int32)
    vals = dict(dev, out=out, tile_counter=counter, **case["ints"], **plan["ints"])
    twin = plan["specs"][i].interpretable()
    twin.fn[(5, 1, 1)](*[vals[a] for a in args], **twin.constexprs)   # 5 programs: many tiles
    assert counter.tolist() == [0, 0]
    raw = out.view(torch.int16).numpy().view(np.uint16)
    assert case["check"]({"out": raw}, host) < 1e-2


@pytest.mark.parametrize("name", ["m128n128w4s3tmawspersist", "m128n128w4s3tmawspersistdyn"])
def test_a_persistent_choice_runs_through_the_plan_under_the_interpreter(name):
    # (DYN: its tile counter is the plan's scratch, zeroed when allocated (the device here
    # fills new memory with 0xAB) and left zero by each launch: two calls, both right.)
    from graphir.runtime.cuda.executor import PlanExecutor
    from tests.lowering.triton_gpu.test_backend_interp import InterpDevice

    g = attention_graph_bf16()
    with tuning.using(tuning.Selector([("default table", table(
            {b: name for b in BUCKETS}))])):
        program = lower(g)
    dev = InterpDevice(program)
    grids = []
    launch = dev.launch
    dev.launch = lambda key, grid, args: (grids.append(tuple(grid)), launch(key, grid, args))
    ex = PlanExecutor(program.plan.to_json(), g, dev, {})
    rng = np.random.default_rng(11)
    new, cache = [200, 0, 57], [40, 9, 130]
    total = [c + n for c, n in zip(cache, new)]
    need = [-(-t // 128) for t in total]
    order = rng.permutation(sum(need) + 1)
    lut = np.full((3, max(need) + 1), order[-1], np.uint32)
    k = 0
    for b, n in enumerate(need):
        lut[b, :n] = order[k:k + n]
        k += n
    bf = lambda x: torch.from_numpy(x).to(torch.bfloat16).float().numpy()  # noqa: E731
    args = [bf(rng.standard_normal((sum(new), 8 * 128))),
            bf(rng.standard_normal((sum(need) + 1, 2, 1, 128, 2, 128))),
            np.concatenate([[0], np.cumsum(new)]).astype(np.uint32),
            np.asarray(cache, np.uint32), lut]
    want = run(g, *[a.copy() for a in args])[0]
    got = ex.execute(*[a.copy() for a in args])[0]
    assert dev.launched == [f"flash_attention_bf16_mask1_{name}"]
    assert grids == [(2 * 8 * 3, 1, 1)]   # 2 query tiles of the longest x 8 heads x 3 sequences
    again = ex.execute(*[a.copy() for a in args])[0]
    counters = [b for k, b in ex._pool.items() if k[1][-1:] == ("tile_counter",)]
    assert [c[:8].view(torch.int32).tolist() for c in counters] == [[0, 0]] * name.endswith("dyn")
    # The cuda loader's check of the launch data accepts the plan (the counter is scratch its
    # variant allocates; the kernel's parameter list, sched_ptr included, matches the launch).
    from graphir.runtime.cuda.launch_check import check_launch_data
    kernels = {k: {"name": sp.name, "params": [t for _, t in sp.runtime_params()]}
               for k, sp in program.kernels.items()}
    check_launch_data({"kernels": kernels, "plan": program.plan.to_json()}, g)
    # Past 2**31 tiles x heads (the persistent kernels' int32 tile numbers) the plan takes the
    # one-tile form of the same config.
    (step,) = [s for s in program.plan.steps if s.op == "flash_attention_ragged"]
    prefill = [v for v in step.attrs["variants"]
               if program.kernels[v["ops"][0]["launch"]].name.startswith("flash_attention")]
    assert prefill[-2]["when"].endswith(f"* 8 * (b) < {2 ** 31}"), prefill[-2]["when"]
    assert prefill[-1]["when"] is None
    last = program.kernels[prefill[-1]["ops"][0]["launch"]]
    assert last.name == "flash_attention_bf16_mask1_m128n128w4s3tmaws"
    from graphir.runtime.cuda.plan_values import evaluate
    guard = prefill[-2]["when"]
    seqmax = re.search(r"cdiv\((rt_seqmax_\w+), 128\)", guard)[1]
    assert evaluate(guard, {seqmax: 200, "b": 3})
    assert not evaluate(guard, {seqmax: 128 * 4096, "b": 65536})
    want = np.asarray(want, np.float64)
    for out in (got, again):
        err = np.linalg.norm(np.asarray(out, np.float64) - want) / np.linalg.norm(want)
        assert err < 1e-2, err


def test_untuned_compiles_take_the_measured_prefill_table():
    t = tuning.load_table()
    assert "H100 80GB HBM3 sweep run 10, 2026-12-05" in t["provenance"]["prefill"]
    shipped = t["families"]["prefill"]["bf16"]
    # One entry from a later sweep of a few forms (the chained consumers at head dim 64).
    assert "D=64,mask=CAUSAL: NVIDIA H100 80GB HBM3 sweep run 13" in t["provenance"]["prefill"]
    assert "sweep run 13" in shipped["D=64,mask=CAUSAL"]["large"]["note"]
    assert fc.get(shipped["D=64,mask=CAUSAL"]["large"]["config"]).get("CHAIN") == 1
    for key in ("D=128,mask=CAUSAL", "D=128,mask=NULL", "D=128,mask=SLIDING_WINDOW_CAUSAL",
                "D=64,mask=CAUSAL", "D=64,mask=NULL"):
        for choice in shipped[key].values():
            # The shipped choice is the fastest measured candidate that passed its check.
            rows = choice["candidates"]
            assert rows and all(r["rel_err"] < 2e-2 and r["tflops"] > 0 for r in rows)
            assert choice["config"] == min(rows, key=lambda r: r["ms"])["config"]
    got = {c.bucket: c.config["name"] for c in tuning.select("prefill", FACTS)}
    want = {b: shipped["D=128,mask=CAUSAL"][b]["config"] for b in BUCKETS}
    assert got == want
    # A page that cannot hold a 64-key block skips TMA entries: a gather config instead.
    small = {c.config["name"] for c in tuning.select("prefill", dict(FACTS, page=16))}
    assert not any("tma" in n for n in small)


def test_tune_never_picks_a_candidate_that_fails_its_check():
    # Fast but wrong (rel err 0.28 as the GPU measured the removed loop, or inf for NaN or
    # non-finite output): recorded, never the winner.
    class Wrong(FakeMeasure):
        def __call__(self, fam, facts, cfg, size):
            r = super().__call__(fam, facts, cfg, size)
            if cfg["name"] == "m128n128w8s2tma":
                return {"ms": 0.01, "rel_err": 0.278}
            if cfg["name"] == "m64n64w4s3tma":
                return {"ms": float("inf"), "rel_err": float("inf")}
            return r

    sel = tuning.Selector([("default table", {"version": 1, "families": {}})])
    with tuning.using(sel):
        lower(attention_graph_bf16())
    (site,) = [s for s in sel.sites if s.family == "prefill"]
    t = tuning.tune([site], Wrong(), "Fake GPU")
    for bucket, entry in t["families"]["prefill"]["bf16"][ft.shape_key(site.facts)].items():
        assert entry["config"] not in ("m128n128w8s2tma", "m64n64w4s3tma"), bucket
        bad = {r["config"]: r for r in entry["candidates"]
               if r["config"] in ("m128n128w8s2tma", "m64n64w4s3tma")}
        assert all("error" in r for r in bad.values()) and len(bad) == 2
