"""A cuda build compiles its kernels in worker processes when there are enough of them and the
Triton cache is cold (lowering/triton_gpu/backend.py `_precompile`): the cubins are the ones a
compile in this process gives, a warm cache keeps the build in one process, and
GRAPHIR_COMPILE_WORKERS is read strictly."""

import pytest

from tests.lowering.triton_gpu.test_aot_cubin import run_compiled_mode

SCRIPT = r"""
import json, os
from graphir.lowering.triton_gpu import aot, backend
from graphir.lowering.triton_gpu.kernels import rms_norm

os.environ["GRAPHIR_COMPILE_WORKERS"] = "2"
specs = {}
for d in (64, 96, 128, 160, 192, 256, 384, 512, 1024):
    for s in rms_norm.aot_specs(d, "float16"):
        specs[s.name] = s
said = []
cold = backend._precompile(specs, 90, said.append)
warm_said = []
warm = backend._precompile(specs, 90, warm_said.append)
serial = {k: aot.compile_spec(s) for k, s in specs.items()}
# A kernel that cannot compile comes back from a worker as its error, named.
import dataclasses
from graphir.lowering.triton_gpu import tuning_gpu
good = specs["rms_norm_fp16_d64"]
mixed = tuning_gpu.compile_specs({"bad": dataclasses.replace(good, num_warps=3), "good": good},
                                 90, workers=2)
print("JSON" + json.dumps({
    "bad": repr(mixed["bad"]), "good": mixed["good"].cubin == serial["rms_norm_fp16_d64"].cubin,
    "n": len(specs), "cold": sorted(cold), "warm": sorted(warm), "said": said,
    "warm_said": warm_said,
    "same": all(cold[k].cubin == serial[k].cubin and cold[k].shared == serial[k].shared
                for k in cold)}))
"""


def test_parallel_compile_matches_serial_and_stays_serial_when_warm(tmp_path_factory):
    out = run_compiled_mode(SCRIPT, tmp_path_factory, timeout=600)
    assert out["n"] == 9
    assert out["good"] and "Error" in out["bad"] and "warps" in out["bad"].lower(), out["bad"]
    assert len(out["cold"]) == 9 and out["same"]
    assert out["said"] == ["compiling 8 kernels in 2 processes"]
    # Warm: the probe kernel came from Triton's cache, nothing was handed to workers.
    assert out["warm_said"] == [] and len(out["warm"]) == 1


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_compile_workers_setting_is_checked(monkeypatch, value):
    from graphir.lowering.triton_gpu import backend

    monkeypatch.setenv("GRAPHIR_COMPILE_WORKERS", value)
    with pytest.raises(ValueError, match="GRAPHIR_COMPILE_WORKERS"):
        backend.compile_workers()
    monkeypatch.setenv("GRAPHIR_COMPILE_WORKERS", "3")
    assert backend.compile_workers() == 3


def test_workers_do_not_run_the_callers_script_again(tmp_path):
    # A user's script that compiles at top level, with no `if __name__ == "__main__":` guard:
    # the workers are fresh interpreters, not multiprocessing children importing __main__.
    import os
    import subprocess
    import sys

    from tests.lowering.triton_gpu.test_aot_cubin import ROOT

    script = tmp_path / "user_script.py"
    script.write_text(
        "print('TOP LEVEL RAN', flush=True)\n"
        "from graphir.lowering.triton_gpu import tuning_gpu\n"
        "from graphir.lowering.triton_gpu.kernels import rms_norm\n"
        "specs = {s.name: s for d in (64, 96) for s in rms_norm.aot_specs(d, 'float16')}\n"
        "out = tuning_gpu.compile_specs(specs, 90, workers=2)\n"
        "print('compiled', sorted(k for k, v in out.items() if hasattr(v, 'cubin')))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("TOP LEVEL RAN") == 1, proc.stdout
    assert "compiled ['rms_norm_fp16_d64', 'rms_norm_fp16_d96']" in proc.stdout
