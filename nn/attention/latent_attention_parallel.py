"""TensorParallelLatentAttentionWithRope: latent attention with its heads split over devices."""
from __future__ import annotations

from typing import Sequence

import ops
from graphir.weight import Weight
from ops.attention import layer_index

from ..sharding import ShardingStrategy
from .latent_attention import LatentAttentionWithRope


class TensorParallelLatentAttentionWithRope(LatentAttentionWithRope):
    """Heads split over devices (q / kv_b rows, o_proj columns), kv_a and the norms replicated,
    then an all-reduce. Every device has its own full copy of the latent cache (each writes the
    same rows), so a device's cache and metadata are those of the single-device layer.

    Example:
        >>> tp = TensorParallelLatentAttentionWithRope(..., devices=[DeviceRef.CPU(0), DeviceRef.CPU(1)])
        >>> outs = tp(0, xs, kv_collections, distribute_value(rope.freqs_cis, devs), offsets)
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        n = len(self.devices)
        if n < 2:
            raise ValueError(f"{type(self).__name__}: needs at least 2 devices, got {n}")
        self.sharding_strategy = ShardingStrategy.tensor_parallel(n)
        object.__setattr__(self, "_shards", self.shard(self.devices))

    def _extra_weights(self) -> dict[str, Weight]:
        out = {}
        for m in self._shards:
            out.update(m.raw_state_dict())
        return out

    @property
    def list_of_attentions(self) -> list[LatentAttentionWithRope]:
        return list(self._shards)

    def __call__(self, layer_idx, x: Sequence, kv_collections: Sequence, freqs_cis: Sequence,
                 input_row_offsets: Sequence, signal_buffers: Sequence | None = None) -> list:
        """One output per device (all equal: the all-reduced sum of the partial projections)."""
        n = len(self._shards)
        for name, v in (("x", x), ("kv_collections", kv_collections), ("freqs_cis", freqs_cis),
                        ("input_row_offsets", input_row_offsets)):
            if not isinstance(v, (list, tuple)) or len(v) != n:
                got = len(v) if isinstance(v, (list, tuple)) else type(v).__name__
                raise ValueError(f"{type(self).__name__}: {name} must be a list with one entry "
                                 f"per device ({n}), got {got}")
        layer = layer_index(layer_idx)
        outs = [m(layer, xi, kv, f, offs) for m, xi, kv, f, offs
                in zip(self._shards, x, kv_collections, freqs_cis, input_row_offsets)]
        return ops.allreduce(outs, signal_buffers)
