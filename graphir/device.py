"""Devices a value lives on."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceRef:
    """A device: `DeviceRef.CPU()`, `DeviceRef.GPU(1)`. Prints as `cpu:0` / `gpu:1`."""

    device_type: str
    id: int = 0

    def __post_init__(self):
        if self.device_type not in ("cpu", "gpu"):
            raise ValueError(f"device type must be 'cpu' or 'gpu', got {self.device_type!r}")
        if isinstance(self.id, bool) or not isinstance(self.id, int) or not 0 <= self.id < 2**20:
            raise ValueError(f"device id must be an int in [0, 2**20), got {self.id!r}")

    @staticmethod
    def CPU(id: int = 0) -> "DeviceRef":
        return DeviceRef("cpu", id)

    @staticmethod
    def GPU(id: int = 0) -> "DeviceRef":
        return DeviceRef("gpu", id)

    def is_cpu(self) -> bool:
        return self.device_type == "cpu"

    def is_gpu(self) -> bool:
        return self.device_type == "gpu"

    def __str__(self) -> str:
        return f"{self.device_type}:{self.id}"

    def __repr__(self) -> str:
        return f"DeviceRef.{self.device_type.upper()}({self.id})"

    @staticmethod
    def coerce(value) -> "DeviceRef":
        """A DeviceRef from a DeviceRef, "cpu"/"gpu" (id 0) or "cpu:N"/"gpu:N"."""
        if isinstance(value, DeviceRef):
            return value
        if isinstance(value, str):
            return DeviceRef.parse(value if ":" in value else f"{value}:0")
        raise TypeError(f"a device must be a DeviceRef (DeviceRef.CPU(), DeviceRef.GPU(0)) or "
                        f"'cpu:N'/'gpu:N', got {value!r}")

    @staticmethod
    def parse(text: str) -> "DeviceRef":
        kind, _, idx = text.partition(":")
        if kind not in ("cpu", "gpu") or not idx.isdigit():
            raise ValueError(f"bad device {text!r}; expected cpu:N or gpu:N")
        return DeviceRef(kind, int(idx))
