"""Shared fixture: the test kernels of compile_kernels.py, compiled offline for sm_90.

Compilation runs in a subprocess without TRITON_INTERPRET (other test directories turn the
interpreter on for the whole pytest process) and with a private Triton cache.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="session")
def compiled_kernels(tmp_path_factory):
    """{label: {"cubin": bytes, "metadata": dict, "ptx_params": [bytes...], "aot_metadata"?}}."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "tests.runtime.cuda.compile_kernels"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("JSON"))
    out = json.loads(line[4:])
    for v in out.values():
        v["cubin"] = bytes.fromhex(v["cubin"])
    return out
