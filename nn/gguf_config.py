"""What a .gguf file says about one attention block: head counts, sizes, RoPE and norms.

llama.cpp's converter writes the shape in metadata keys `{arch}.attention.head_count`,
`.head_count_kv`, `.key_length`, `.layer_norm_rms_epsilon`, `{arch}.embedding_length`,
`{arch}.rope.freq_base`, `{arch}.rope.scaling.*`, and (Llama 3.1) the tensor `rope_freqs.weight`
of per-frequency divisors. The RoPE pairing follows the architecture: for "llama" the converter
permutes the Q/K rows of each head so that adjacent pairs rotate (interleaved=True); Qwen2/Qwen3
weights are stored as trained and rotate halves (interleaved=False, llama.cpp's NEOX style).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from graphir.device import DeviceRef
from graphir.dtype import DType

from .config_values import config_number
from .gguf_loader import GGUFFile
from .kv_cache import KVCacheParams
from .rotary_embedding import RotaryEmbedding
from .rotary_yarn import DeepseekYarnRopeScalingParams, DeepseekYarnRotaryEmbedding

__all__ = ["GGUF_ARCHITECTURES", "GGUFAttentionConfig", "FreqFactorRotaryEmbedding"]

# architecture -> (RoPE interleaved, has q/k norm). Others are refused by name: their attention
# differs in ways this layer does not express (softcaps, partial rotary, multipliers, ...).
GGUF_ARCHITECTURES: dict[str, tuple[bool, bool]] = {
    "llama": (True, False), "qwen2": (False, False), "qwen2moe": (False, False),
    "qwen3": (False, True), "qwen3moe": (False, True),
}
PROJECTIONS = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}


class FreqFactorRotaryEmbedding(RotaryEmbedding):
    """RotaryEmbedding whose inverse frequencies are divided by per-frequency factors (a GGUF
    file's `rope_freqs.weight`, or a constant for linear scaling), as llama.cpp applies them.

    Example:
        >>> rope = FreqFactorRotaryEmbedding(64, 4, 1e4, 32, freq_factors=np.full(8, 2.0))
    """

    def __init__(self, dim: int, n_heads: int, theta: float, max_seq_len: int,
                 head_dim: int | None = None, interleaved: bool = True, *,
                 freq_factors, device: DeviceRef | None = None) -> None:
        super().__init__(dim, n_heads, theta, max_seq_len, head_dim, interleaved=interleaved,
                         device=device)
        f = np.asarray(freq_factors, dtype=np.float64).reshape(-1)
        if f.shape != (self.head_dim // 2,) or not (np.isfinite(f).all() and (f > 0).all()):
            raise ValueError(f"FreqFactorRotaryEmbedding: freq_factors must be "
                             f"{self.head_dim // 2} finite positive values, got {f.shape[0]}")
        self.freq_factors = f

    def compute_inv_freqs(self) -> np.ndarray:
        i2 = np.arange(0, self.head_dim, 2, dtype=np.float64)
        return (1.0 / self.theta ** (i2 / self.head_dim) / self.freq_factors).astype(np.float32)


def _positive_int(key: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
        raise ValueError(f"GGUF metadata {key} must be a positive int, got {v!r}")
    return int(v)


def _number(key: str, v: Any, **limits) -> float:
    """A metadata value as a finite float (config_number's limits: positive, minimum)."""
    return config_number(v, f"GGUF metadata {key}", **limits)


@dataclass(frozen=True)
class GGUFAttentionConfig:
    """One attention block as a .gguf file describes it (see the module docstring).

    Example:
        >>> cfg = GGUFAttentionConfig.from_file(read_gguf("qwen2.gguf"), layer=0)  # doctest: +SKIP
        >>> cfg.interleaved, cfg.has_bias, cfg.encodings["v_proj"]  # doctest: +SKIP
        (False, True, 'Q6_K')
    """

    architecture: str
    num_attention_heads: int
    num_key_value_heads: int
    hidden_size: int
    head_dim: int
    num_layers: int
    context_length: int
    rope_theta: float
    interleaved: bool
    rms_norm_eps: float
    has_bias: bool
    use_qk_norm: bool
    encodings: dict[str, str] = field(default_factory=dict)
    rope_scaling: str | None = None  # None, "linear", "yarn" or "freq_factors"
    rope_scaling_factor: float = 1.0
    rope_original_context: int | None = None
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    freq_factors: np.ndarray | None = None
    sliding_window: int | None = None

    @classmethod
    def from_file(cls, f: GGUFFile, layer: int) -> "GGUFAttentionConfig":
        """Read block `layer`'s attention settings from a parsed file.

        Raises:
            ValueError: an architecture outside GGUF_ARCHITECTURES, missing or inconsistent
                metadata, partial rotary, unequal key / value head sizes, an unknown RoPE
                scaling type, or a missing attention tensor.
        """
        md: Mapping[str, Any] = f.metadata
        arch = md.get("general.architecture")
        if not isinstance(arch, str) or arch not in GGUF_ARCHITECTURES:
            raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: "
                             f"{sorted(GGUF_ARCHITECTURES)}")
        interleaved, qk_norm = GGUF_ARCHITECTURES[arch]

        def get(key: str, default: Any = ...) -> Any:
            full = f"{arch}.{key}"
            if full not in md:
                if default is ...:
                    raise ValueError(f"GGUF metadata has no {full!r}")
                return default
            v = md[full]
            if isinstance(v, list):  # per-layer values (e.g. head counts varying by block)
                if not 0 <= layer < len(v):
                    raise ValueError(f"GGUF metadata {full} has {len(v)} entries, no layer {layer}")
                v = v[layer]
            return v

        n_layers = _positive_int(f"{arch}.block_count", get("block_count"))
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers:
            raise ValueError(f"layer must be an int in [0, {n_layers}), got {layer!r}")
        nh = _positive_int(f"{arch}.attention.head_count", get("attention.head_count"))
        nkv = _positive_int(f"{arch}.attention.head_count_kv", get("attention.head_count_kv", nh))
        hidden = _positive_int(f"{arch}.embedding_length", get("embedding_length"))
        d = _positive_int(f"{arch}.attention.key_length",
                          get("attention.key_length", hidden // nh))
        dv = _positive_int(f"{arch}.attention.value_length", get("attention.value_length", d))
        if dv != d:
            raise ValueError(f"GGUF {arch}: key_length {d} differs from value_length {dv}; "
                             f"the layer needs one head size")
        rot = _positive_int(f"{arch}.rope.dimension_count", get("rope.dimension_count", d))
        if rot != d:
            raise ValueError(f"GGUF {arch}: rope.dimension_count {rot} differs from the head "
                             f"size {d} (partial rotary is not supported)")
        blk = f"blk.{layer}."
        encodings = {}
        for ours, theirs in PROJECTIONS.items():
            encodings[ours] = f.tensor(f"{blk}{theirs}.weight", ours).encoding
        bias = [f"{blk}{PROJECTIONS[p]}.bias" in f.tensors for p in ("q_proj", "k_proj", "v_proj")]
        if any(bias) and not all(bias):
            raise ValueError(f"GGUF block {layer}: biases on only some of q/k/v ({bias}); the "
                             f"layer takes all three or none")
        if f"{blk}attn_output.bias" in f.tensors:
            raise ValueError(f"GGUF block {layer}: attn_output.bias is not supported")
        window = get("attention.sliding_window", None)
        if window is not None and window != 0:      # llama.cpp writes 0 for none
            window = _positive_int(f"{arch}.attention.sliding_window", window)
        return cls(
            architecture=arch, num_attention_heads=nh, num_key_value_heads=nkv,
            hidden_size=hidden, head_dim=d, num_layers=n_layers,
            context_length=_positive_int(f"{arch}.context_length", get("context_length", 4096)),
            rope_theta=_number(f"{arch}.rope.freq_base", get("rope.freq_base", 10000.0),
                               positive=True), interleaved=interleaved,
            rms_norm_eps=_number(f"{arch}.attention.layer_norm_rms_epsilon",
                                 get("attention.layer_norm_rms_epsilon", 1e-6), minimum=0.0),
            has_bias=all(bias), use_qk_norm=qk_norm, encodings=encodings,
            sliding_window=window or None,
            **_rope_scaling(f, arch, get, d))

    # -- what the layer is built from ------------------------------------------------------------
    def rotary_embedding(self, max_seq_len: int | None = None,
                         device: DeviceRef | None = None) -> RotaryEmbedding:
        """The RoPE table this block uses (max_seq_len defaults to the context length)."""
        n = self.context_length if max_seq_len is None else max_seq_len
        args = (self.hidden_size, self.num_attention_heads, self.rope_theta, n, self.head_dim)
        if self.rope_scaling == "yarn":
            params = DeepseekYarnRopeScalingParams(
                self.rope_scaling_factor, self.rope_original_context, self.yarn_beta_fast,
                self.yarn_beta_slow, mscale=1.0, mscale_all_dim=0.0)
            return DeepseekYarnRotaryEmbedding(*args, interleaved=self.interleaved,
                                               scaling_params=params, device=device)
        if self.rope_scaling in ("linear", "freq_factors"):
            factors = self.freq_factors if self.rope_scaling == "freq_factors" else \
                np.full(self.head_dim // 2, self.rope_scaling_factor)
            return FreqFactorRotaryEmbedding(*args, interleaved=self.interleaved,
                                             freq_factors=factors, device=device)
        return RotaryEmbedding(*args, interleaved=self.interleaved, device=device)

    def kv_params(self, *, dtype: DType = DType.float32, page_size: int = 128,
                  devices: tuple[DeviceRef, ...] | None = None) -> KVCacheParams:
        """Paged KV-cache parameters for this model (all of its blocks)."""
        return KVCacheParams(dtype=dtype, n_kv_heads=self.num_key_value_heads,
                             head_dim=self.head_dim, num_layers=self.num_layers,
                             page_size=page_size, devices=devices or (DeviceRef.CPU(),))


def _rope_scaling(f: GGUFFile, arch: str, get, head_dim: int) -> dict[str, Any]:
    kind = str(get("rope.scaling.type", "none")).lower()
    factors = f.tensors.get("rope_freqs.weight")
    if factors is not None:
        if kind not in ("none", "llama3"):
            raise ValueError(f"GGUF {arch}: rope_freqs.weight together with rope scaling "
                             f"{kind!r} is ambiguous")
        vals = np.asarray(factors.data, dtype=np.float64).reshape(-1)
        if vals.shape != (head_dim // 2,):
            raise ValueError(f"GGUF {arch}: rope_freqs.weight has {vals.size} values, the head "
                             f"size {head_dim} needs {head_dim // 2}")
        return {"rope_scaling": "freq_factors", "freq_factors": vals}
    if kind == "none":
        return {}
    factor = _number(f"{arch}.rope.scaling.factor", get("rope.scaling.factor", 1.0),
                     positive=True)
    if kind == "linear":
        return {"rope_scaling": "linear", "rope_scaling_factor": factor}
    if kind == "yarn":
        # Magnitude 0.1 ln(factor) + 1 and a full ramp (ext_factor 1; -1 means "default").
        for key, allowed in (("rope.scaling.attn_factor", (1.0,)),
                             ("rope.scaling.yarn_attn_factor", (1.0,)),
                             ("rope.scaling.yarn_ext_factor", (1.0, -1.0)),
                             ("rope.scaling.yarn_log_multiplier", (0.0,))):
            v = get(key, allowed[0])
            if _number(f"{arch}.{key}", v) not in allowed:
                raise ValueError(f"GGUF {arch}: {arch}.{key}={v} is not supported (YaRN with "
                                 f"the default magnitude and ramp only)")
        orig = _positive_int(f"{arch}.rope.scaling.original_context_length",
                             get("rope.scaling.original_context_length"))
        return {"rope_scaling": "yarn", "rope_scaling_factor": factor,
                "rope_original_context": orig,
                "yarn_beta_fast": _number(f"{arch}.rope.scaling.yarn_beta_fast",
                                          get("rope.scaling.yarn_beta_fast", 32.0), positive=True),
                "yarn_beta_slow": _number(f"{arch}.rope.scaling.yarn_beta_slow",
                                          get("rope.scaling.yarn_beta_slow", 1.0), positive=True)}
    raise ValueError(f"GGUF {arch}: rope.scaling.type {kind!r} is not supported; supported: "
                     f"none, linear, yarn, or a rope_freqs.weight tensor")
