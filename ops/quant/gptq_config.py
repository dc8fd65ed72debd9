"""QuantizationConfig: the GPTQ parameters of a checkpoint, read from its JSON files.

A GPTQ checkpoint states them in `quantize_config.json` (AutoGPTQ / GPTQModel) or in
`config.json["quantization_config"]` (Hugging Face transformers / optimum). Only the keys that
change how the tensors decode matter here (quant_method, bits, group_size, desc_act, sym,
checkpoint_format); formats whose tensors are laid out differently (Marlin, BitBLAS, AWQ) are
refused by name rather than misread.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Mapping

from .gptq import GPTQ_BITS, GPTQ_CHECKPOINT_FORMATS, resolve_group_size

__all__ = ["QuantizationConfig"]


@dataclass(frozen=True)
class QuantizationConfig:
    """GPTQ parameters (MAX's QuantizationConfig), read off a checkpoint's quantize_config.

    Args:
        quant_method: "gptq".
        bits: 4 or 8.
        group_size: input rows per scale group; -1 for one group over all inputs.
        desc_act: activation order: the checkpoint's g_idx is a permutation of groups.
        sym: symmetric (zero point 2**(bits-1), no qzeros) or asymmetric (qzeros per group and
            column).
        checkpoint_format: "gptq" (AutoGPTQ v1: stored zeros are zero - 1) or "gptq_v2".

    Example:
        >>> QuantizationConfig.from_dict({"bits": 8, "group_size": 32, "desc_act": False}).bits
        8
    """

    quant_method: str = "gptq"
    bits: int = 4
    group_size: int = 128
    desc_act: bool = False
    sym: bool = True
    checkpoint_format: str = "gptq"

    def __post_init__(self):
        if self.quant_method != "gptq":
            raise ValueError(f"QuantizationConfig: quant_method must be 'gptq', got "
                             f"{self.quant_method!r}")
        if isinstance(self.bits, bool) or self.bits not in GPTQ_BITS:
            raise ValueError(f"QuantizationConfig: bits must be one of {GPTQ_BITS} (4- and "
                             f"8-bit GPTQ), got bits={self.bits!r}")
        g = self.group_size
        if isinstance(g, bool) or not isinstance(g, int) or (g <= 0 and g != -1):
            raise ValueError(f"QuantizationConfig: group_size must be a positive int or -1, "
                             f"got {g!r}")
        for name in ("desc_act", "sym"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"QuantizationConfig: {name} must be a bool, got "
                                 f"{getattr(self, name)!r}")
        if self.checkpoint_format not in GPTQ_CHECKPOINT_FORMATS:
            raise ValueError(f"QuantizationConfig: checkpoint_format must be one of "
                             f"{GPTQ_CHECKPOINT_FORMATS}, got {self.checkpoint_format!r}")

    def groups(self, in_features: int) -> int:
        """Number of scale groups over `in_features` inputs (validates divisibility)."""
        return in_features // resolve_group_size(self.group_size, in_features)

    @property
    def pack_factor(self) -> int:
        """Codes per int32 of qweight / qzeros: 8 for 4-bit, 4 for 8-bit."""
        return 32 // self.bits

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "QuantizationConfig":
        """From a quantize_config.json / quantization_config mapping.

        Unknown keys (damp_percent, true_sequential, use_exllama, ...) do not change how the
        tensors decode and are ignored.

        Raises:
            ValueError: not GPTQ (e.g. AWQ), Marlin / BitBLAS packing, per-module overrides
                ("dynamic"), a pack dtype other than int32, or an unsupported value.
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"QuantizationConfig.from_dict: expected a mapping, got "
                             f"{type(d).__name__}")
        method = str(d.get("quant_method", "gptq")).lower()
        if method != "gptq":
            raise ValueError(f"quantization config: quant_method {method!r} is not GPTQ")
        if d.get("is_marlin_format"):
            raise ValueError("quantization config: Marlin-packed GPTQ tensors are not supported; "
                             "use a checkpoint in the gptq format")
        fmt = str(d.get("checkpoint_format") or d.get("format") or "gptq").lower()
        if fmt not in GPTQ_CHECKPOINT_FORMATS:
            raise ValueError(f"quantization config: checkpoint_format {fmt!r} is not supported; "
                             f"supported: {list(GPTQ_CHECKPOINT_FORMATS)}")
        if d.get("dynamic"):
            raise ValueError("quantization config: per-module overrides ('dynamic') are not "
                             "supported")
        pack = d.get("pack_dtype")
        if pack is not None and str(pack).replace("torch.", "") != "int32":
            raise ValueError(f"quantization config: pack_dtype {pack!r} is not supported "
                             f"(qweight must be int32)")
        missing = [k for k in ("bits", "group_size") if k not in d]
        if missing:
            raise ValueError(f"quantization config: missing {missing}")
        desc_act, sym = d.get("desc_act"), d.get("sym")  # null means the tools' default
        return cls(quant_method="gptq", bits=d["bits"], group_size=d["group_size"],
                   desc_act=False if desc_act is None else desc_act,
                   sym=True if sym is None else sym, checkpoint_format=fmt)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> "QuantizationConfig":
        """From a checkpoint directory (its quantize_config.json, else config.json's
        "quantization_config") or one of those JSON files.

        Example:
            >>> cfg = QuantizationConfig.from_pretrained("Qwen2.5-0.5B-GPTQ-Int8")  # doctest: +SKIP
        """
        p = os.fspath(path)
        if os.path.isdir(p):
            files = [os.path.join(p, n) for n in ("quantize_config.json", "config.json")]
            found = [f for f in files if os.path.isfile(f)]
            if not found:
                raise FileNotFoundError(f"{p}: no quantize_config.json or config.json")
            p = found[0]
        elif not os.path.isfile(p):
            raise FileNotFoundError(f"no quantization config at {p!r}")
        with open(p, encoding="utf-8") as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}: not valid JSON: {e}") from None
        if isinstance(d, dict) and "quantization_config" in d:
            d = d["quantization_config"]
        elif isinstance(d, dict) and os.path.basename(p) == "config.json":
            raise ValueError(f"{p}: no 'quantization_config' (not a quantized checkpoint?)")
        try:
            return cls.from_dict(d)
        except ValueError as e:
            raise ValueError(f"{p}: {e}") from None
