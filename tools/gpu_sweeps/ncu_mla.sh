#!/usr/bin/env bash
# ncu of the MLA decode attention kernel (the first launch of the kernel REGEX names) at one
# sweep shape, every section's body printed (pipe utilization, shared-memory traffic, stalls):
#   bash tools/gpu_sweeps/ncu_mla.sh BxCTXxHEADS [REGEX] [CONFIG]
# e.g. bash tools/gpu_sweeps/ncu_mla.sh 64x4096x64 mla_absorbed_ws
shape=$1; regex=${2:-mla_absorbed}; conf=${3:-none}
out=${OUT:-/tmp}
timeout 300 ncu --clock-control none -c 1 -k regex:"$regex" --print-details all \
  --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
  --section MemoryWorkloadAnalysis_Tables --section WarpStateStats --section SchedulerStats \
  --section Occupancy --section LaunchStats \
  python3 tools/gpu_sweeps/mla.py --shapes "$shape" --only "$conf" > "$out/ncu_mla_$shape.txt" 2>&1
grep -iE "Duration|Throughput|Pipe|Tensor|Shared|Bank|Issue Slots|Eligible|Warp Cycles|Registers Per|Stall|Busy|attn " \
  "$out/ncu_mla_$shape.txt" | cut -c1-160 | head -70
