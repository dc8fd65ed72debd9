# Temporary (not committed): the persistent WS GPU test's ragged check for the CHAIN configs only.
import json, sys, torch
from graphir.lowering.triton_gpu.kernels import flash_attention as fa
from graphir.lowering.triton_gpu.kernels.flash_attention_configs import CHAIN_CONFIGS
from graphir.tools.attention_reference import ragged_problem, torch_reference
d, dtype = int(sys.argv[1]), sys.argv[2]
masks = [("NULL", 0), ("CAUSAL", 0), ("SLIDING_WINDOW_CAUSAL", 100),
         ("SLIDING_WINDOW_NONCAUSAL", 150), ("CHUNKED_CAUSAL", 128)]
q, offs, clen, lut, blocks = ragged_problem(d, getattr(torch, dtype), seed=d)
tol = 1e-2 if dtype == "bfloat16" else 2e-3
bad = 0
for cfg in CHAIN_CONFIGS[d]:
    for mask, window in masks:
        want = torch_reference(q, offs, clen, lut, blocks, mask, window, d ** -0.5)
        for n in (3, None):
            got = fa.flash_attention(q, offs, clen, lut, blocks, 0, mask=mask, window=window,
                                     config=cfg, num_programs=n)
            torch.cuda.synchronize()
            err = float((got.float() - want).norm() / want.norm())
            ok = bool(torch.isfinite(got).all()) and err < tol
            bad += not ok
            print(d, dtype, fa.config_tag(cfg), mask, n, f"{err:.2e}", "OK" if ok else "FAIL", flush=True)
print(d, dtype, "failures", bad)
