"""Fuzz target: edited Hugging Face config.json files through `from_pretrained`.

Seven tiny checkpoints (Llama, Qwen2 with biases, Gemma 2 with its scale, softcap and window,
Llama 3 RoPE, YaRN, LongRoPE, DeepSeek-V3's latent attention with its YaRN) are written once; each case changes one to three values anywhere
in one config (nested RoPE parameters and factor lists too) to an edge value of another type or
range (0, -1, 2**63, NaN, inf, null, true, "x", [], {}, a RoPE type name), or deletes a key,
then builds a layer from it; or edits the Llama checkpoint's safetensors header the same way
(its length field and data cut at times). Fine: a ValueError or FileNotFoundError (a refusal naming the key),
or a layer. A finding: any other exception. Its first minute found twelve: TypeErrors from a
list where a number belongs, ZeroDivisionError from a zero query_pre_attn_scalar or a LongRoPE
original length of 1, a dict where rope_scaling belongs; nn/config_values.py now checks each
value where it is read. Header edits found entries read in silence from another tensor's bytes
(nn/pretrained_weights.py now checks the header as the safetensors format defines it).
"""
from __future__ import annotations

import copy
import json
import random
import tempfile
from pathlib import Path

import numpy as np

from .fuzz_runtime import mutate_json

D, NH, NKV, HIDDEN = 16, 4, 2, 64
EDGES = (0, -1, 1, 2, 3, 7, 2 ** 31, 2 ** 63, 1e30, -0.0, 0.5, float("nan"), float("inf"), None,
         True, False, "x", "", [], {}, [1], {"a": 1}, 1.5, "default", "llama3", "yarn",
         "linear", "dynamic", "longrope", "sliding_attention")


def base_configs() -> list[dict]:
    def llama(**changes):
        cfg = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=HIDDEN,
                   num_attention_heads=NH, num_key_value_heads=NKV, head_dim=D,
                   num_hidden_layers=2, max_position_embeddings=64, rms_norm_eps=1e-6,
                   attention_bias=False,
                   rope_parameters=dict(rope_type="default", rope_theta=10000.0))
        cfg.update(changes)
        return cfg

    longrope = llama(rope_theta=10000.0, rope_scaling=dict(
        rope_type="longrope", short_factor=[1.0] * (D // 2), long_factor=[2.0] * (D // 2),
        original_max_position_embeddings=32))
    del longrope["rope_parameters"]
    return [
        llama(),
        llama(model_type="qwen2", architectures=["Qwen2ForCausalLM"], attention_bias=True),
        llama(model_type="gemma2", architectures=["Gemma2ForCausalLM"],
              query_pre_attn_scalar=16, attn_logit_softcapping=50.0, sliding_window=8),
        llama(rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0,
                                   low_freq_factor=1.0, high_freq_factor=4.0,
                                   original_max_position_embeddings=32)),
        llama(rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                   original_max_position_embeddings=32, beta_fast=32,
                                   beta_slow=1, truncate=True)),
        longrope,
        dict(model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"],
             hidden_size=HIDDEN, num_attention_heads=NH, num_key_value_heads=NH,
             num_hidden_layers=2, max_position_embeddings=64, rms_norm_eps=1e-6,
             attention_bias=False, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8,
             qk_rope_head_dim=8, v_head_dim=8, rope_theta=10000.0,
             rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=16,
                               mscale=1.0, mscale_all_dim=1.0, beta_fast=32, beta_slow=1))]


def latent_tensors(rng) -> dict:
    """DeepSeek-V3's attention weights for the last base config (Hugging Face names)."""
    shapes = {"q_a_proj.weight": (32, HIDDEN), "q_a_layernorm.weight": (32,),
              "q_b_proj.weight": (NH * 16, 32), "kv_a_proj_with_mqa.weight": (16 + 8, HIDDEN),
              "kv_a_layernorm.weight": (16,), "kv_b_proj.weight": (NH * 16, 16),
              "o_proj.weight": (HIDDEN, NH * 8)}
    return {f"model.layers.{i}.self_attn.{n}": rng.standard_normal(shape).astype(np.float32)
            for i in range(2) for n, shape in shapes.items()}


def tensors(rng, bias: bool) -> dict:
    out = {}
    for i in range(2):
        p = f"model.layers.{i}.self_attn."
        for name, rows in (("q_proj", NH * D), ("k_proj", NKV * D), ("v_proj", NKV * D)):
            out[p + name + ".weight"] = rng.standard_normal((rows, HIDDEN)).astype(np.float32)
            if bias:
                out[p + name + ".bias"] = rng.standard_normal(rows).astype(np.float32)
        out[p + "o_proj.weight"] = rng.standard_normal((HIDDEN, NH * D)).astype(np.float32)
    return out


def edit(cfg: dict, rng: random.Random) -> dict:
    """A copy with one to three values changed to one of EDGES (or deleted), at any depth."""
    cfg = copy.deepcopy(cfg)
    for _ in range(rng.randint(1, 3)):
        mutate_json(cfg, rng, "delete" if rng.random() < 0.15 else "value", EDGES)
    return cfg


class ConfigTarget:
    def __init__(self):
        from safetensors.numpy import save_file

        self.dir = Path(tempfile.mkdtemp(prefix="graphir-fuzz-configs-"))
        self.bases = base_configs()
        rng = np.random.default_rng(0)
        self.paths = []
        for i, cfg in enumerate(self.bases):
            p = self.dir / f"m{i}"
            p.mkdir()
            ts = latent_tensors(rng) if cfg["model_type"] == "deepseek_v3" else \
                tensors(rng, bool(cfg.get("attention_bias")))
            save_file(ts, str(p / "model.safetensors"))
            self.paths.append(p)
            if i == 0:
                self.arrays = ts
        self.weights = (self.paths[0] / "model.safetensors").read_bytes()

    def damaged_weights(self, rng: random.Random) -> str:
        """The Llama checkpoint's safetensors header edited as configs are (a value of another
        type, a deleted entry), sometimes its length field or data cut too; returns what."""
        data = self.weights
        n = int.from_bytes(data[:8], "little")
        raw = json.dumps(edit(json.loads(data[8:8 + n]), rng)).encode()
        length, body, what = len(raw), data[8 + n:], "safetensors header"
        if rng.random() < 0.1:
            length = rng.choice([0, 1, len(raw) - 1, len(raw) + 1, 2 ** 63])
            what += ", length field"
        if rng.random() < 0.1:
            body = body[:rng.randrange(len(body))]
            what += ", data cut"
        (self.paths[0] / "model.safetensors").write_bytes(length.to_bytes(8, "little") + raw + body)
        return what

    def __call__(self, rng: random.Random) -> str | None:
        from graphir.nn import from_pretrained

        i = rng.randrange(len(self.bases))
        if i == 0 and rng.random() < 0.5:
            cfg, what = self.bases[0], self.damaged_weights(rng)
        else:
            cfg, what = edit(self.bases[i], rng), "config.json"
        (self.paths[i] / "config.json").write_text(json.dumps(cfg))
        layer = rng.randrange(2)
        try:
            attn = from_pretrained(self.paths[i], layer)
        except (ValueError, FileNotFoundError):
            return None
        except Exception as e:  # noqa: BLE001
            return (f"configs ({what}): {type(e).__name__}: {str(e)[:120]} (layer {layer} of "
                    f"{json.dumps(cfg)[:300]})")
        finally:
            if what != "config.json":
                (self.paths[0] / "model.safetensors").write_bytes(self.weights)
        if what != "config.json":
            # An accepted header edit must have changed nothing the layer reads.
            prefix = f"model.layers.{layer}.self_attn."
            for name, a in attn.state_dict().items():
                if not np.array_equal(a, self.arrays[prefix + name]):
                    return f"configs ({what}): accepted, but {name} loaded other numbers"
        return None
