#!/usr/bin/env bash
# Where a kernel's warps stall, instruction by instruction: ncu's warp-state sampling of the
# first kernel whose name matches REGEX in COMMAND, printed per SASS instruction (the 40 with
# the most samples, with their stall reasons) and summed by opcode. The report and the whole
# per-instruction CSV land in $OUT.
#   bash tools/gpu_sweeps/ncu_source.sh NAME REGEX COMMAND...
# e.g. bash tools/gpu_sweeps/ncu_source.sh q4_0 nib_ python3 tools/gpu_sweeps/quant_nib.py --once q4_0,14336,1
name=$1; regex=$2; shift 2
out=${OUT:-/tmp}
timeout 300 ncu --clock-control none -c 1 -k regex:"$regex" --import-source no \
  --section SourceCounters --section WarpStateStats --section SpeedOfLight \
  -o "$out/ncu_src_$name" -f "$@" > "$out/ncu_src_$name.log" 2>&1
tail -3 "$out/ncu_src_$name.log"
ncu -i "$out/ncu_src_$name.ncu-rep" --page source --csv --print-source sass \
  > "$out/ncu_src_$name.csv" 2>/dev/null
python3 tools/gpu_sweeps/ncu_source_top.py "$out/ncu_src_$name.csv"
