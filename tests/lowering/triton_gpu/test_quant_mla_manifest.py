"""Compiled offline for cuda:sm_90, the quantized and latent attention layers ship kernels only:
the manifest's plan of GGUFQAttentionWithRope (Q4_K), GPTQAttentionWithRope (4-bit, asymmetric,
desc_act) and LatentAttentionWithRope (graph_mode auto) has no host_runtime step, and their
qmatmul (Q4_K: nib_matmul over the weight repacked at load) / MLA steps launch cubins of the
artifact."""
import numpy as np
import pytest

from tests.nn.harness import LAYER, layer_graph


def gguf_layer():
    from tests.nn import test_gguf_attention as tg

    rope, kvp, quant, _ = tg.layers("Q4_K")
    return layer_graph(quant, rope, kvp)


def gptq_layer():
    from graphir.ops import QuantizationConfig
    from tests.nn import test_gptq_attention as tq

    rope, kvp, quant, _ = tq.build(QuantizationConfig(group_size=64, desc_act=True, sym=False))
    return layer_graph(quant, rope, kvp)


def mla_layer():
    from tests.nn import test_mla as tm

    rope, kvp, attn = tm.make_layer(q_lora=24)
    return layer_graph(attn, rope, kvp, layer=LAYER)


@pytest.fixture(scope="module")
def manifests(tmp_path_factory):
    from graphir.lowering.artifact import load_artifact
    from graphir.lowering.driver import compile_graph

    out = {}
    tmp = tmp_path_factory.mktemp("arts")
    for name, build in (("gguf", gguf_layer), ("gptq", gptq_layer), ("mla", mla_layer)):
        compile_graph(build(), "cuda:sm_90", out=tmp / f"{name}.gart")
        out[name] = load_artifact(tmp / f"{name}.gart", expect_target="cuda:sm_90").manifest
    return out


# Q4_K is repacked at load for the nib kernels: a load-time "host" step, not a host_runtime one;
# decode rows take the GEMV, a few rows the dot, many the decode into scratch + the matmul.
WANT = {"gguf": ({"nib_matmul"}, ("nib_q4_k_gemv", "nib_q4_k_matmul_m16", "nib_q4_k_dequant",
                                  "matmul_fp32")),
        "gptq": ({"qmatmul"}, ("gptq_4b_z_perm_matmul_fp32",)),
        "mla": ({"mla_cache_store", "mla_attention", "mla_prefill_plan"}, ("mla_absorbed_fp32",))}


@pytest.mark.parametrize("name", sorted(WANT))
def test_manifest_has_no_host_steps(manifests, name):
    m = manifests[name]
    steps = m["plan"]["steps"]
    assert not [s["op"] for s in steps if s["kernel"] == "host_runtime"]
    ops, want = WANT[name]
    kernel_steps = {s["op"] for s in steps if s["kernel"] not in ("host", "view")}
    assert ops <= kernel_steps, kernel_steps
    launched = {op["launch"] for s in steps if s["op"] in ops
                for var in s["attrs"]["variants"] for op in var["ops"] if "launch" in op}
    assert launched and launched <= set(m["kernels"])
    specs = {m["kernels"][k]["spec"] for k in launched}
    assert all(any(s.startswith(w) for s in specs) for w in want), specs
    for k in launched:
        assert m["kernels"][k]["cubin"].endswith(".cubin")
    assert np.all([m["kernels"][k]["shared"] <= 227 * 1024 for k in launched])


def test_float32_latent_layer_at_deepseek_sizes_builds(tmp_path):
    # Float32 operands over the 512-wide latent: the 64-row attention tiles and the prefill
    # kernels' 16-bit stage counts need 246-705 KB of shared memory; the plan takes the 16-row
    # tile and fewer stages instead of failing the build (mla_decode.layer_config).
    from graphir import DType
    from graphir.lowering.artifact import load_artifact
    from graphir.lowering.driver import compile_graph
    from graphir.nn import DeepseekYarnRotaryEmbedding, KVCacheParams, LatentAttentionWithRope
    from tests.nn.test_mla import YARN_PARAMS

    rope = DeepseekYarnRotaryEmbedding(64, 1, 10000.0, 4096, head_dim=64, interleaved=True,
                                       scaling_params=YARN_PARAMS)
    kvp = KVCacheParams(dtype=DType.float32, n_kv_heads=1, head_dim=576, num_layers=1,
                        page_size=64)
    attn = LatentAttentionWithRope(rope=rope, num_attention_heads=128, num_key_value_heads=128,
                                   hidden_size=256, kv_params=kvp, dtype=DType.float32,
                                   kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                                   v_head_dim=128)
    compile_graph(layer_graph(attn, rope, kvp, layer=0), "cuda:sm_90", out=tmp_path / "a.gart")
    m = load_artifact(tmp_path / "a.gart", expect_target="cuda:sm_90").manifest
    specs = {k["spec"] for k in m["kernels"].values()}
    assert any(s.startswith("mla_absorbed_fp32_m16n32w4s3") for s in specs), specs
    assert all(k["shared"] <= 227 * 1024 for k in m["kernels"].values())
