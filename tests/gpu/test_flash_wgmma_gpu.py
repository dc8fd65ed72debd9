"""The warp-specialized Gluon prefill kernel (kernels/flash_attention_wgmma.py) on the GPU, as
the plan launches it (flash_attention with a WS config): ragged sequences with cached prefixes,
shuffled pages, NaN past every sequence's length, every mask, bf16 and fp16, head dims 64 and
128, against a float32 torch reference. Gluon has no interpreter: on the CPU the kernel is
only compiled (test_flash_attention_aot.py).

The kernel's warpgroups wait on each other through mbarriers, so a protocol error shows as a
hang, not a wrong number: the checks run in a child process with a deadline, and a hang fails
the test by name instead of stopping the GPU suite."""
import subprocess

import pytest

from tests.gpu.requires import run_json_child

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SCRIPT = r"""
import json, sys, torch
from graphir.lowering.triton_gpu.kernels import flash_attention as fa
from graphir.lowering.triton_gpu.kernels.flash_attention_configs import CHAIN_CONFIGS
from graphir.tools.attention_reference import ragged_problem, torch_reference
d, dtype = int(sys.argv[1]), sys.argv[2]
masks = [("NULL", 0), ("CAUSAL", 0), ("SLIDING_WINDOW_CAUSAL", 100),
         ("SLIDING_WINDOW_NONCAUSAL", 150), ("CHUNKED_CAUSAL", 128)]
q, offs, clen, lut, blocks = ragged_problem(d, getattr(torch, dtype), seed=d)
out = []
persistent = sys.argv[3] == "persistent"
# (with the CHAIN configs the tuner is not offered, which the sweep times: checked here too)
ws = [c for c in fa.candidates(d, 128, dtype) if c.get("WS") and
      bool(c.get("PERSISTENT")) == persistent] + (CHAIN_CONFIGS[d] if persistent else [])
# Persistent configs at 3 programs too: each walks many tiles, so the rings and the V-tail
# barrier wrap across tiles.
runs = [(fa.config_tag(cfg) + f"_p{n}", lambda mask, window, cfg=cfg, n=n: fa.flash_attention(
    q, offs, clen, lut, blocks, 0, mask=mask, window=window, config=cfg, num_programs=n))
    for cfg in ws for n in ((3, None) if persistent else (None,))]
for tag, run in runs:
    for mask, window in masks:
        want = torch_reference(q, offs, clen, lut, blocks, mask, window, d ** -0.5)
        got = run(mask, window)
        torch.cuda.synchronize()
        err = float((got.float() - want).norm() / want.norm())
        out.append([tag, mask, err, bool(torch.isfinite(got).all())])
print("JSON" + json.dumps(out))
"""


_HUNG: dict = {}  # form -> the case that hung


@pytest.mark.parametrize("form", ["ws", "persistent"])
@pytest.mark.parametrize("d", [128, 64])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_ws_configs_match_torch_on_ragged_chunked_prefill(d, dtype, form):
    # form "persistent": the persistent configs (flash_attention_persistent.py), at 3 programs
    # and at one per SM (the deeper pipeline's every step count: one block, odd and even
    # counts, ring wrap-around; DYN's tiles from the counter, most of them at 3 programs);
    # "ws": the one-tile WS configs.
    if form in _HUNG:  # one hang is enough to know; the GPU suite's time is not spent on more
        pytest.fail(f"not run: the {form} warp-specialized kernel hung on {_HUNG[form]}")
    try:
        # Up to 45 compiles (9 persistent configs x 5 masks at head dim 64) and 90 launches:
        # about two minutes when nothing hangs.
        rows = run_json_child(SCRIPT, [str(d), dtype, form], timeout=360)
    except subprocess.TimeoutExpired:
        _HUNG[form] = f"d={d} {dtype}"
        pytest.fail(f"the {form} warp-specialized kernel did not finish in 360 s (d={d}, "
                    f"{dtype}): an mbarrier protocol deadlock")
    # Five masks for each config and grid (persistent configs: two grids each).
    # (Imported here, not at collection: triton must first be imported with the
    # interpreter's environment of tests/lowering/triton_gpu/conftest.py in CPU runs.)
    from graphir.lowering.triton_gpu.kernels import flash_attention as fa
    from graphir.lowering.triton_gpu.kernels.flash_attention_configs import CHAIN_CONFIGS
    configs = [c for c in fa.candidates(d, 128, dtype)
               if c.get("WS") and bool(c.get("PERSISTENT")) == (form == "persistent")]
    configs += CHAIN_CONFIGS[d] if form == "persistent" else []
    assert len(rows) == 5 * len(configs) * (2 if form == "persistent" else 1)
    assert any("dyn" in r[0] for r in rows) == (form == "persistent")
    tol = 1e-2 if dtype == "bfloat16" else 2e-3
    for tag, mask, err, finite in rows:
        assert finite and err < tol, (tag, mask, err)
