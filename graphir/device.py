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
        if not isinstance(self.id, int) or self.id < 0:
            raise ValueError(f"device id must be a non-negative int, got {self.id!r}")

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
    def parse(text: str) -> "DeviceRef":
        kind, _, idx = text.partition(":")
        if kind not in ("cpu", "gpu") or not idx.isdigit():
            raise ValueError(f"bad device {text!r}; expected cpu:N or gpu:N")
        return DeviceRef(kind, int(idx))
