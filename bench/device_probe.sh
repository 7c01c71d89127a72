#!/usr/bin/env bash
# One call on the lent machine to see where GPU prefill time goes before changing code: the profile of 4 resident
# V2-Lite layers at 32K by op and by input shape (profile32). (MLA decode attention's cycles by phase came from the
# kernel's phase clock, -DKRASIS_PHASE_TIMING, in commit 1fe705e and removed after it.) Logs under $OUT.
set -uo pipefail
source "$(dirname "$0")/device_steps.sh"
STEPS="${STEPS:-profile32}"
step profile32 200 python3 bench/prefill_profile.py --layers 4 --tokens 32768 --chunk 8192 --by-shape --rows 40
cat "$OUT/summary.txt"
