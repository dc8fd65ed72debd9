"""TensorParallelLatentAttentionWithRope: latent attention with its heads split over devices."""
from __future__ import annotations

from typing import Sequence

from graphir import ops
from graphir.ops.attention import layer_index

from .checks import check_per_device
from .latent_attention import LatentAttentionWithRope
from .sharded import ParallelShards


class TensorParallelLatentAttentionWithRope(ParallelShards, LatentAttentionWithRope):
    """Heads split over devices (q / kv_b rows, o_proj columns), kv_a and the norms replicated,
    then an all-reduce. Every device has its own full copy of the latent cache (each writes the
    same rows), so a device's cache and metadata are those of the single-device layer.

    Example:
        >>> tp = TensorParallelLatentAttentionWithRope(..., devices=[DeviceRef.CPU(0), DeviceRef.CPU(1)])
        >>> outs = tp(0, xs, kv_collections, distribute_value(rope.freqs_cis, devs), offsets)
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._make_shards("tensor_parallel", min_devices=2)

    @property
    def list_of_attentions(self) -> list[LatentAttentionWithRope]:
        return list(self._shards)

    def __call__(self, layer_idx, x: Sequence, kv_collections: Sequence, freqs_cis: Sequence,
                 input_row_offsets: Sequence, signal_buffers: Sequence | None = None) -> list:
        """One output per device (all equal: the all-reduced sum of the partial projections)."""
        check_per_device(type(self).__name__, len(self._shards), x=x,
                         kv_collections=kv_collections, freqs_cis=freqs_cis,
                         input_row_offsets=input_row_offsets)
        layer = layer_index(layer_idx)
        outs = [m(layer, xi, kv, f, offs) for m, xi, kv, f, offs
                in zip(self._shards, x, kv_collections, freqs_cis, input_row_offsets)]
        return ops.allreduce(outs, signal_buffers)
