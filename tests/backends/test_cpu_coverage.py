"""Every registered op has a CPU lowering (or a decomposition into ops that have one)."""
import pytest

pytest.importorskip("mlir.ir")

import lowering.mlir_cpu.backend  # noqa: E402,F401  (registers the CPU lowerings)
from lowering.registry import missing_lowerings  # noqa: E402


def test_no_registered_op_lacks_a_cpu_lowering():
    assert missing_lowerings("cpu") == []
