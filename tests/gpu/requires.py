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


@pytest.fixture(scope="module")
def sm90():
    """Skip the module's tests unless GPU 0 is sm_90: the cubins are built for it. A test
    module takes it as `pytestmark = pytest.mark.usefixtures("sm90")` after importing it."""
    from graphir.runtime.cuda import driver

    p = driver.device_properties(0)
    if p.compute_capability != (9, 0):
        pytest.skip(f"the cubins are built for sm_90; this is {p.name} {p.compute_capability}")


def run_json_child(script: str, args: list[str], timeout: float) -> list:
    """Run `script` in a fresh Python (compiled kernels, this checkout first on the path) and
    return what it printed after "JSON" on its last such line. A kernel whose warpgroups wait
    on each other through mbarriers shows a protocol error as a hang: the deadline turns it
    into subprocess.TimeoutExpired for the caller to name, instead of stopping the suite."""
    import json
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", script, *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=timeout)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("JSON")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][4:])
