"""config.json of a Hugging Face model, read the way transformers reads it, for one attention
layer: the family, the layer's type (sliding or full attention) and its RoPE parameters.

Both config formats are read: transformers 5 (`rope_parameters`, possibly per layer type) and
the older one (`rope_theta` + `rope_scaling`, Gemma 3's `rope_local_base_freq`,
`sliding_window_pattern`). Values transformers would use and graphir cannot represent raise.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .config_values import config_dict, config_int, config_number

# model_type -> family
MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3",
               "gemma2": "gemma2", "gemma3_text": "gemma3", "gemma3": "gemma3", "phi3": "phi3",
               "deepseek_v3": "deepseek_v3"}
SLIDING, FULL = "sliding_attention", "full_attention"
_SCALED = ("llama3", "yarn", "longrope")
_PREFIX = "model.layers.{i}.self_attn."
# A Gemma3ForConditionalGeneration's text_config holds only what differs from these
# (Gemma3TextConfig's defaults).
_GEMMA3_TEXT_DEFAULTS = {
    "hidden_size": 2304, "num_hidden_layers": 26, "num_attention_heads": 8,
    "num_key_value_heads": 4, "head_dim": 256, "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-6, "attention_bias": False, "query_pre_attn_scalar": 256,
    "sliding_window": 4096, "sliding_window_pattern": 6, "attn_logit_softcapping": None,
    "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
    "use_bidirectional_attention": False}


class ModelConfig:
    """The attention-relevant view of a model's config.json.

    Example:
        >>> mc = ModelConfig.read("path/to/model")  # doctest: +SKIP
        >>> mc.family, mc.layer_type(0), mc.rope_parameters(0)["rope_type"]  # doctest: +SKIP
    """

    def __init__(self, cfg: dict, family: str, model_type: str,
                 prefixes: tuple[str, ...] = (_PREFIX,)) -> None:
        self.cfg, self.family, self.model_type, self.prefixes = cfg, family, model_type, prefixes

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> "ModelConfig":
        p = Path(path)
        if not p.is_dir():
            raise FileNotFoundError(f"from_pretrained: no model directory at {os.fspath(p)!r}")
        f = p / "config.json"
        if not f.is_file():
            raise FileNotFoundError(f"from_pretrained: no config.json in {os.fspath(p)!r}")
        try:
            cfg = json.loads(f.read_text())
        except ValueError as e:
            raise ValueError(f"{f}: not valid JSON: {e}") from None
        if not isinstance(cfg, dict):
            raise ValueError(f"{f}: expected a JSON object, got {type(cfg).__name__}")
        mt = cfg.get("model_type")
        if not isinstance(mt, str) or mt not in MODEL_TYPES:
            raise ValueError(f"from_pretrained: unsupported model_type {mt!r} (architectures "
                             f"{cfg.get('architectures')}); supported: {sorted(MODEL_TYPES)}")
        qc = cfg.get("quantization_config")
        if qc:
            method = qc.get("quant_method", "?") if isinstance(qc, dict) else "?"
            raise ValueError(f"from_pretrained: {f} describes a quantized checkpoint "
                             f"(quant_method {method!r}); only float checkpoints are read")
        prefixes = (_PREFIX,)
        if mt == "gemma3":
            cfg = {**_GEMMA3_TEXT_DEFAULTS,
                   **config_dict(cfg.get("text_config"), f"{f}: text_config")}
            prefixes = ("model.language_model.layers.{i}.self_attn.",
                        "language_model.model.layers.{i}.self_attn.")
        elif mt == "gemma3_text":
            cfg = {**_GEMMA3_TEXT_DEFAULTS, **cfg}
        return cls(cfg, MODEL_TYPES[mt], mt, prefixes)

    # -- plain fields -------------------------------------------------------------------------
    def get(self, key: str, default=None):
        return self.cfg.get(key, default)

    def where(self, key: str) -> str:
        """How errors name a key of this file."""
        return f"config.json ({self.model_type}): {key}"

    def pos_int(self, key: str) -> int:
        return config_int(self.cfg.get(key), self.where(key))

    def opt_pos_int(self, key: str, default: int | None = None) -> int | None:
        """A positive int, or `default` where the key is absent or null."""
        v = config_int(self.cfg.get(key), self.where(key), optional=True)
        return default if v is None else v

    def number(self, key: str, **limits) -> float:
        """A finite number (config_number's limits: positive, minimum)."""
        return config_number(self.cfg.get(key), self.where(key), **limits)

    @property
    def num_layers(self) -> int:
        return self.pos_int("num_hidden_layers")

    def unsupported(self, what: str) -> ValueError:
        return ValueError(f"from_pretrained: {self.model_type} config.json sets {what}, which "
                          f"graphir's attention layers cannot represent")

    # -- per layer ----------------------------------------------------------------------------
    def layer_type(self, i: int) -> str:
        """"sliding_attention" or "full_attention", by transformers' rule for the family."""
        fam, cfg = self.family, self.cfg
        types = cfg.get("layer_types")
        if fam in ("qwen2", "qwen3", "gemma2", "gemma3") and types is not None:
            if not isinstance(types, list) or len(types) != self.num_layers:
                raise ValueError(f"config.json ({self.model_type}): layer_types must list "
                                 f"{self.num_layers} layer types, got {types!r}")
            t = types[i]
        elif fam == "gemma2":
            t = SLIDING if i % 2 == 0 else FULL
        elif fam == "gemma3":
            pattern = config_int(cfg.get("sliding_window_pattern", 6),
                                 self.where("sliding_window_pattern"))
            t = SLIDING if (i + 1) % pattern else FULL
        elif fam in ("qwen2", "qwen3"):
            t = SLIDING if self.sliding_window_size() is not None and i >= config_int(
                cfg.get("max_window_layers", 28), self.where("max_window_layers"), minimum=0) \
                else FULL
        elif fam in ("mistral", "phi3"):
            t = SLIDING if cfg.get("sliding_window") is not None else FULL
        else:
            t = FULL
        if t not in (SLIDING, FULL):
            raise self.unsupported(f"layer_types[{i}] = {t!r} (only {SLIDING!r} and {FULL!r})")
        return t

    def sliding_window_size(self) -> int | None:
        """The window of sliding layers (Qwen's needs use_sliding_window), or None."""
        if self.family in ("qwen2", "qwen3") and not self.cfg.get("use_sliding_window", False):
            return None
        return config_int(self.cfg.get("sliding_window"), self.where("sliding_window"),
                          optional=True)

    def window(self, i: int) -> int | None:
        """The sliding window of layer i, None for full attention."""
        return self.sliding_window_size() if self.layer_type(i) == SLIDING else None

    def rope_parameters(self, i: int) -> dict:
        """Layer i's RoPE parameters with rope_type and rope_theta filled in, and
        original_max_position_embeddings where transformers puts it."""
        cfg, ltype = self.cfg, self.layer_type(i)
        rp = cfg.get("rope_parameters")
        nested = isinstance(rp, dict) and any(k in rp for k in (SLIDING, FULL))
        if nested:
            if not isinstance(rp.get(ltype), dict):
                raise ValueError(f"config.json ({self.model_type}): rope_parameters has no "
                                 f"entry for {ltype!r}")
            rp = dict(rp[ltype])
        elif isinstance(rp, dict) and rp:
            rp = dict(rp)
        elif self.family == "gemma3" and ltype == SLIDING:
            rp = {"rope_type": "default", "rope_theta": cfg.get("rope_local_base_freq", 10_000.0)}
        else:
            rp = config_dict(cfg.get("rope_scaling"), self.where("rope_scaling"))
        rp.setdefault("rope_type", rp.get("type", "default"))
        rp.setdefault("rope_theta", cfg.get("rope_theta", 10_000.0))
        factor = config_number(rp.get("partial_rotary_factor", cfg.get("partial_rotary_factor")),
                               self.where("partial_rotary_factor"), optional=True)
        if factor is not None and factor != 1.0:
            raise self.unsupported(f"partial_rotary_factor = {factor} (RoPE on part of each "
                                   f"head)")
        if rp["rope_type"] in _SCALED:
            if not nested and "original_max_position_embeddings" in cfg:
                rp["original_max_position_embeddings"] = cfg["original_max_position_embeddings"]
            rp.setdefault("original_max_position_embeddings", self.pos_int("max_position_embeddings"))
        return rp
