"""TensorParallel / DataParallel attention take the seed's `quant_config` (float8) as well as the
older `float8_config` name."""
import numpy as np
import pytest

from graphir.dtype import round_to
from graphir import DType
from graphir.nn import (AttentionWithRope, DataParallelAttentionWithRope,
                        TensorParallelAttentionWithRope)
from graphir.nn.float8_config import Float8Config, Float8ScaleGranularity
from graphir.ops import QuantizationConfig
from graphir.runtime.interpreter import run
from tests.nn.harness import HIDDEN, LAYER, NH, layer_graph, manager
from tests.nn.test_parallel import SCHED, cpus, make, random_state, tp_graph

CFG = Float8Config.static(Float8ScaleGranularity.ROWWISE)  # static: TP quantizes like 1 device


def float8_state(attn, seed: int) -> dict:
    """Float8 weights with per-row scales, a static input scale, for every float8 linear."""
    sd = random_state(attn, seed)
    for k in [k for k in sd if k.endswith("_proj.weight")]:
        base = k.rsplit(".", 1)[0]
        scale = (np.abs(sd[k]).max(axis=1, keepdims=True) / 448.0).astype(np.float32)
        sd[k] = round_to(sd[k] / scale, DType.float8_e4m3fn)
        sd[base + ".weight_scale"] = scale
        sd[base + ".input_scale"] = np.array(3.0 / 448, np.float32)
    return sd


def test_tensor_parallel_quant_config_matches_single_device():
    devs = cpus(2)
    rope, kvp1, single = make(AttentionWithRope, 2, [devs[0]], float8_config=CFG)
    rope_tp, kvp, tp = make(TensorParallelAttentionWithRope, 2, devs, quant_config=CFG)
    _, _, old_name = make(TensorParallelAttentionWithRope, 2, devs, float8_config=CFG)
    assert tp.quant_config is CFG and tp.float8_config is CFG
    assert all(s.float8_config is CFG for s in tp.list_of_attentions)
    weights = float8_state(single, seed=4)
    single.load_state_dict(weights)
    tp.load_state_dict(weights)
    old_name.load_state_dict(weights)
    gtp = tp_graph(tp, rope_tp, kvp, devs)
    assert str(gtp) == str(tp_graph(old_name, rope_tp, kvp, devs))
    g1 = layer_graph(single, rope, kvp1)
    m = manager(n_kv_heads=2)
    for _ in range(3):
        m.claim()
    dev_blocks = [np.ascontiguousarray(m.blocks[..., [i], :]) for i in range(2)]
    rng = np.random.default_rng(3)
    for seq_ids, counts in SCHED:
        x = rng.standard_normal((sum(counts), HIDDEN)).astype(np.float32)
        st = m.prepare_step(seq_ids, counts)
        args = [x, st.input_row_offsets]
        for b in dev_blocks:
            args += [b, st.cache_lengths, st.lookup_table, st.max_lengths]
        outs = run(gtp, *args, weights=tp.state_dict())
        (want,) = run(g1, x, st.input_row_offsets, m.blocks, st.cache_lengths, st.lookup_table,
                      st.max_lengths, weights=single.state_dict())
        m.commit_step(st)
        assert np.abs(want).max() > 0.1
        for y in outs:
            np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def test_quant_config_errors_and_data_parallel():
    devs = cpus(2)
    _, _, dp = make(DataParallelAttentionWithRope, 2, devs, quant_config=CFG)
    assert dp.quant_config is CFG
    assert all(s.float8_config is CFG for s in dp.replicated_attentions)
    _, _, same = make(TensorParallelAttentionWithRope, 2, devs, quant_config=CFG,
                      float8_config=CFG)
    assert same.quant_config is CFG
    _, _, none = make(TensorParallelAttentionWithRope, 2, devs, quant_config=None)
    assert none.quant_config is None
    with pytest.raises(ValueError, match="quant_config and float8_config \\(its older name\\) "
                                         "are both given and differ"):
        make(TensorParallelAttentionWithRope, 2, devs, quant_config=CFG,
             float8_config=Float8Config.dynamic())
    with pytest.raises(ValueError, match="TensorParallelAttentionWithRope: quant_config must be "
                                         "a Float8Config, got QuantizationConfig"):
        make(TensorParallelAttentionWithRope, 2, devs, quant_config=QuantizationConfig())
    assert NH % 2 == 0 and LAYER == 1  # the shapes the helpers above assume


def test_the_parallel_forms_show_and_check_the_seed_signature():
    """help() and IDEs see the seed's keywords (their __init__ takes **kwargs), and a misspelt
    keyword or a sharding_strategy is refused naming the parallel class, not AttentionWithRope."""
    import inspect

    seed = ("rope", "num_attention_heads", "num_key_value_heads", "hidden_size", "kv_params",
            "devices", "dtype", "linear_cls", "stacked_qkv", "scale", "has_bias", "quant_config",
            "clip_qkv", "use_qk_norm", "rms_norm_eps", "mask_variant", "sliding_window")
    for cls in (TensorParallelAttentionWithRope, DataParallelAttentionWithRope):
        params = inspect.signature(cls).parameters
        assert set(seed) <= set(params) and "sharding_strategy" not in params, cls
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params.values())
        with pytest.raises(TypeError, match=f"{cls.__name__}\\(\\) got unexpected keyword "
                                            f"arguments \\['has_bais'\\]"):
            make(cls, 2, cpus(2), has_bais=True)
        with pytest.raises(ValueError, match=f"{cls.__name__} picks its own sharding_strategy"):
            make(cls, 2, cpus(2), sharding_strategy="replicate")
