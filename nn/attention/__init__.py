"""Attention layers (max.nn.attention): AttentionWithRope and its parallel and no-opaque forms."""
from .attention_with_rope import AttentionWithRope
from .mask_config import MHAMaskVariant
from .no_opaque import AttentionWithRopeNoOpaque
from .parallel import (DataParallelAttentionWithRope, TensorParallelAttentionWithRope,
                       distribute_value)

__all__ = ["AttentionWithRope", "AttentionWithRopeNoOpaque", "DataParallelAttentionWithRope",
           "TensorParallelAttentionWithRope", "MHAMaskVariant", "distribute_value"]
from .latent_attention import LatentAttentionWithRope, MLAPrefillMetadata  # noqa: E402
from .latent_attention_parallel import TensorParallelLatentAttentionWithRope  # noqa: E402
from .gguf_attention import GGUFQAttentionWithRope  # noqa: E402
from .gptq_attention import GPTQAttentionWithRope  # noqa: E402
