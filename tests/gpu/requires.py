"""The skip every GPU test starts with: no GPU tests under the Triton interpreter (its
process-wide mode would run the kernels there) and none without an NVIDIA driver."""

import os

import pytest


def skip_unless_gpu() -> None:
    """Skip the calling module (at import) or test unless compiled kernels can run here."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("TRITON_INTERPRET is set: run the GPU tests in their own pytest process",
                    allow_module_level=True)
    from graphir.runtime.cuda import driver

    if not driver.is_available():
        pytest.skip("no NVIDIA GPU / libcuda on this machine", allow_module_level=True)
