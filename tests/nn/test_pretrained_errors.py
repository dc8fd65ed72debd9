"""from_pretrained's errors: missing or broken files, unknown architectures, layer indices out of
range, config options graphir's layers cannot represent, checkpoints whose tensors do not fit.
Checkpoints here are written by hand (config.json + safetensors), no transformers needed."""
from __future__ import annotations

import json

import numpy as np
import pytest

from graphir import DType
from graphir.nn import KVCacheParams, from_pretrained

D, NH, NKV, HIDDEN = 16, 4, 2, 64


def llama_config(**changes) -> dict:
    cfg = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=HIDDEN,
               num_attention_heads=NH, num_key_value_heads=NKV, head_dim=D, num_hidden_layers=2,
               max_position_embeddings=64, rms_norm_eps=1e-6, attention_bias=False,
               rope_parameters=dict(rope_type="default", rope_theta=10000.0))
    cfg.update(changes)
    return cfg


def attention_tensors(rng, prefix="model.layers.{i}.self_attn.", layers=2, norms=False):
    out = {}
    for i in range(layers):
        p = prefix.format(i=i)
        for name, rows in (("q_proj", NH * D), ("k_proj", NKV * D), ("v_proj", NKV * D)):
            out[p + name + ".weight"] = rng.standard_normal((rows, HIDDEN)).astype(np.float32)
        out[p + "o_proj.weight"] = rng.standard_normal((HIDDEN, NH * D)).astype(np.float32)
        if norms:
            out[p + "q_norm.weight"] = rng.standard_normal(D).astype(np.float32)
            out[p + "k_norm.weight"] = rng.standard_normal(D).astype(np.float32)
    return out


def write_checkpoint(path, cfg: dict, tensors: dict | None = None, seed: int = 0):
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    if tensors is None:
        tensors = attention_tensors(np.random.default_rng(seed))
    save_file(tensors, str(path / "model.safetensors"))
    return path


def test_files_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model directory at"):
        from_pretrained(tmp_path / "nowhere", 0)
    with pytest.raises(FileNotFoundError, match="no config.json in"):
        from_pretrained(tmp_path, 0)
    (tmp_path / "config.json").write_text(json.dumps(llama_config()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match=r"no model.safetensors or model.safetensors."
                                                r"index.json in .*found \['pytorch_model.bin'\]"):
        from_pretrained(tmp_path, 0)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.layers.0.self_attn.q_proj.weight": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="names the shard 'model-00001-of-00002"
                                                ".safetensors', which is missing"):
        from_pretrained(tmp_path, 0)
    (tmp_path / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(ValueError, match="not a safetensors index"):
        from_pretrained(tmp_path, 0)


def test_broken_safetensors(tmp_path):
    write_checkpoint(tmp_path, llama_config())
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="not a safetensors file"):
        from_pretrained(tmp_path, 0)
    t = attention_tensors(np.random.default_rng(1))
    t["model.layers.0.self_attn.q_proj.weight"] = np.ones((NH * D, HIDDEN), np.int8)
    write_checkpoint(tmp_path, llama_config(), t)
    with pytest.raises(ValueError, match="stored as I8; only .* are read"):
        from_pretrained(tmp_path, 0, dtype=DType.float32)


def rewrite_header(path, edit) -> None:
    """model.safetensors at `path` with its JSON header passed through `edit` (same data)."""
    import struct

    f = path / "model.safetensors"
    data = f.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


Q = "model.layers.0.self_attn.q_proj.weight"
K = "model.layers.0.self_attn.k_proj.weight"


# Header entries the safetensors format forbids, which the reader used to follow (reading another
# tensor's bytes, or header bytes, as weights) or trip over (AttributeError, KeyError,
# OverflowError): found by mutating a checkpoint's header.
@pytest.mark.parametrize("edit,match", [
    (lambda h: h.__setitem__(Q, [1]), r"q_proj.weight': its header entry must be an object"),
    (lambda h: h[Q].pop("shape"), r"q_proj.weight': shape must list non-negative ints, got None"),
    (lambda h: h[Q].__setitem__("dtype", [1]), r"q_proj.weight': unknown dtype \[1\]"),
    (lambda h: h[Q].__setitem__("shape", [64, True]), "shape must list non-negative ints"),
    (lambda h: h[Q].__setitem__("data_offsets", [0, 1e300]),
     r"data_offsets must be \[start, end\]"),
    (lambda h: h[Q].__setitem__("data_offsets", list(h[K]["data_offsets"])),
     r"bytes for shape \[64, 64\] of F32 \(16384 needed\)"),
    (lambda h: (h[Q].__setitem__("shape", list(h[K]["shape"])),
                h[Q].__setitem__("data_offsets", list(h[K]["data_offsets"]))),
     "overlaps the tensor before it|leaves data bytes"),
    (lambda h: h.pop(K), r"leaves data bytes 0..8192 to no tensor"),
])
def test_safetensors_headers_are_checked_entry_by_entry(tmp_path, edit, match):
    write_checkpoint(tmp_path, llama_config())
    from_pretrained(tmp_path, 0)            # the file as written loads
    rewrite_header(tmp_path, edit)
    with pytest.raises(ValueError, match=match):
        from_pretrained(tmp_path, 0)


@pytest.mark.parametrize("weight_map,match", [
    ({Q: "../model.safetensors"}, r"maps to '../model.safetensors', not the file name of a shard"),
    ({Q: 3}, "maps to 3, not the file name"),
    ([Q], "needs a 'weight_map' object.: weight_map is list"),
])
def test_an_index_names_shards_of_the_directory_only(tmp_path, weight_map, match):
    write_checkpoint(tmp_path / "m", llama_config())
    (tmp_path / "m" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match=match):
        from_pretrained(tmp_path / "m", 0)


def test_unknown_architecture_names_the_supported_ones(tmp_path):
    write_checkpoint(tmp_path, llama_config(model_type="gpt2", architectures=["GPT2LMHeadModel"]))
    with pytest.raises(ValueError, match=r"unsupported model_type 'gpt2' \(architectures "
                                         r"\['GPT2LMHeadModel'\]\); supported: \['deepseek_v3', "
                                         r"'gemma2', 'gemma3', 'gemma3_text', 'llama', "):
        from_pretrained(tmp_path, 0)


@pytest.mark.parametrize("idx", [2, -1, True, 1.0])
def test_layer_index_out_of_range(tmp_path, idx):
    write_checkpoint(tmp_path, llama_config())
    with pytest.raises(ValueError, match=rf"layer_idx {idx!r} is out of range: this llama model "
                                         r"has 2 layers \(0 .. 1\)"):
        from_pretrained(tmp_path, idx)


@pytest.mark.parametrize("changes,match", [
    (dict(attention_bias=True), r"sets attention_bias = true \(o_proj has no bias"),
    (dict(rope_parameters=dict(rope_type="default", rope_theta=1e4, partial_rotary_factor=0.5)),
     "sets partial_rotary_factor = 0.5"),
    (dict(rope_parameters=dict(rope_type="proportional", rope_theta=1e4)),
     r"unsupported rope_type 'proportional'; supported: \['default', 'linear', 'dynamic', "
     r"'llama3', 'yarn', 'longrope'\]"),
    (dict(quantization_config={"quant_method": "gptq"}),
     "describes a quantized checkpoint \\(quant_method 'gptq'\\)"),
    (dict(model_type="qwen3", layer_types=["full_attention", "chunked_attention"]),
     r"sets layer_types\[1\] = 'chunked_attention'"),
    (dict(model_type="gemma3_text", attn_logit_softcapping=30.0, query_pre_attn_scalar=16),
     "attn_logit_softcapping = 30.0 \\(transformers' Gemma 3 attention does not apply it\\)"),
    (dict(model_type="gemma2", use_bidirectional_attention=True, query_pre_attn_scalar=16),
     "use_bidirectional_attention = true"),
    (dict(model_type="phi3", rope_parameters=dict(
        rope_type="longrope", rope_theta=1e4, short_factor=[1.0] * 7, long_factor=[2.0] * 8),
        original_max_position_embeddings=16),
     r"longrope short_factor must list head_dim / 2 = 8 numbers"),
    (dict(num_hidden_layers=0), "num_hidden_layers must be a positive int, got 0"),
])
def test_unsupported_config_options(tmp_path, changes, match):
    write_checkpoint(tmp_path, llama_config(**changes))
    with pytest.raises(ValueError, match=match):
        from_pretrained(tmp_path, 1)


LONGROPE = dict(rope_type="longrope", rope_theta=1e4, short_factor=[1.0] * 8,
                long_factor=[2.0] * 8, original_max_position_embeddings=16)


# Values of the wrong type or range, each of which used to surface as a TypeError or
# ZeroDivisionError from the first arithmetic on it (found by `graphir.tools.fuzz --target
# configs`): now a ValueError naming the key.
@pytest.mark.parametrize("changes,match", [
    (dict(head_dim={"a": 1}), r"head_dim must be a positive int, got \{'a': 1\}"),
    (dict(num_key_value_heads="2"), r"num_key_value_heads must be a positive int, got '2'"),
    (dict(hidden_size=2, head_dim=None), "hidden_size = 2 is smaller than num_attention_heads"),
    (dict(model_type="gemma2", query_pre_attn_scalar=0), "query_pre_attn_scalar must be positive"),
    (dict(model_type="gemma2", query_pre_attn_scalar=16, attn_logit_softcapping=[50]),
     r"attn_logit_softcapping must be a finite number, got \[50\]"),
    (dict(rms_norm_eps=float("nan")), "rms_norm_eps must be a finite number, got nan"),
    (dict(rope_parameters=None, rope_scaling=[1]), r"rope_scaling must be an object .or null., "
                                                   r"got \[1\]"),
    (dict(rope_parameters=dict(rope_type="default", rope_theta=-1)),
     r"rope_parameters\['rope_theta'\] must be positive, got -1"),
    (dict(rope_parameters=dict(rope_type="default", rope_theta=1e4, partial_rotary_factor={})),
     r"partial_rotary_factor must be a finite number, got \{\}"),
    (dict(rope_parameters=dict(LONGROPE, short_factor=[1.0] * 5 + [None] + [1.0] * 2)),
     r"longrope short_factor\[5\] must be a finite number, got None"),
    (dict(rope_parameters=dict(LONGROPE, original_max_position_embeddings=1)),
     "longrope original_max_position_embeddings = 1 leaves the default attention_factor"),
    (dict(rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=4.0, truncate="yes",
                               original_max_position_embeddings=32)),
     r"yarn rope_parameters\['truncate'\] must be true or false, got 'yes'"),
    (dict(rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=4.0, beta_fast=[],
                               original_max_position_embeddings=32)),
     r"yarn rope_parameters\['beta_fast'\] must be a finite number, got \[\]"),
    (dict(model_type=["llama"]), r"unsupported model_type \['llama'\]"),
    (dict(model_type="qwen2", attention_bias=True, use_sliding_window=True, sliding_window=8,
          max_window_layers="1"), r"max_window_layers must be an int >= 0, got '1'"),
])
def test_config_values_of_the_wrong_type_or_range_are_named(tmp_path, changes, match):
    rng = np.random.default_rng(0)
    tensors = attention_tensors(rng)
    if changes.get("attention_bias"):
        for i in range(2):
            for name, rows in (("q_proj", NH * D), ("k_proj", NKV * D), ("v_proj", NKV * D)):
                tensors[f"model.layers.{i}.self_attn.{name}.bias"] = np.zeros(rows, np.float32)
    write_checkpoint(tmp_path, llama_config(**changes), tensors)
    with pytest.raises(ValueError, match=match):
        from_pretrained(tmp_path, 1)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="config.json: expected a JSON object, got list"):
        from_pretrained(tmp_path, 1)


def test_dynamic_rope_only_where_it_is_plain(tmp_path):
    write_checkpoint(tmp_path, llama_config(rope_parameters=dict(rope_type="dynamic",
                                                                 rope_theta=1e4, factor=2.0)))
    assert from_pretrained(tmp_path, 0).rope.max_seq_len == 32  # the default keeps it exact
    with pytest.raises(ValueError, match=r"rope_type 'dynamic' \(NTK\).*holds 2 \* max_seq_len = "
                                         r"66 positions: pass max_seq_len <= 32"):
        from_pretrained(tmp_path, 0, max_seq_len=33)


def test_bad_arguments(tmp_path):
    write_checkpoint(tmp_path, llama_config())
    with pytest.raises(ValueError, match=r"\['scale', 'sliding_window'\] come from config.json"):
        from_pretrained(tmp_path, 0, scale=0.1, sliding_window=3)
    kvp = KVCacheParams(dtype=DType.float32, n_kv_heads=4, head_dim=16)
    with pytest.raises(ValueError, match="caches 2 KV heads of head_dim 16; kv_params has "
                                         "n_kv_heads 4, head_dim 16"):
        from_pretrained(tmp_path, 0, kv_params=kvp)
    with pytest.raises(ValueError, match="dtype must be a float DType, got"):
        from_pretrained(tmp_path, 0, dtype=DType.int32)
    with pytest.raises(ValueError, match="devices must be a non-empty list of DeviceRef"):
        from_pretrained(tmp_path, 0, devices=[])


def test_checkpoint_tensors_must_fit_the_layer(tmp_path):
    rng = np.random.default_rng(2)
    t = attention_tensors(rng)
    del t["model.layers.0.self_attn.k_proj.weight"]
    t["model.layers.0.self_attn.o_proj.bias"] = rng.standard_normal(HIDDEN).astype(np.float32)
    t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(D // 2, np.float32)  # ignored
    write_checkpoint(tmp_path, llama_config(), t)
    with pytest.raises(ValueError, match=r"layer 0 of this llama checkpoint: missing \['model."
                                         r"layers.0.self_attn.k_proj.weight'\]; has \['model."
                                         r"layers.0.self_attn.o_proj.bias'\] that "
                                         r"AttentionWithRope cannot use"):
        from_pretrained(tmp_path, 0)
    assert from_pretrained(tmp_path, 1).hidden_size == HIDDEN  # layer 1 is whole
    t["model.layers.1.self_attn.q_proj.weight"] = np.ones((NH * D + 1, HIDDEN), np.float32)
    write_checkpoint(tmp_path, llama_config(), t)
    with pytest.raises(ValueError, match=r"q_proj.weight': expected shape \[64, 64\], got "
                                         r"\[65, 64\]"):
        from_pretrained(tmp_path, 1)
    write_checkpoint(tmp_path, llama_config(), {"model.embed.weight": np.ones(3, np.float32)})
    with pytest.raises(ValueError, match=r"has no tensors named model.layers.1.self_attn.\*"):
        from_pretrained(tmp_path, 1)
