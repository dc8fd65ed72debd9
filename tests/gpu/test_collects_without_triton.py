"""Collecting the GPU tests on a machine without a GPU must not import triton: pytest collects
tests/gpu before tests/lowering, whose conftest sets TRITON_INTERPRET=1, and `@triton.jit`
reads that variable when triton.language is first imported. A GPU test module that imported
a kernel module at its top level made triton's own jit helpers (tl.zeros, ...) plain compiled
functions in that worker, and interpreter tests there failed with "Cannot call @triton.jit'd
outside of the scope of a kernel" (CI, 2026-12-05). Runs on the CPU, no GPU needed."""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]

CHILD = r"""
import importlib, pathlib, sys
import _pytest.outcomes
for path in sorted(pathlib.Path("tests/gpu").glob("test_*.py")):
    try:
        importlib.import_module("tests.gpu." + path.stem)
    except _pytest.outcomes.Skipped:
        pass  # a module that skips itself at collection (no GPU) is fine
print("TRITON" if "triton" in sys.modules else "CLEAN")
"""


def test_gpu_test_modules_do_not_import_triton_when_collected():
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "CLEAN", (
        "a tests/gpu module imports triton at collection (move the import into the test)")
