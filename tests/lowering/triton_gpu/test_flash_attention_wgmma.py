"""The warp-specialized Gluon prefill kernel's plumbing on the CPU: its configs, the specs the
lowering builds for them (and the Triton twin the interpreter runs in their place), and the
calls it cannot serve falling back to the Triton kernel. Its offline sm_90 compile (every WS
config, three masks, no spills, no in-flight wgmma register hazard) is in
test_flash_attention_aot.py; its numbers are checked on the GPU (tests/gpu/
test_flash_wgmma_gpu.py, tools/gpu_sweeps/attention_wgmma.py)."""
import pytest

from graphir.lowering.triton_gpu.kernels import flash_attention as fa
from graphir.lowering.triton_gpu.kernels import flash_attention_configs as fc
from graphir.lowering.triton_gpu.kernels.flash_attention_wgmma import flash_prefill_ws_kernel


def test_ws_configs_have_names_that_round_trip():
    for d in (64, 128):
        for c in fc.WS_CANDIDATES[d]:
            name = fc.config_tag(c)
            assert name.endswith(("tmaws", "tmawslpt", "tmawspersist", "tmawspersistdeep",
                                  "tmawspersistdyn", "tmawspersistdeepdyn", "dynqtma",
                                  "dynqtmachain"))
            assert {k: v for k, v in fc.get(name).items() if k != "name"} == c
    pp = fc.get("m128n128w4s2tmawspp")
    assert pp["WS"] == 1 and pp["PINGPONG"] == 1 and pp["name"] == "m128n128w4s2tmawspp"
    with pytest.raises(ValueError, match="PINGPONG needs"):
        fc.get("m128n128w8s2tmapp")
    with pytest.raises(ValueError, match="warp-specialized kernel takes"):
        fc.get({**fc.WS_CANDIDATES[128][0], "num_warps": 8})
    with pytest.raises(ValueError, match="warp-specialized kernel takes"):
        fc.check_config(fc.WS_CANDIDATES[128][0], 256)
    for bad in ("m128n128w4s2tmawslptpersist", "m128n128w4s2tmawspppersist"):
        with pytest.raises(ValueError, match="persistent kernels always take"):
            fc.get(bad)
    # The deeper pipeline: a persistent WS form, head dim 64 only (a second score tile).
    deep = fc.get("m128n128w4s3tmawspersistdeep")
    assert deep["DEEP"] == 1 and deep["PERSISTENT"] == 1
    fc.check_config(deep, 64)
    with pytest.raises(ValueError, match="DEEP is a form of the persistent"):
        fc.check_config(deep, 128)
    with pytest.raises(ValueError, match="DEEP is a form of the persistent"):
        fc.get({**fc.WS_CANDIDATES[64][0], "DEEP": 1})
    assert any(c.get("DEEP") for c in fc.candidates(64, 128))
    assert not any(c.get("DEEP") for c in fc.candidates(128, 128))
    # Tiles handed out at run time: a form of the persistent kernels (Triton's too), which
    # the one-tile fallback drops with the other persistent-only forms.
    dyn = fc.get("m128n128w4s3tmawspersistdeepdyn")
    assert dyn["DYN"] == dyn["DEEP"] == dyn["PERSISTENT"] == 1
    assert fc.get("m128n64w8s3tmapersistdyn")["DYN"] == 1
    for bad in ("m128n128w4s2tmawsdyn", "m128n64w8s3tmadyn"):
        with pytest.raises(ValueError, match="DYN hands a persistent kernel's tiles out"):
            fc.get(bad)
    assert fa.one_tile_config(dyn) == {**fc.WS_CANDIDATES[64][0], "num_stages": 3}
    fc.check_config(fa.one_tile_config(dyn), 64)
    # The loader warp's query loads: a persistent WS form, two query slots that with three
    # K/V stages overflow shared memory at head dim 128; the twin and one-tile forms drop it.
    q = fc.get("m128n128w4s3tmawspersistdynqtma")
    assert q["QTMA"] == 1 and fa.twin_config(q).get("QTMA") is None
    fc.check_config(q, 64)
    with pytest.raises(ValueError, match="QTMA's two query slots"):
        fc.check_config(q, 128)
    with pytest.raises(ValueError, match="QTMA .* is a form of the persistent warp"):
        fc.get("m128n128w8s2tmapersistqtma")
    assert "QTMA" not in fa.one_tile_config(q)
    # Key blocks pipelined across tiles: the loader's query rows in their two slots (QTMA),
    # with the plain consumer loop; the twin and one-tile forms drop it.
    chain = fc.get("m128n128w4s2tmawspersistdynqtmachain")
    # A candidate at head dim 64 (three stages); at 128 (two) only the sweep's.
    assert [fc.config_tag(c) for d in (64, 128) for c in fc.CHAIN_CONFIGS[d]] == [
        "m128n128w4s2tmawspersistdynqtmachain"]
    assert [fc.config_tag(c) for c in fc.candidates(64, 128) if c.get("CHAIN")] == [
        "m128n128w4s3tmawspersistdynqtmachain"]
    assert not any(c.get("CHAIN") for c in fc.candidates(128, 128))
    assert chain["CHAIN"] == chain["QTMA"] == chain["DYN"] == 1
    fc.check_config(chain, 128)
    fc.check_config(fc.get("m128n128w4s2tmawspersistqtmachain"), 64)  # (the stride's too)
    for bad in ("m128n128w4s2tmawspersistdynchain", "m128n128w4s3tmawspersistdeepdynqtmachain"):
        with pytest.raises(ValueError, match="CHAIN .* takes the query rows from the loader"):
            fc.get(bad)
    assert "CHAIN" not in fa.twin_config(chain) and "CHAIN" not in fa.one_tile_config(chain)
    assert fa.ws_constexprs(32, 8, 128, 128, "CAUSAL", chain)["CHAIN"] == 1
    assert "CHAIN" not in fa.ws_constexprs(32, 8, 128, 128, "CAUSAL", q)


def test_the_tuner_is_offered_the_ws_kernel_where_it_can_serve():
    ws = [c for c in fc.candidates(128, 128) if c.get("WS")]
    assert [fc.config_tag(c) for c in ws] == ["m128n128w4s2tmaws", "m128n128w4s2tmawslpt",
                                             "m128n128w4s2tmawspersist",
                                             "m128n128w4s3tmawspersist",
                                             "m128n128w4s2tmawspersistdyn",
                                             "m128n128w4s3tmawspersistdyn",
                                             "m128n128w4s2tmawspersistdynqtma"]
    assert fc.candidates(128, 128)[:7] == ws
    assert not any(c.get("WS") for c in fc.candidates(128, 128, include_ws=False))
    # Pages that do not hold a whole key block: no TMA, so no WS config at all.
    assert not any(c.get("WS") for c in fc.candidates(128, 16))
    assert not any(c.get("WS") for c in fc.candidates(128, 128, "float32"))
    assert not any(c.get("WS") for c in fc.candidates(256, 128))


def test_ws_spec_launches_the_gluon_kernel_and_carries_its_triton_twin():
    cfg = fc.WS_CANDIDATES[128][0]
    (s,) = fa.aot_specs(32, 8, 128, 128, "bfloat16", "CAUSAL", config=cfg)
    assert s.fn is flash_prefill_ws_kernel and s.num_warps == 4
    assert s.name == "flash_attention_bf16_mask1_m128n128w4s2tmaws"
    assert s.constexprs["STAGES"] == 2 and s.constexprs["BLOCK_N"] == 128
    assert s.constexprs["PINGPONG"] == 0
    (p,) = fa.aot_specs(32, 8, 128, 128, "bfloat16", "CAUSAL", config={**cfg, "PINGPONG": 1})
    assert p.constexprs["PINGPONG"] == 1 and p.name.endswith("wspp")
    twin = s.interpretable()
    assert twin.fn is fa.flash_prefill_kernel and twin.runtime_params() == s.runtime_params()
    assert twin.constexprs["BLOCK_M"] == 128 and twin.constexprs["BLOCK_N"] == 128
    assert s.grid_for(batch=2, max_seq_len=300) == twin.grid_for(batch=2, max_seq_len=300)
    # The longest-first order is the twin's too (the interpreter runs that order).
    (lpt,) = fa.aot_specs(32, 8, 128, 128, "bfloat16", "CAUSAL", config=fc.WS_CANDIDATES[128][1])
    assert lpt.constexprs["LPT"] == 1 and lpt.interpretable().constexprs["LPT"] == 1
    assert s.constexprs["LPT"] == 0 and twin.constexprs["LPT"] == 0
    plain = fa.aot_specs(32, 8, 128, 128, "bfloat16", "CAUSAL")[0]
    assert plain.interpretable() is plain


@pytest.mark.parametrize("why,args,kw", [
    ("soft-cap", (32, 8, 128, 128, "bfloat16", "CAUSAL"), {"softcap": 30.0}),
    ("chunked mask", (32, 8, 128, 128, "bfloat16", "CHUNKED_CAUSAL"), {}),
    ("rows too small for TMA", (4, 1, 32, 128, "bfloat16", "CAUSAL"), {}),
    ("pages smaller than the key block", (32, 8, 128, 64, "bfloat16", "CAUSAL"), {}),
])
def test_calls_the_ws_kernel_cannot_serve_take_the_triton_default(why, args, kw):
    cfg = dict(fc.WS_CANDIDATES[64 if args[2] <= 64 else 128][0])
    (s,) = fa.aot_specs(*args, config=cfg, **kw)
    assert s.fn is fa.flash_prefill_kernel, why
    assert not s.extra["config"].get("WS"), why


def test_persistent_config_spec_grid_and_plan_launch():
    # A persistent config (flash_attention_persistent.py): the one-tile kernel's arguments plus
    # the query tiles and sequences, a 1-D grid of at most one program per SM; its twin is the
    # persistent Triton kernel at the same arguments and grid; the plan writes both.
    from graphir.lowering.triton_gpu.kernels import flash_attention_persistent as fp
    from graphir.lowering.triton_gpu.kernels.spec import NUM_SMS

    cfg = fc.get("m128n128w4s3tmawspersist")
    (s,) = fa.aot_specs(32, 8, 128, 128, "bfloat16", "CAUSAL", config=cfg)
    assert s.fn is fp.flash_prefill_wsp_kernel and s.name.endswith("_m128n128w4s3tmawspersist")
    assert [k for k, _ in s.runtime_params()] == list(fa.SIGNATURE_PARAMS) + ["n_m", "n_b"]
    assert "LPT" not in s.constexprs and s.constexprs["STAGES"] == 3
    twin = s.interpretable()
    assert twin.fn is fp.flash_prefill_persistent_kernel
    assert twin.runtime_params() == s.runtime_params()
    assert s.grid_for(batch=4, max_seq_len=4096) == (NUM_SMS, 1, 1)   # 1024 tiles
    assert s.grid_for(batch=1, max_seq_len=200) == (64, 1, 1)         # 2 tiles x 32 heads
    assert twin.grid_for(batch=1, max_seq_len=200) == (64, 1, 1)
    grid, tail = fa.plan_launch(s, "B", "S")
    assert grid == [f"min(max(1, cdiv(S, 128)) * 32 * (B), {NUM_SMS})", 1, 1]
    assert tail == ["max(1, cdiv(S, 128))", "B"]
    plain = fa.aot_specs(32, 8, 128, 128, "bfloat16", "CAUSAL")[0]
    assert fa.plan_launch(plain, "B", "S") == (["max(1, cdiv(S, 128))", 32, "B"], [])
    # Calls the WS kernel cannot serve take the Triton default (one tile per program).
    (c,) = fa.aot_specs(32, 8, 128, 128, "bfloat16", "CHUNKED_CAUSAL", config=cfg)
    assert c.fn is fa.flash_prefill_kernel and "n_m" not in c.signature
