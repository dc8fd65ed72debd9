"""Layers with MAX's names (max.nn): Module, Linear, RMSNorm, RotaryEmbedding, the paged KV
cache values and the attention family.

Example:
    >>> from graphir.nn import AttentionWithRope, KVCacheParams, PagedCacheValues, RotaryEmbedding
"""
from .attention import (AttentionWithRope, AttentionWithRopeNoOpaque,
                        DataParallelAttentionWithRope, MHAMaskVariant,
                        TensorParallelAttentionWithRope, distribute_value)
from .float8_config import (Float8Config, Float8InputScaleSpec, Float8ScaleGranularity,
                            Float8ScaleOrigin, Float8WeightScaleSpec)
from .kv_cache import KVCacheParams, KVCacheStrategy, PagedCacheValues
from .linear import Linear
from .module import Module
from .norm import RMSNorm
from .rotary_embedding import (Llama3RopeScalingParams, Llama3RotaryEmbedding, LinearScalingParams,
                               LongRoPERotaryEmbedding, LongRoPEScalingParams, RotaryEmbedding)
from .sharding import ShardingStrategy

__all__ = ["AttentionWithRope", "AttentionWithRopeNoOpaque", "DataParallelAttentionWithRope",
           "TensorParallelAttentionWithRope", "MHAMaskVariant", "distribute_value",
           "Float8Config", "Float8InputScaleSpec", "Float8ScaleGranularity", "Float8ScaleOrigin",
           "Float8WeightScaleSpec", "KVCacheParams", "KVCacheStrategy", "PagedCacheValues",
           "Linear", "Module", "RMSNorm", "Llama3RopeScalingParams", "Llama3RotaryEmbedding",
           "RotaryEmbedding", "ShardingStrategy", "LinearScalingParams", "LongRoPEScalingParams",
           "LongRoPERotaryEmbedding", "YarnScalingParams", "YarnRotaryEmbedding", "from_pretrained"]
from .attention import LatentAttentionWithRope, MLAPrefillMetadata, TensorParallelLatentAttentionWithRope  # noqa: E402,F401
from .rotary_yarn import (DeepseekYarnRopeScalingParams, DeepseekYarnRotaryEmbedding,  # noqa: E402,F401
                          YarnRotaryEmbedding, YarnScalingParams)
from .linear_quant import GGUFQLinear, GPTQLinear, load_safetensors  # noqa: E402
from .attention import GGUFQAttentionWithRope, GPTQAttentionWithRope  # noqa: E402
from .pretrained import from_pretrained  # noqa: E402
