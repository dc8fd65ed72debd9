"""Every prefill attention config compiles offline (no GPU) to an sm_90 cubin: it fits Hopper's
shared memory, uses wgmma, takes the K/V load path it names (TMA bulk copies from a device-made
descriptor, or cp.async), honours its register cap, keeps the mask-free loop free of spill
traffic (uncapped configs do not spill at all), and has no wgmma whose register operand A is
overwritten while the wgmma is in flight (the hardware bug of the removed overlapped loop:
passes the interpreter, wrong on the GPU). Run with -s to see the register / spill table."""

import pytest

from tests.lowering.triton_gpu.test_aot_cubin import PARALLEL, run_compiled_mode

SCRIPT = PARALLEL + r"""
import json, os, re, subprocess, tempfile
import triton
from graphir.lowering.triton_gpu import aot
from graphir.lowering.triton_gpu.kernels import flash_attention as fa
from graphir.lowering.triton_gpu.kernels import flash_attention_configs as fc

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")

def cuobjdump(cubin, *flags):
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        return subprocess.run([BIN, *flags, f.name], capture_output=True, text=True,
                              timeout=120).stdout
    finally:
        os.unlink(f.name)

# parse: [(address, instruction without its predicate)]; half_swaps: registers whose 16-bit
# halves are swapped in place (what a bf16 P operand carried across a loop join as fp32 costs).
from graphir.tools.sass_loops import half_swaps, parse

def written(ins):
    # The registers an instruction writes: its first operand when that is a register.
    op, _, rest = ins.partition(" ")
    m = re.match(r"R(\d+)\b", rest.strip())
    if not m or op.startswith(("ST", "RED", "BAR", "BRA", "WARPGROUP")):
        return set()
    n = 4 if ".128" in op else 2 if (".64" in op or ".WIDE" in op) else 1
    if op.startswith("HGMMA"):
        n = int(re.match(r"HGMMA\.64x(\d+)", op).group(1)) // 2
    return set(range(int(m.group(1)), int(m.group(1)) + n))

def a_register_hazards(code):
    # An HGMMA reading A from registers (R_a..R_a+3) reads them until the next
    # WARPGROUP.DEPBAR; any write to them before that (following a loop's back edge once)
    # feeds the tensor cores whatever was written.
    at = {a: i for i, (a, _) in enumerate(code)}
    found = []
    for i, (addr, ins) in enumerate(code):
        m = re.match(r"HGMMA\.\S+ R\d+, R(\d+),", ins)
        if not m:
            continue
        regs = set(range(int(m.group(1)), int(m.group(1)) + 4))
        j, steps, seen = i + 1, 0, set()
        while j < len(code) and steps < 20000:
            a, ins2 = code[j]
            if ins2.startswith("WARPGROUP.DEPBAR"):
                break
            if written(ins2) & regs:
                found.append(f"{addr:#x} {ins} / {a:#x} {ins2}")
                break
            b = re.match(r"BRA (0x[0-9a-f]+)", ins2)
            t = int(b.group(1), 16) if b else None
            if t is not None and t < a and t not in seen and t in at:
                seen.add(t)
                j = at[t]
            else:
                j += 1
            steps += 1
    return found

def main_loop_spills(code):
    # Local loads/stores inside the first loop (backward branch) whose body issues a wgmma
    # (or an mma: tf32 without wgmma): the mask-free loop.
    idx = [i for i, (a, ins) in enumerate(code)
           if (b := re.match(r"BRA (0x[0-9a-f]+)", ins)) and int(b.group(1), 16) < a]
    for i in idx:
        lo = int(re.match(r"BRA (0x[0-9a-f]+)", code[i][1]).group(1), 16)
        body = [ins for a, ins in code[:i + 1] if a >= lo]
        if any(ins.startswith(("HGMMA", "HMMA")) for ins in body):
            # A reload feeding an mbarrier's try-wait is in the wait's retry stub (ptxas puts
            # those out of line, after the loop): it runs only while the warp waits anyway.
            return sum(ins.startswith(("LDL", "STL")) and not nxt.startswith("SYNCS.PHASECHK")
                       for ins, nxt in zip(body, body[1:] + [""]))
    return None

# By default the configs the shipped table takes (under the masks it takes them for, the
# warp-specialized and chained ones under the sliding window too: both key bounds, the most
# masking code), each head dim's default and the special jobs below; with -m slow (ALL_MASKS)
# every candidate under every mask. The others run only where `compile --tune` times them on
# a GPU, which checks each against torch first.
MASKS = ("CAUSAL", "NULL", "SLIDING_WINDOW_CAUSAL")
from graphir.lowering.triton_gpu import tuning
shipped = set()
for entries in tuning.load_table()["families"]["prefill"].values():
    for key, buckets in entries.items():
        kv = dict(part.split("=", 1) for part in key.split(",") if "=" in part)
        for v in buckets.values():
            for name in tuning.choice_names(v):
                shipped.add((int(kv.get("D", 0)), kv.get("mask"), name))

shipped_tags = {(d, name) for d, _, name in shipped}

def masks_for(d, c):
    if ALL_MASKS:
        return MASKS
    if (d, fa.config_tag(c)) not in shipped_tags:
        return ()
    return tuple(m for m in MASKS if m == "SLIDING_WINDOW_CAUSAL"
                 or (d, m, fa.config_tag(c)) in shipped)

def taken(d, c):
    return (ALL_MASKS or (d, fa.config_tag(c)) in shipped_tags
            or c == fa.default_config(d, 128, "CAUSAL", "bfloat16"))

# (label, (n_heads, n_kv_heads, head_dim, page, dtype, mask), config or None for the default)
jobs = [(f"d{d}_{fa.config_tag(c)}", (32, 8, d, 128, "bfloat16", "CAUSAL"), c)
        for d in (64, 128, 256) for c in fa.candidates(d, 128) if taken(d, c)]
jobs += [(f"d{d}_{fa.config_tag(c)}_mask{m}", (32, 8, d, 128, "bfloat16", m), c)
         for d in (64, 128) for c in fa.WS_CANDIDATES[d] for m in masks_for(d, c)]
# The chained consumers not offered to the tuner (flash_attention_chain.py; the sweep's).
jobs += [(f"d{d}_{fa.config_tag(c)}_mask{m}", (32, 8, d, 128, "bfloat16", m), c)
         for d in (64, 128) for c in fc.CHAIN_CONFIGS[d] for m in masks_for(d, c)]
jobs += [(f"fp32_{fa.config_tag(c)}", (8, 8, 128, 128, "float32", "CAUSAL"), c)
         for c in fa.candidates(128, 128, "float32")]
jobs += [("default_d128_p16", (32, 8, 128, 16, "bfloat16", "CAUSAL"), None),
         ("default_d128_swc", (32, 8, 128, 128, "bfloat16", "SLIDING_WINDOW_CAUSAL"), None),
         ("default_d128_null", (32, 8, 128, 128, "bfloat16", "NULL"), None),
         ("default_d64_null", (16, 4, 64, 64, "float16", "NULL"), None),
         ("default_d64_chunked", (32, 8, 64, 128, "bfloat16", "CHUNKED_CAUSAL"), None),
         ("default_d128_fp32_chunked", (8, 8, 128, 128, "float32", "CHUNKED_CAUSAL"), None),
         ("tma_small_rows", (4, 1, 32, 128, "bfloat16", "CAUSAL"),
          dict(fa.CANDIDATES[64][0]))]
# The warp-specialized kernel with its consumers taking turns (not a config yet: the sweep's).
jobs += [("d128_m128n128w4s2tmaws_pingpong", (32, 8, 128, 128, "bfloat16", "CAUSAL"),
          dict(fa.WS_CANDIDATES[128][0], PINGPONG=1))]
# The deeper consumer pipeline (flash_attention_deep.py) in two stages too (not a candidate;
# the three-stage one is, compiled above for every mask).
jobs += [("d64_m128n128w4s2tmawspersistdeep", (32, 8, 64, 128, "bfloat16", "NULL"),
          fc.get("m128n128w4s2tmawspersistdeep"))]
# The plain persistent warp-specialized kernel under the sliding window (its arguments are
# checked below; the shipped table takes its DYN forms).
if not ALL_MASKS:
    jobs += [("d128_m128n128w4s3tmawspersist_maskSLIDING_WINDOW_CAUSAL",
              (32, 8, 128, 128, "bfloat16", "SLIDING_WINDOW_CAUSAL"),
              fc.get("m128n128w4s3tmawspersist"))]
# The Triton kernel's persistent form (the Gluon persistent configs' twin, a config itself).
jobs += [("d128_m128n128w8s2tmapersist", (32, 8, 128, 128, "bfloat16", "CAUSAL"),
          dict(fa.CANDIDATES[128][1], PERSISTENT=1))]


def spec_of(shape, conf):
    return fa.aot_specs(*shape, config=conf)[0]


precompile([spec_of(shape, conf) for _, shape, conf in jobs])
out = {}
have_bin = os.path.exists(BIN)
for label, shape, conf in jobs:
    spec = spec_of(shape, conf)
    c = aot.compile_spec(spec)
    res = code = None
    if have_bin:
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)",
                      cuobjdump(c.cubin, "-res-usage"))
        res = [int(x) for x in m.groups()]
        code = parse(cuobjdump(c.cubin, "-sass"))
    cx = dict(spec.constexprs)
    n_heads, n_kv, d, page, dtype, mask = shape
    out[label] = dict(config=spec.extra["config"], consts=cx, shared=c.shared,
                      default=spec.extra["config"] == fa.default_config(d, page, mask, dtype),
                      magic=c.cubin[:4].hex(), res=res, gscratch=c.global_scratch_size,
                      bulk=c.ptx.count("cp.async.bulk.tensor"),
                      cp_async=c.ptx.count("cp.async.cg") + c.ptx.count("cp.async.ca"),
                      wgmma=c.ptx.count("wgmma.mma_async"), name=spec.name,
                      params=[p for p, _ in c.params], meta=c.launch_metadata(),
                      maxnreg_ptx=re.findall(r"\.maxnreg\s+(\d+)", c.ptx),
                      hazards=a_register_hazards(code) if code else None,
                      hgmma=[sum(ins.startswith("HGMMA") for _, ins in code),
                             sum(ins.startswith("HGMMA") and ins.endswith("gsb0")
                                 for _, ins in code)] if code else None,
                      loop_spills=main_loop_spills(code) if code else None,
                      half_swaps=half_swaps(code) if code else None)
print("JSON" + json.dumps(out))
"""


@pytest.fixture(scope="module", params=[False, pytest.param(True, marks=pytest.mark.slow)],
                ids=["shipped_masks", "all_masks"])
def compiled(request, tmp_path_factory):
    return run_compiled_mode(f"ALL_MASKS = {request.param}\n" + SCRIPT, tmp_path_factory,
                             timeout=1800)


def test_every_config_builds_fits_and_takes_its_load_path(compiled, capsys):
    rows = []
    for label, info in compiled.items():
        assert info["magic"] == "7f454c46", label
        assert 0 < info["shared"] <= 227 * 1024, label
        # The Gluon kernel has no USE_TMA constexpr: it always reads K/V through TMA.
        tma = info["consts"].get("USE_TMA", info["config"]["USE_TMA"])
        if tma:
            # One 128-byte descriptor per program in Triton's global scratch, filled by TMA
            # (the persistent Gluon kernels' output too, and with QTMA the query rows').
            persistent_ws = info["config"].get("PERSISTENT") and info["config"].get("WS")
            descriptors = 1 + bool(persistent_ws) + bool(info["config"].get("QTMA"))
            assert info["bulk"] > 0 and info["gscratch"] == 128 * descriptors, label
        else:
            assert info["bulk"] == 0 and info["gscratch"] == 0 and info["cp_async"] > 0, label
        if "fp32" not in label:
            assert info["wgmma"] > 0, label
        regs, stack, local = info["res"] or (0, 0, 0)
        assert local == 0, f"{label} uses local memory: {info['res']}"
        # A register cap may park a few loop-invariant scalars on the stack (the head dim 128
        # default, as measured on the H200: 12-24 bytes, reloaded after the loops and once per
        # edge block); without a cap nothing spills. A default touches no spill in the
        # mask-free loop (a capped candidate may reload one scalar there: the tuner times it).
        # The warp-specialized kernels run their partitions under setmaxnreg caps (the loader
        # at 24): the persistent form parks one kernel argument before the fork and reloads it
        # once per partition (sliding window, two stages: 8 bytes), never inside a loop.
        # The chained consumers (CHAIN) carry two tiles' facts through the step between
        # tiles: at head dim 128 under a sliding window ptxas parks a few of those scalars
        # there (80 bytes since their output leaves through the query slots), once a tile,
        # never in the key loop (checked below).
        capped = info["config"].get("maxnreg") or info["config"].get("WS")
        limit = (96 if info["config"].get("CHAIN") else 32) if capped else 0
        assert stack <= limit, f"{label} spills: {info['res']}"
        if info["res"] and (info["default"] or stack == 0 or info["config"].get("WS")):
            # The deeper consumers (DEEP, head dim 64, a tuner candidate, not a shipped
            # choice) under a sliding window: ptxas parks the shared-memory base in the one
            # stack slot and reloads it (an L1 hit) a few times in the region this
            # check takes for the loop (every backward branch of that kernel is a barrier
            # wait's out-of-line retry, so the region is most of a consumer).
            parked = 4 if info["config"].get("DEEP") and "SLIDING" in label else 0
            assert info["loop_spills"] <= parked, (label, info["loop_spills"])
        rows.append(f"{label:30s} regs={regs:<4d} stack={stack:<4d} shared={info['shared']:<7d} "
                    f"tma={tma} default={info['default']} loop_spills={info['loop_spills']}")
    with capsys.disabled():
        print("\n" + "\n".join(rows))


def test_register_caps_reach_ptxas_and_the_manifest(compiled):
    capped = {k: v for k, v in compiled.items() if v["config"].get("maxnreg")}
    assert capped, "some candidates cap registers"
    for label, info in capped.items():
        cap = info["config"]["maxnreg"]
        assert info["maxnreg_ptx"] == [str(cap)], label
        assert info["meta"]["maxnreg"] == cap, label  # the kernel table's entry
        if info["res"]:
            assert info["res"][0] <= cap, label
    for label, info in compiled.items():
        if info["config"].get("WS"):
            # Warp specialization: 12 warps share the 64K registers at launch (168 each), then
            # setmaxnreg moves them to the consumer warpgroups; no cap from the config.
            assert info["maxnreg_ptx"] == ["168"] and info["meta"]["maxnreg"] is None, label
        elif not info["config"].get("maxnreg"):
            assert info["maxnreg_ptx"] == [] and info["meta"]["maxnreg"] is None, label
    # Head dim 64 keeps two 8-warp CTAs per SM: at most 128 registers a thread.
    assert compiled["d64_m128n64w8s3tmar128"]["config"] == compiled["default_d64_chunked"][
        "config"]


def test_no_wgmma_reads_registers_rewritten_while_it_runs(compiled):
    # P V reads P from registers; those registers must not be written before the wgmma wait
    # (the removed overlapped loop failed exactly this on the GPU, rel err 0.3 to inf).
    checked = 0
    for label, info in compiled.items():
        if info["hazards"] is None:
            continue
        assert info["hazards"] == [], (label, info["hazards"][:3])
        checked += 1
    assert checked == 0 or checked == len(compiled)


def test_the_hazard_check_sees_an_in_flight_register_operand_overwritten():
    # The pattern found in the round-2 binary, reduced: HGMMA reading R120..R123, then an
    # IMAD writing R120 before any WARPGROUP.DEPBAR; and the safe order.
    ns = {}
    exec(SCRIPT[:SCRIPT.index("# (label, (n_heads")], ns)
    bad = """
        /*3b00*/                   HGMMA.64x128x16.F32.BF16 R24, R120, gdesc[UR8].tnspB, R24, gsb0 ;
        /*3b30*/                   IMAD.IADD R120, R192, 0x1, R19 ;
        /*3b40*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
    """
    good = """
        /*3b00*/                   HGMMA.64x128x16.F32.BF16 R24, R120, gdesc[UR8].tnspB, R24, gsb0 ;
        /*3b30*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*3b40*/                   IMAD.IADD R120, R192, 0x1, R19 ;
    """
    assert len(ns["a_register_hazards"](ns["parse"](bad))) == 1
    assert ns["a_register_hazards"](ns["parse"](good)) == []
    loop = """
        /*1000*/                   HGMMA.64x128x16.F32.BF16 R24, R120, gdesc[UR8].tnspB, R24, gsb0 ;
        /*1010*/                   FADD R5, R5, R6 ;
        /*1020*/               @P0 BRA 0x0f00 ;
        /*1030*/                   EXIT ;
    """
    head = """
        /*0f00*/                   F2FP.BF16.F32.PACK_AB R121, R7, R8 ;
        /*0f10*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
    """
    # Around the loop's back edge: the header rewrites R121 before the wait.
    assert len(ns["a_register_hazards"](ns["parse"](head + loop))) == 1


def test_defaults_and_fallbacks(compiled):
    # Pages smaller than the key block gather rows; rows under 128 bytes (NKV * D * 2) could make
    # a large cache overflow TMA's 32-bit coordinates, so a TMA config falls back there.
    assert compiled["default_d128_p16"]["consts"]["USE_TMA"] == 0
    assert compiled["default_d128_swc"]["consts"]["USE_TMA"] == 1
    assert compiled["tma_small_rows"]["config"]["USE_TMA"] == 1
    assert compiled["tma_small_rows"]["consts"]["USE_TMA"] == 0
    assert compiled["default_d128_fp32_chunked"]["consts"]["BLOCK_M"] == 64
    # Launch parameters: the runtime arguments, then Triton's two scratch pointers.
    assert compiled["default_d128_swc"]["params"] == [
        "q_ptr", "offs_ptr", "cache_len_ptr", "lut_ptr", "blocks_ptr", "out_ptr", "max_pages",
        "layer_idx", "num_layers", "num_pages", "window", "scale", "T", "global_scratch",
        "profile_scratch"]
    assert compiled["default_d128_swc"]["name"] == "flash_attention_bf16_mask2"
    # The persistent kernels take the one-tile kernel's arguments, then n_m and n_b.
    for label in ("d128_m128n128w4s3tmawspersist_maskSLIDING_WINDOW_CAUSAL",
                  "d128_m128n128w8s2tmapersist"):
        assert compiled[label]["params"][:15] == compiled["default_d128_swc"]["params"][:13] + [
            "n_m", "n_b"], label


def test_every_candidate_is_compiled():
    from graphir.lowering.triton_gpu.kernels import flash_attention as fa

    assert len(fa.candidates(128, 128)) >= 4 and len(fa.candidates(64, 128)) >= 4
    assert any(c["USE_TMA"] for c in fa.candidates(128, 128))
    assert any(not c["USE_TMA"] for c in fa.candidates(128, 128))


def test_no_kernel_has_its_wgmma_serialized(compiled):
    # ptxas serializes every wgmma of a kernel in which anything reads an accumulator while
    # its wgmma is in flight (warning C7514), or for want of registers (C7512): each HGMMA
    # then closes its own group (gsb0) and is waited for at once. Unserialized, a group is a
    # chain of k-steps and only its last HGMMA carries gsb0. The deep pipeline's loop is
    # unrolled by two for exactly this.
    ws_checked = 0
    for label, info in compiled.items():
        if not info["hgmma"] or not info["hgmma"][0]:
            continue
        total, closing = info["hgmma"]
        if info["config"].get("maxnreg") == 128 and info["consts"]["D"] == 128:
            # The Triton kernel under a cap of 128 registers at head dim 128 is serialized
            # for want of registers (C7512); measured the fastest Triton form all the same
            # (flash_attention_configs.py: two CTAs an SM), and the tuner times it.
            assert closing == total, (label, info["hgmma"])
        else:
            assert closing * 2 <= total, (label, info["hgmma"])
            ws_checked += bool(info["config"].get("WS"))
    # cuobjdump present: at least the shipped warp-specialized kernels (18 when written)
    assert ws_checked == 0 or ws_checked >= 12


def test_no_warp_specialized_kernel_swaps_register_halves(compiled):
    # Every product's P operand is packed once, straight into the registers the P V wgmma
    # reads; in-place half swaps in a WS kernel mean P crossed a loop join unpacked.
    checked = [label for label, info in compiled.items()
               if info["half_swaps"] is not None and info["config"].get("WS")]
    swapped = [f"{k}: {compiled[k]['half_swaps']}" for k in checked if compiled[k]["half_swaps"]]
    assert not swapped, "\n".join(swapped)
    assert checked == [] or len(checked) >= 12


def test_the_half_swap_check_sees_swapped_halves():
    ns = {}
    exec(SCRIPT[:SCRIPT.index("# (label, (n_heads")], ns)
    # The chained consumer's key loop before its fix, reduced: P's halves swapped back before
    # the P V wgmma (and again after the next P is packed); a plain pack or a move is not one.
    sass = """
        /*48c0*/                   PRMT R152, R152, 0x5432, R152 ;
        /*48d0*/                   PRMT R153, R153, 0x5432, R153 ;
        /*4ce0*/                   HGMMA.64x128x16.F32.BF16 R88, R152, gdesc[UR12].tnspB, R88 ;
        /*7a50*/                   PRMT R154, R12, 0x5432, R12 ;
        /*7a60*/                   PRMT R16, R12, 0x7632, R16 ;
        /*7a70*/                   F2FP.BF16.F32.PACK_AB R152, R25, R24 ;
    """
    assert ns["half_swaps"](ns["parse"](sass)) == 2


def test_the_serialization_check_sees_a_serialized_kernel():
    # What the deep loop compiled to with one loop-carried name (a copy of the tile in
    # flight at the back edge), reduced: every k-step closes a group.
    ns = {}
    exec(SCRIPT[:SCRIPT.index("# (label, (n_heads")], ns)
    serial = """
        /*5400*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR20], RZ, !UPT, gsb0 ;
        /*54a0*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*54b0*/                   WARPGROUP.ARRIVE ;
        /*54c0*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR28], R24, gsb0 ;
    """
    code = ns["parse"](serial)
    hg = [ins for _, ins in code if ins.startswith("HGMMA")]
    assert len(hg) == 2 and all(ins.endswith("gsb0") for ins in hg)
