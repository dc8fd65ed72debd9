#!/usr/bin/env bash
# ncu of the prefill kernel a config names and of torch SDPA's kernel at one sweep shape
# (tools/gpu_sweeps/attention.py's SHAPES), the sections that tell the tensor pipe's share from
# the stalls: bash tools/gpu_sweeps/ncu_prefill.sh SHAPE CONFIG   (e.g. n4k m128n128w4s2tmawspersist)
shape=$1; conf=$2
cat > /tmp/ncu_prefill_once.py <<PY
import sys, torch
sys.path.insert(0, "tools/gpu_sweeps")
import attention as A
from graphir.lowering.triton_gpu.kernels import flash_attention_configs as fc
A.set_allocator()
name, B, S, D, mask, window = shape = next(s for s in A.SHAPES if s[0] == "$shape")
got = A.ours(shape, fc.get("$conf"))()     # profiled first: ours, then SDPA's two forms
p = A.problem(shape)
q4 = p["q"].view(B, S, A.NH, D).transpose(1, 2)
kx, vx = (t.repeat_interleave(A.NH // A.NKV, dim=1) for t in (p["k"], p["v"]))
sdpa = torch.nn.functional.scaled_dot_product_attention
sdpa(q4, p["k"], p["v"], is_causal=mask != "NULL", enable_gqa=True)
want = sdpa(q4, kx, vx, is_causal=mask != "NULL").transpose(1, 2).reshape(B * S, -1)
torch.cuda.synchronize()
print("rel err vs SDPA", float((got.float() - want.float()).norm() / want.float().norm()))
PY
timeout 240 ncu --clock-control none -c 3 --section SpeedOfLight --section WarpStateStats \
  --section ComputeWorkloadAnalysis --section Occupancy --section LaunchStats \
  --section SchedulerStats -k regex:"flash|fmha" \
  python3 /tmp/ncu_prefill_once.py > "${OUT:-/tmp}/ncu_prefill_$shape.txt" 2>&1
grep -E "^  [a-z_]+.*\(|rel err|Duration|Compute \(SM\) Throughput|Issued Ipc|Issue Slots Busy|No Eligible|Eligible Warps|Active Warps Per|Warp Cycles Per Issued|Registers Per|Achieved Occupancy|Block Size|Grid Size|Dynamic Shared|Stall" \
  "${OUT:-/tmp}/ncu_prefill_$shape.txt" | cut -c1-150 | head -80
