"""Run the Triton kernels of this directory on the CPU through Triton's interpreter.

TRITON_INTERPRET must be set before triton is first imported, since `@triton.jit` picks the
interpreter at decoration time. The interpreter's tl.dot multiplies bfloat16 operands as their
raw uint16 storage; the patch below widens them to float32 first (test-only, kernels untouched).
"""

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"
# Kernel modules imported earlier in this session (compiled-mode JITFunctions) are dropped so
# the tests here import interpreted ones.
for _name in [m for m in sys.modules if m.startswith("graphir.lowering.triton_gpu.kernels")]:
    del sys.modules[_name]

import numpy as np  # noqa: E402
from triton.runtime import interpreter  # noqa: E402


def _widen_bf16(handle):
    import triton.language as tl

    if handle.dtype.scalar == tl.bfloat16 or handle.dtype == tl.bfloat16:
        return (handle.data.astype(np.uint32) << 16).view(np.float32)
    return handle.data


_orig_create_dot = interpreter.InterpreterBuilder.create_dot


def _create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
    import triton.language as tl

    if tl.bfloat16 in (a.dtype.scalar, b.dtype.scalar):
        data = np.matmul(_widen_bf16(a), _widen_bf16(b), dtype=d.data.dtype) + d.data
        return interpreter.TensorHandle(data, d.dtype.scalar)
    return _orig_create_dot(self, a, b, d, input_precision, max_num_imprecise_acc)


interpreter.InterpreterBuilder.create_dot = _create_dot
