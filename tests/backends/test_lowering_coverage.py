"""Every registered op has a lowering for each backend (or a decomposition into ops that have one).

Checked in a fresh interpreter: other tests register test-only ops in the same process."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_CHECK = """
import sys
sys.path.insert(0, sys.argv[1])
import importlib
mod = {"cpu": "graphir.lowering.mlir_cpu.backend", "cuda": "graphir.lowering.triton_gpu.backend"}[sys.argv[2]]
importlib.import_module(mod)
from graphir.lowering.registry import missing_lowerings
print(",".join(missing_lowerings(sys.argv[2])))
"""


@pytest.mark.parametrize("backend", ["cpu", "cuda"])
def test_no_registered_op_lacks_a_lowering(backend):
    pytest.importorskip("mlir.ir" if backend == "cpu" else "triton")
    r = subprocess.run([sys.executable, "-c", _CHECK, str(ROOT), backend], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"ops without a {backend} lowering: {r.stdout.strip()}"
