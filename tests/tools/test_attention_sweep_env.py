"""The prefill sweep's shape filter (tools/gpu_sweeps/attention.py, ATTN_SHAPES): a name it does
not know stops the sweep before any work, naming the shapes it knows."""
import os
import subprocess
import sys
from pathlib import Path

SWEEP = Path(__file__).resolve().parents[2] / "tools" / "gpu_sweeps" / "attention.py"


def _run(shapes: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ATTN_SHAPES": shapes}
    return subprocess.run([sys.executable, str(SWEEP), "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=120)


def test_an_unknown_shape_name_is_refused_by_name():
    r = _run("c4k64,c8k")
    assert r.returncode != 0
    assert "unknown shape(s) ['c8k']" in r.stderr and "'c4k64'" in r.stderr
