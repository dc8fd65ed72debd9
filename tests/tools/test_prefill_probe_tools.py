"""The prefill measuring tools that run only on a GPU, kept in step with the kernels on the CPU:
the stamped probe (tools/gpu_sweeps/prefill_timeline.py) still compiles for sm_90 against the
shipped helpers it calls, and the A/B tool (tools/gpu_sweeps/prefill_ab.py) imports old copies
of kernel modules wired to each other, not to today's."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KERNELS = ROOT / "lowering" / "triton_gpu" / "kernels"

SCRIPT = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import prefill_ab, prefill_timeline as P
from graphir.lowering.triton_gpu.aot import compile_kernel

old = prefill_ab.old_modules(sys.argv[2])
shape = ("c2k", 4, 2048, 128, "CAUSAL", 0)
cx = P.constexprs(shape)
c = compile_kernel(P.probe_kernel, dict(P.SIGNATURE, **{k: "constexpr" for k in cx}), cx,
                   num_warps=4)
print("JSON" + json.dumps({
    "old": old.__name__,
    "tiles": old._take_tile.fn.__module__,      # a copy in the directory: the old one
    "chain": old._wsc_consumer.fn.__module__,   # not copied: today's
    "clocks": c.asm["ptx"].count("%clock64"),
    "tma_stores": c.asm["ptx"].count("cp.async.bulk.tensor.2d.global.shared"),
}))
"""


def test_probe_compiles_and_old_modules_import_each_other(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    for name in ("flash_attention_persistent", "flash_attention_tiles"):
        shutil.copy(KERNELS / f"{name}.py", old / f"{name}.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(ROOT / "tools" / "gpu_sweeps"),
                        str(old)], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.split("JSON", 1)[1])
    assert got["old"] == "old_flash_attention_persistent"
    assert got["tiles"] == "old_flash_attention_tiles"
    assert got["chain"] == "graphir.lowering.triton_gpu.kernels.flash_attention_chain"
    # Stamps in both consumer warpgroups' phases and loop waits; the output by TMA.
    assert got["clocks"] >= 20 and got["tma_stores"] >= 2, got
