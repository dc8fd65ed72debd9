"""GPTQ checkpoints as AutoGPTQ / GPTQModel / transformers write them (safetensors + the JSON
config) loaded into GPTQAttentionWithRope and run against the Hugging Face attention module
holding the weights they decode to; QuantizationConfig read from quantize_config.json and from
config.json["quantization_config"]."""
import json

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from transformers import LlamaConfig, Qwen2Config

from graphir import DType
from graphir.nn import GPTQAttentionWithRope, KVCacheParams, RotaryEmbedding
from graphir.ops import QuantizationConfig
from tests.nn.harness import (LAYERS, PAGE, HFAttentionRunner, check_schedule_against_hf,
                              interpreted, layer_graph, scheduled_manager)
from tests.nn.test_gptq_attention import make_g_idx, quantize

HIDDEN, NH, NKV, D = 256, 4, 2, 64
COMMON = dict(vocab_size=97, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=1,
              num_attention_heads=NH, num_key_value_heads=NKV, max_position_embeddings=128,
              rms_norm_eps=1e-6)
PREFIX = "model.layers.0.self_attn."

# The JSON GPTQ tools write (keys that do not change decoding included, as in real files).
AUTOGPTQ_JSON = {"bits": 4, "group_size": 32, "damp_percent": 0.01, "desc_act": True,
                 "static_groups": False, "sym": False, "true_sequential": True,
                 "model_name_or_path": None, "model_file_base_name": None,
                 "quant_method": "gptq", "checkpoint_format": "gptq"}
HF_JSON = {"batch_size": 1, "bits": 8, "block_name_to_quantize": None,
           "cache_block_outputs": True, "damp_percent": 0.01, "dataset": None, "desc_act": False,
           "exllama_config": {"version": 1}, "group_size": 128, "max_input_length": None,
           "model_seqlen": None, "module_name_preceding_first_block": None,
           "modules_in_block_to_quantize": None, "pad_token_id": None, "quant_method": "gptq",
           "sym": True, "tokenizer": None, "true_sequential": True, "use_cuda_fp16": False,
           "use_exllama": True}

CASES = {
    # name: (HF config, has q/k/v biases, how the config travels, its JSON)
    "llama-4bit-descact-asym": (LlamaConfig(**COMMON, head_dim=D, rope_parameters=dict(
        rope_type="default", rope_theta=1e4)), False, "quantize_config.json", AUTOGPTQ_JSON),
    "qwen2-8bit-bias": (Qwen2Config(**COMMON, rope_parameters=dict(
        rope_type="default", rope_theta=1e6)), True, "config.json", HF_JSON),
}


def write_checkpoint(tmp_path, hf, bias: bool, where: str, qcfg: dict, seed: int):
    """safetensors of the HF module's weights, GPTQ-quantized; returns the decoded weights."""
    rng = np.random.default_rng(seed)
    sd = hf.attn_state_dict()
    tensors, decoded = {}, {}
    g_in = make_g_idx(rng, HIDDEN, qcfg["group_size"], qcfg["desc_act"])
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        w = sd[f"{name}.weight"]  # [out, in]
        g = g_in if name != "o_proj" else make_g_idx(rng, w.shape[1], qcfg["group_size"],
                                                     qcfg["desc_act"])
        ckpt, decoded[f"{name}.weight"] = quantize(rng, w.shape[1], w.shape[0],
                                                   qcfg["group_size"], qcfg["sym"], g,
                                                   qcfg["bits"], w=w.T.astype(np.float64))
        if bias and name != "o_proj":
            ckpt["bias"] = sd[f"{name}.bias"].astype(np.float16)
            decoded[f"{name}.bias"] = ckpt["bias"].astype(np.float32)
        tensors.update({f"{PREFIX}{name}.{k}": v for k, v in ckpt.items()})
    save_file(tensors, str(tmp_path / "model.safetensors"))
    body = qcfg if where == "quantize_config.json" else \
        {"model_type": "qwen2", "quantization_config": qcfg}
    (tmp_path / where).write_text(json.dumps(body))
    return decoded


@pytest.mark.parametrize("case", list(CASES))
def test_gptq_layer_matches_hf(tmp_path, case):
    config, bias, where, qcfg = CASES[case]
    seed = sum(map(ord, case))
    hf = HFAttentionRunner(config, seed=seed, vector_scale=0.5)
    decoded = write_checkpoint(tmp_path, hf, bias, where, qcfg, seed)
    with torch.no_grad():
        hf.attn.load_state_dict({k: torch.from_numpy(v) for k, v in decoded.items()})

    cfg = QuantizationConfig.from_pretrained(tmp_path)
    assert (cfg.bits, cfg.group_size, cfg.desc_act, cfg.sym) == \
        (qcfg["bits"], qcfg["group_size"], qcfg["desc_act"], qcfg["sym"])
    theta = config.rope_parameters["rope_theta"]
    rope = RotaryEmbedding(HIDDEN, NH, theta, 64, head_dim=D, interleaved=False)
    kvp = KVCacheParams(dtype=DType.float32, n_kv_heads=NKV, head_dim=D, num_layers=LAYERS,
                        page_size=PAGE)
    attn = GPTQAttentionWithRope(cfg, rope, NH, NKV, HIDDEN, kvp, has_bias=bias,
                                 _fuse_rope_and_store=bias)
    attn.load_safetensors(tmp_path / "model.safetensors", PREFIX)
    g = layer_graph(attn, rope, kvp)
    assert str(g).count("gir.qmatmul") == 2 and f"bits = {cfg.bits}" in str(g)
    m = scheduled_manager(NKV, D)
    check_schedule_against_hf(hf, interpreted(g, m, attn.state_dict()), m, scaled_atol=True)


# -- QuantizationConfig from JSON ----------------------------------------------------------------
def test_config_from_json_files(tmp_path):
    (tmp_path / "quantize_config.json").write_text(json.dumps(AUTOGPTQ_JSON))
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": HF_JSON}))
    # a directory prefers quantize_config.json, as AutoGPTQ does
    assert QuantizationConfig.from_pretrained(tmp_path) == QuantizationConfig(
        bits=4, group_size=32, desc_act=True, sym=False, checkpoint_format="gptq")
    assert QuantizationConfig.from_pretrained(tmp_path / "config.json") == QuantizationConfig(
        bits=8, group_size=128, desc_act=False, sym=True)
    v2 = dict(AUTOGPTQ_JSON, checkpoint_format="gptq_v2", group_size=-1)
    assert QuantizationConfig.from_dict(v2).checkpoint_format == "gptq_v2"
    assert QuantizationConfig.from_dict(v2).group_size == -1


@pytest.mark.parametrize("change,message", [
    ({"quant_method": "awq"}, "quant_method 'awq' is not GPTQ"),
    ({"bits": 3}, r"bits must be one of \(4, 8\)"),
    ({"checkpoint_format": "marlin"}, "checkpoint_format 'marlin' is not supported"),
    ({"is_marlin_format": True}, "Marlin-packed GPTQ tensors are not supported"),
    ({"dynamic": {"+:.*v_proj": {"bits": 8}}}, r"per-module overrides \('dynamic'\)"),
    ({"pack_dtype": "int16"}, "pack_dtype 'int16' is not supported"),
    ({"group_size": 0}, "group_size must be a positive int or -1, got 0"),
    ({"desc_act": "yes"}, "desc_act must be a bool, got 'yes'"),
])
def test_config_errors(tmp_path, change, message):
    path = tmp_path / "quantize_config.json"
    path.write_text(json.dumps(dict(AUTOGPTQ_JSON, **change)))
    with pytest.raises(ValueError, match=f"quantize_config.json: .*{message}"):
        QuantizationConfig.from_pretrained(path)


def test_config_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no quantize_config.json or config.json"):
        QuantizationConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="no 'quantization_config' \\(not a quantized"):
        QuantizationConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        QuantizationConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"bits": 4}}))
    with pytest.raises(ValueError, match=r"missing \['group_size'\]"):
        QuantizationConfig.from_pretrained(tmp_path)
