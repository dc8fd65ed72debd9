"""tools/bench_tp.py off the GPU: its arguments, and a --dry-run under torchrun (CPU, gloo, tiny
shapes) that goes through the one-device layer, the TP rank graphs and both all-reduces."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.runtime.test_distributed_torchrun import free_port, launch_env

BENCH = Path(__file__).resolve().parents[2] / "tools" / "bench_tp.py"


def test_help_and_argument_errors():
    p = subprocess.run([sys.executable, str(BENCH), "--help"], capture_output=True, text=True,
                       timeout=60, env=launch_env())
    assert p.returncode == 0 and "Llama-3-70B-shaped" in p.stdout and "--dry-run" in p.stdout
    from graphir.tools.bench_tp import parse_args

    a = parse_args([])
    assert a.tp == [1, 2, 4, 8] and (a.hidden, a.heads, a.kv_heads, a.head_dim) == \
        (8192, 64, 8, 128)
    assert parse_args(["--dry-run"]).tp == [1, 2] and parse_args(["--dry-run"]).hidden == 64
    with pytest.raises(SystemExit):
        parse_args(["--tp", "3"])          # 64 heads do not split over 3
    with pytest.raises(SystemExit):
        parse_args(["--tp", "two"])


def test_dry_run_under_torchrun(tmp_path):
    pytest.importorskip("mlir.ir")
    out = tmp_path / "bench.json"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(free_port()), str(BENCH), "--dry-run",
                        "--json", str(out)], capture_output=True, text=True, timeout=300,
                       env=launch_env())
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    assert "TP decode step" in p.stdout and "ours/torch" in p.stdout
    res = json.loads(out.read_text())
    assert [s["tp"] for s in res["steps"]] == [1, 2]
    assert all(s["step_ms"] > 0 for s in res["steps"])
    assert [r["tp"] for r in res["allreduce"]] == [2, 2]
    assert all(r["ours_ms"] > 0 and r["torch_ms"] > 0 for r in res["allreduce"])
