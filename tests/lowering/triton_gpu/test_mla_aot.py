"""The MLA kernels compile offline (no GPU) to sm_90 cubins for DeepSeek's sizes (kv_lora_rank
512, rope 64, nope 128, v 128) at 16, 32 and 128 heads, pages of 64 and 128: within Hopper's
shared memory, no spills, the latent cache tiles of the absorbed kernel read through cp.async
(a key block lies in one page), the 64-row tile on wgmma; the warp-specialized Gluon
configs (mla_decode_ws.py, mla_decode_seesaw.py) by TMA. Float32 layers at those sizes fit
shared memory (the 16-row tile, fewer prefill stages), spilling. Every candidate config of the
absorbed kernel (mla_decode.CANDIDATES, timed by tools/gpu_sweeps/mla.py) compiles the same
way: no stack (bar 16 bytes outside the seesaw kernel's loop), no local memory, shared
memory within sm_90's limit."""

import pytest

from tests.lowering.triton_gpu.test_aot_cubin import PARALLEL, run_compiled_mode
from tests.lowering.triton_gpu.test_quant_aot import RESOURCES

SCRIPT = RESOURCES + PARALLEL + r"""
import json
from graphir.lowering.triton_gpu import aot
from graphir.lowering.triton_gpu.kernels import mla as mk, mla_decode as md, mla_prefill as mp

jobs = [("store", mk.cache_store_spec("bfloat16", "bfloat16", 512, 64, 1, 64, True)),
        ("store2", mk.cache_store_spec("float16", "float16", 512, 64, 2, 128, False)),
        ("plan", mk.prefill_plan_spec())]
for nh, page in ((16, 64), (32, 128), (128, 64)):
    for s in md.specs("bfloat16", "bfloat16", nh, 128, 64, 128, 512, 1, page):
        jobs.append((f"h{nh}p{page}", s))
for s in mp.specs("bfloat16", "bfloat16", 128, 128, 64, 128, 512, 1, 64):
    jobs.append(("prefill", s))
# Float32 layers at DeepSeek's sizes (slow, spilling, but within shared memory).
for s in (md.specs("float32", "float32", 128, 128, 64, 128, 512, 1, 64)
          + mp.specs("float32", "float32", 128, 128, 64, 128, 512, 1, 64)):
    jobs.append(("fp32", s))
# The q absorption and the fused merge at 16 tokens a program (tools/gpu_sweeps/mla.py --aux
# 16 --merge fused; the shipped ones: 64 tokens, the split merge).
jobs += [("aux16", s) for s in md.specs("bfloat16", "bfloat16", 128, 128, 64, 128, 512, 1, 64,
                                        None, 16, "fused")[::2]]
# The split merge (mla_merge.py): the combine and the w_uv product at 16 and 64 tokens.
for bt in (16, 64):
    jobs += [("split", s) for s in md.specs("bfloat16", "bfloat16", 128, 128, 64, 128, 512, 1,
                                            64, None, bt, "split")[2:]]
for name, conf in md.CANDIDATES.items():
    nh = {16: 16, 32: 32}.get(conf["BLOCK_M"], 128)
    jobs.append(("cand", md.specs("bfloat16", "bfloat16", nh, 128, 64, 128, 512, 1, 64, name)[1]))
precompile([s for _, s in jobs])


def local_in_loops(cubin):
    # Local loads / stores (spills) inside a loop that issues wgmma (a backward branch's range
    # holding an HGMMA): the key loops. None without cuobjdump.
    sass = cuobjdump(cubin, "-sass")
    if sass is None:
        return None
    ins = [(int(a, 16), t) for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    # Loop back-edges are predicated backward branches; the unpredicated ones return from the
    # mbarrier retry blocks placed after the function's body.
    loops = [(int(m.group(1), 16), a) for a, t in ins
             for m in [re.search(r"^@!?U?P\d\s+BRA\s+(?:`\(\S+\)\s*)?0x([0-9a-f]+)", t)]
             if m and int(m.group(1), 16) < a]
    hot = [(lo, hi) for lo, hi in loops if any(lo <= a <= hi and "HGMMA" in t for a, t in ins)]
    return sum(1 for a, t in ins if re.search(r"\b(LDL|STL)\b", t)
               and any(lo <= a <= hi for lo, hi in hot))


out = {}
for label, s in jobs:
    c = aot.compile_spec(s)
    out[f"{label}/{s.name}"] = record(s, c)
    if s.name.endswith("ss"):
        out[f"{label}/{s.name}"]["local_in_loops"] = local_in_loops(c.cubin)
print("JSON" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    return run_compiled_mode(SCRIPT, tmp_path_factory, timeout=900)


def test_every_kernel_compiles_fits_and_does_not_spill(compiled):
    from graphir.lowering.triton_gpu.aot import MAX_SHARED_SM90

    from graphir.lowering.triton_gpu.kernels import mla_decode as md

    # store / plan; 3 layers x [absorb, attention, combine, w_uv]; prefill; fp32 decode +
    # prefill; the 16-token absorption and fused merge; the split merge at 16 and 64 tokens
    # (one combine); every candidate's attention kernel.
    assert len(compiled) == 3 + 12 + 2 + 6 + 2 + 3 + len(md.CANDIDATES)
    for name, c in compiled.items():
        assert c["magic"] == "7f454c46", name
        assert c["shared"] <= MAX_SHARED_SM90, (name, c["shared"])
        if c["res"] is not None and not name.startswith("fp32/"):
            # The seesaw kernel's second consumer warpgroup keeps 4 registers (its output
            # pointers and a row slot's inputs) on the stack: stored before the key loop,
            # reloaded after it, never touched inside a loop that issues wgmma.
            stack = 16 if name.endswith("ss") else 0
            assert c["res"][1] <= stack and c["res"][2] == 0, (name, c["res"])
            assert c.get("local_in_loops") in (None, 0), (name, c["local_in_loops"])


def test_candidate_configs_use_tensor_cores(compiled):
    from graphir.lowering.triton_gpu.kernels import mla_decode as md

    for name, conf in md.CANDIDATES.items():
        c = compiled[f"cand/mla_absorbed_bf16_{name}"]
        assert c["wgmma" if conf["BLOCK_M"] >= 64 else "mma"] > 0, name
        if conf.get("WS"):  # the Gluon kernel: the latent rows by TMA, nine boxes a block
            assert c["tma"] == 9, name
        elif conf["num_stages"] > 1:
            assert c["cp_async"] > 0, name


def test_split_merge_product_is_pipelined_on_tensor_cores(compiled):
    # The w_uv product's R loop: the pipeliner's asynchronous copies feed wgmma tiles.
    for bt in ("", "_t64"):
        c = compiled[f"split/mla_uv_bf16{bt}"]
        assert c["cp_async"] > 0 and c["wgmma"] + c["mma"] > 0, (bt, c)
    assert "split/mla_combine_bf16" in compiled


def test_latent_cache_streams_through_async_copies(compiled):
    absorbed = {k: v for k, v in compiled.items()
                if "/mla_absorbed_bf16" in k and not k.startswith("cand/")}
    assert len(absorbed) == 3
    for name, c in absorbed.items():
        assert c["cp_async"] > 0, name
    from graphir.lowering.triton_gpu.kernels import mla_decode as md

    assert compiled[f"h128p64/mla_absorbed_bf16_{md.DEFAULTS[128]}"]["wgmma"] > 0
    for name in ("prefill/mla_decompress_bf16", "prefill/mla_prefill_attn_bf16"):
        assert compiled[name]["wgmma"] > 0 and compiled[name]["cp_async"] > 0, name
