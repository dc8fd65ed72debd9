"""Argument checks shared by the attention layers, so that every layer words an error alike."""
from __future__ import annotations

from graphir.device import DeviceRef
from graphir.value import TensorValue, as_tensor

from ..config_values import config_number
from ..kv_cache import KVCacheParams, PagedCacheValues
from ..rotary_embedding import RotaryEmbedding


def positive_int(cls: str, name: str, v) -> int:
    """v itself when it is a positive int (bool excluded), else a ValueError naming `name`."""
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{cls}: {name} must be a positive int, got {v!r}")
    return v


def real_number(cls: str, name: str, v, *, optional: bool = True) -> float | None:
    """v as a finite float (None passes when `optional`), else a ValueError naming `name`: a
    string or list here used to fail later in a comparison that named nothing, and NaN passed
    (its outputs NaN)."""
    return config_number(v, f"{cls}: {name}", optional=optional)


def check_rope_and_kv_params(cls: str, rope, kv_params) -> None:
    """rope must be a RotaryEmbedding and kv_params a KVCacheParams."""
    if not isinstance(rope, RotaryEmbedding):
        raise ValueError(f"{cls}: rope must be a RotaryEmbedding, got {type(rope).__name__}")
    if not isinstance(kv_params, KVCacheParams):
        raise ValueError(f"{cls}: kv_params must be KVCacheParams, got {kv_params!r}")


def check_head_counts(cls: str, num_attention_heads, num_key_value_heads,
                      hidden_size) -> tuple[int, int, int]:
    """(n_heads, n_kv_heads, hidden_size), each positive, n_heads a multiple of n_kv_heads."""
    nh = positive_int(cls, "num_attention_heads", num_attention_heads)
    nkv = positive_int(cls, "num_key_value_heads", num_key_value_heads)
    hidden = positive_int(cls, "hidden_size", hidden_size)
    if nh % nkv:
        raise ValueError(f"{cls}: num_attention_heads {nh} is not divisible by "
                         f"num_key_value_heads {nkv}")
    return nh, nkv, hidden


def as_cache(kv_collection) -> PagedCacheValues:
    """kv_collection as PagedCacheValues (it may come as a 3- or 4-tuple of cache values)."""
    if isinstance(kv_collection, PagedCacheValues):
        return kv_collection
    if isinstance(kv_collection, (list, tuple)) and len(kv_collection) in (3, 4):
        return PagedCacheValues(*kv_collection)
    raise ValueError(f"kv_collection must be PagedCacheValues(kv_blocks, cache_lengths, "
                     f"lookup_table, max_lengths), got {kv_collection!r}")


def check_devices(cls: str, devices) -> list[DeviceRef]:
    """devices as a non-empty list of DeviceRef ([CPU] for None)."""
    try:
        devs = [DeviceRef.CPU()] if devices is None else list(devices)
    except TypeError:
        devs = []
    if not devs or not all(isinstance(d, DeviceRef) for d in devs):
        raise ValueError(f"{cls}: devices must be a non-empty list of DeviceRef, got {devices!r}")
    return devs


def check_x(cls: str, x, hidden_size: int) -> TensorValue:
    """x as a TensorValue of shape [total_seq_len, hidden_size]."""
    x = as_tensor(x)
    if x.rank != 2 or x.shape[1] != hidden_size:
        raise ValueError(f"{cls}: x must be [total_seq_len, {hidden_size}], got "
                         f"{list(map(str, x.shape))}")
    return x


def check_per_device(cls: str, n: int, **lists) -> None:
    """Each keyword argument must be a list or tuple of n entries, one per device."""
    for name, v in lists.items():
        if not isinstance(v, (list, tuple)) or len(v) != n:
            got = len(v) if isinstance(v, (list, tuple)) else type(v).__name__
            raise ValueError(f"{cls}: {name} must be a list with one entry per device ({n}), "
                             f"got {got}")
