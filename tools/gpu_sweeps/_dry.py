"""Imported first by the sweeps: with `--dry-run` a sweep runs on the CPU, its kernels under
Triton's interpreter (set before triton is imported), on tiny shapes."""
import os
import sys

DRY = "--dry-run" in sys.argv
if DRY:
    os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
    import tests.lowering.triton_gpu.conftest  # noqa: E402,F401  (the interpreter's bf16 dot)
