"""A small CUDA runtime over libcuda (ctypes): devices, buffers, modules, launches, streams, graphs.

Importing this package never touches the driver; the first real call loads libcuda.so.1 and
raises `CudaUnavailableError` where there is none. `is_available()` never raises.
"""

from graphir.runtime.cuda.driver import (CudaError, CudaUnavailableError, DeviceProperties, device_count,
                                 device_properties, driver_version, ensure_context, is_available,
                                 mem_get_info, synchronize)
from graphir.runtime.cuda.kernel import Kernel
from graphir.runtime.cuda.memory import DeviceBuffer, dtype_name, from_dlpack, numpy_dtype, pinned_empty
from graphir.runtime.cuda.module import Function, LaunchSpec, Module, PackedParams, launch, pack_value, param_kind
from graphir.runtime.cuda.stream import CudaGraph, Event, Stream

__all__ = [
    "CudaError", "CudaUnavailableError", "DeviceProperties", "device_count", "device_properties",
    "driver_version", "ensure_context", "is_available", "mem_get_info", "synchronize", "Kernel",
    "DeviceBuffer", "dtype_name", "from_dlpack", "numpy_dtype", "pinned_empty", "Function",
    "LaunchSpec", "Module", "PackedParams", "launch", "pack_value", "param_kind", "CudaGraph",
    "Event", "Stream",
]
