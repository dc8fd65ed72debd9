"""Multi-device attention: tensor parallel (heads split, all-reduce) and data parallel
(replicas, batch split), plus distribute_value."""
from __future__ import annotations

import inspect
from typing import Sequence

from graphir import ops
from graphir.device import DeviceRef
from graphir.value import TensorValue, as_tensor
from graphir.ops.attention import layer_index

from ..float8_config import Float8Config
from .attention_with_rope import AttentionWithRope
from .checks import check_per_device
from .sharded import ParallelShards


def _quant_config_alias(cls: str, kwargs: dict) -> None:
    """`quant_config` (the seed's name) into `float8_config` (the older name, kept as an alias)."""
    if "quant_config" not in kwargs:
        return
    qc = kwargs.pop("quant_config")
    old = kwargs.get("float8_config")
    if qc is not None and old is not None and old != qc:
        raise ValueError(f"{cls}: quant_config and float8_config (its older name) are both given "
                         f"and differ; pass one")
    if qc is not None and not isinstance(qc, Float8Config):
        raise ValueError(f"{cls}: quant_config must be a Float8Config, got {type(qc).__name__} "
                         f"(GPTQ and GGUF layers have their own classes and do not shard)")
    if qc is not None:
        kwargs["float8_config"] = qc


def distribute_value(v, devices: Sequence[DeviceRef]) -> list[TensorValue]:
    """v transferred to each device (one value per device).

    Example:
        >>> freqs = distribute_value(rope.freqs_cis, [DeviceRef.CPU(0), DeviceRef.CPU(1)])
    """
    v = as_tensor(v)
    return [v.to(d) for d in devices]


def _parallel_signature() -> inspect.Signature:
    """AttentionWithRope's keywords less the sharding strategy (each form picks its own) and
    the private ones, plus the seed's `quant_config`: what help() and an IDE show for the
    parallel forms, whose __init__ takes **kwargs."""
    ps = [p for n, p in inspect.signature(AttentionWithRope.__init__).parameters.items()
          if n != "sharding_strategy" and not n.startswith("_")]
    at = next(i for i, p in enumerate(ps) if p.name == "float8_config")
    ps.insert(at, inspect.Parameter("quant_config", inspect.Parameter.KEYWORD_ONLY,
                                    default=None, annotation="Float8Config | None"))
    return inspect.Signature(ps, return_annotation=None)


_SIGNATURE = _parallel_signature()
_PUBLIC = sorted(_SIGNATURE.parameters)
# the private ones (_fuse_rope_and_store) are taken too, and sharding_strategy refused by name
_KEYWORDS = frozenset(inspect.signature(AttentionWithRope.__init__).parameters) - {"self"} \
    | {"quant_config"}


class _Replicated(ParallelShards, AttentionWithRope):
    """Shared by the parallel forms: full weights here, per-device modules in `_shards`."""

    _shards: list[AttentionWithRope]
    _min_devices = 1

    def __init__(self, *, strategy: str, **kwargs) -> None:
        cls = type(self).__name__
        unknown = sorted(set(kwargs) - _KEYWORDS)
        if unknown:     # named here: AttentionWithRope's TypeError would name the wrong class
            raise TypeError(f"{cls}() got unexpected keyword arguments {unknown}; it takes "
                            f"{_PUBLIC}")
        if kwargs.get("sharding_strategy") is not None:
            raise ValueError(f"{cls} picks its own sharding_strategy")
        _quant_config_alias(cls, kwargs)
        super().__init__(**kwargs)
        self._make_shards(strategy, self._min_devices)

    @property
    def quant_config(self) -> Float8Config | None:
        """The quantization config (the seed's name for `float8_config`)."""
        return self.float8_config

    def _per_device(self, layer_idx, xs, kv_collections, freqs_cis, input_row_offsets):
        cls, n = type(self).__name__, len(self._shards)
        check_per_device(cls, n, x=xs, kv_collections=kv_collections, freqs_cis=freqs_cis,
                         input_row_offsets=input_row_offsets)
        layer = layer_index(layer_idx)
        outs = []
        for m, x, kv, f, offs in zip(self._shards, xs, kv_collections, freqs_cis,
                                     input_row_offsets):
            m._fuse_rope_and_store = self._fuse_rope_and_store
            outs.append(m(layer, x, kv, f, offs))
        return outs

    def materialize_kv_from_hidden(self, layer_idx, hiddens, kv_collections, freqs_cis,
                                   input_row_offsets) -> None:
        n = len(self._shards)
        check_per_device(type(self).__name__, n, hiddens=hiddens,
                         kv_collections=kv_collections, freqs_cis=freqs_cis,
                         input_row_offsets=input_row_offsets)
        for m, x, kv, f, offs in zip(self._shards, hiddens, kv_collections, freqs_cis,
                                     input_row_offsets):
            m._fuse_rope_and_store = self._fuse_rope_and_store
            m.materialize_kv_from_hidden(layer_idx, x, kv, f, offs)


class TensorParallelAttentionWithRope(_Replicated):
    """Heads split over devices (Q/K/V rows by head, o_proj columns by head), then an all-reduce.

    KV heads are split too; when the device count does not divide n_kv_heads (but is a multiple
    of it) each KV head is replicated on the devices whose query heads read it. Each device has
    its own paged cache of `kv_params.n_kv_heads_per_device` heads.

    Example:
        >>> tp = TensorParallelAttentionWithRope(..., devices=[DeviceRef.CPU(0), DeviceRef.CPU(1)])
        >>> outs = tp(0, xs, kv_collections, distribute_value(rope.freqs_cis, devs), offsets)
    """

    _min_devices = 2

    def __init__(self, **kwargs) -> None:
        super().__init__(strategy="tensor_parallel", **kwargs)

    __init__.__signature__ = _SIGNATURE

    @property
    def list_of_attentions(self) -> list[AttentionWithRope]:
        return list(self._shards)

    def __call__(self, layer_idx, x: Sequence, kv_collections: Sequence, freqs_cis: Sequence,
                 input_row_offsets: Sequence, signal_buffers: Sequence | None = None) -> list:
        """One output per device (all equal: the all-reduced sum of the partial projections)."""
        outs = self._per_device(layer_idx, x, kv_collections, freqs_cis, input_row_offsets)
        return ops.allreduce(outs, signal_buffers)


class DataParallelAttentionWithRope(_Replicated):
    """Full replicas; device i runs its own batch slice (row offsets rebased to 0) on its own
    cache. No collective.

    Example:
        >>> dp = DataParallelAttentionWithRope(..., devices=[DeviceRef.CPU(0), DeviceRef.CPU(1)])
        >>> outs = dp(0, xs, kv_collections, freqs_list, offsets_list)
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(strategy="replicate", **kwargs)

    __init__.__signature__ = _SIGNATURE

    @property
    def replicated_attentions(self) -> list[AttentionWithRope]:
        return list(self._shards)

    def __call__(self, layer_idx, x: Sequence, kv_collections: Sequence, freqs_cis: Sequence,
                 input_row_offsets: Sequence) -> list:
        """One output per device, for that device's rows."""
        return self._per_device(layer_idx, x, kv_collections, freqs_cis, input_row_offsets)
