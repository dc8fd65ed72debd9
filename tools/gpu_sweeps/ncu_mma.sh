#!/usr/bin/env bash
# ncu of the warp-MMA nib kernel at one row of X (tools/gpu_sweeps/quant_nib.py --once), the
# sections that tell latency from bandwidth: bash tools/gpu_sweeps/ncu_mma.sh N "CONF" [NAME]
n=$1; conf=$2; name=${3:-mma}
timeout 120 ncu --clock-control none -c 1 --section SpeedOfLight --section WarpStateStats \
  --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
  --section SchedulerStats -k regex:"nib_(mma|gemv)_kernel" \
  python3 tools/gpu_sweeps/quant_nib.py --once "q4_0,$n,1,$conf" > "${OUT:-/tmp}/ncu_$name.txt" 2>&1
grep -E "Duration|DRAM Throughput|L1/TEX Hit|L2 Hit|Mem Busy|Max Bandwidth|Issued Ipc|Issue Slots|Achieved Occupancy|Theoretical Occ|Registers Per|No Eligible|Eligible Warps|Active Warps Per|Warp Cycles Per Issued|L1/TEX Cache Throughput|L2 Cache Throughput|Memory Throughput" \
  "${OUT:-/tmp}/ncu_$name.txt" | head -30
