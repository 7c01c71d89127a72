#!/usr/bin/env bash
# One call on the lent machine to see where time goes before changing code: the GPU prefill profile of 4 resident
# V2-Lite layers at 32K by op and by input shape (profile32), and MLA decode attention's cycles by phase at 32K
# context (the kernel built with -DKRASIS_PHASE_TIMING): 1 and 16 threads over a ring of KV in memory, 16 threads
# over KV held in the L3. STEPS picks them; logs under $OUT.
set -uo pipefail
source "$(dirname "$0")/device_steps.sh"
STEPS="${STEPS:-profile32 phase1 phase16 phase16_cached}"
PHASE="python3 bench/decode_attention.py --variant phase=KRASIS_PHASE_TIMING=1 --contexts 32768 --shapes mla --kernels-only"
step profile32 200 python3 bench/prefill_profile.py --layers 4 --tokens 32768 --chunk 8192 --by-shape --rows 40
step phase1 150 $PHASE --threads 1 --min-seconds 0.3
step phase16 150 $PHASE --threads 16 --min-seconds 0.3
step phase16_cached 150 $PHASE --threads 16 --min-seconds 0.3 --ring-mib 48
cat "$OUT/summary.txt"
for name in phase1 phase16 phase16_cached; do echo "== $name"; grep -E "^ +[0-9]+ +mla|phase cycles" "$OUT/$name.txt"; done
