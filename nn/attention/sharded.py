"""The sharding plumbing shared by the attention layers: the `sharding_strategy` property with
the checks `shard` starts from, and the parallel layers' per-device shards."""
from __future__ import annotations

from typing import Sequence

from graphir.device import DeviceRef
from graphir.weight import Weight

from ..module import Module
from ..sharding import ShardingStrategy
from .checks import check_devices


class ShardableAttention(Module):
    """A layer with MAX's `sharding_strategy` property; subclasses check tensor parallel splits
    in `_check_tensor_parallel` and build their shards in `shard`."""

    _sharding_strategy: ShardingStrategy | None = None

    @property
    def sharding_strategy(self) -> ShardingStrategy | None:
        """The Module sharding strategy (replicate or tensor_parallel)."""
        return self._sharding_strategy

    @sharding_strategy.setter
    def sharding_strategy(self, strategy: ShardingStrategy) -> None:
        if not isinstance(strategy, ShardingStrategy):
            raise ValueError(f"sharding_strategy must be a ShardingStrategy, got {strategy!r}")
        if strategy.is_tensor_parallel:
            self._check_tensor_parallel(strategy.num_devices)
        self._sharding_strategy = strategy

    def _check_tensor_parallel(self, num_devices: int) -> None:
        """Raise a ValueError when the layer cannot be split over num_devices."""

    def _shard_strategy(self, devices: Sequence[DeviceRef]) -> tuple[ShardingStrategy,
                                                                      list[DeviceRef]]:
        """(the strategy set, the checked devices) for `shard(devices)`."""
        strategy = self._sharding_strategy
        if strategy is None:
            raise ValueError(f"{type(self).__name__}.shard: set sharding_strategy first")
        devices = check_devices(type(self).__name__, devices)
        if len(devices) != strategy.num_devices:
            raise ValueError(f"shard: {len(devices)} devices for a strategy over "
                             f"{strategy.num_devices}")
        return strategy, devices


class ParallelShards:
    """Mixin of the multi-device layers: full weights on the layer, one module per device in
    `_shards` (kept out of the Module tree, so its weights are reported as extra weights)."""

    _shards: list

    def _make_shards(self, strategy: str, min_devices: int) -> None:
        n = len(self.devices)
        if n < min_devices:
            raise ValueError(f"{type(self).__name__}: needs at least {min_devices} devices, "
                             f"got {n}")
        self.sharding_strategy = getattr(ShardingStrategy, strategy)(n)
        object.__setattr__(self, "_shards", self.shard(self.devices))

    def _extra_weights(self) -> dict[str, Weight]:
        out = {}
        for m in self._shards:
            out.update(m.raw_state_dict())
        return out
