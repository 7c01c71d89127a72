#!/usr/bin/env bash
# One call on the lent GPU machine for its CPU: the CPU kernel tests (AVX-512/AMX paths this dev box lacks), the
# kernel benchmark against read bandwidth, and the pipeline's per-token overhead against in-process decode.
# The decode steps (STEPS="decode_tests decode decode_torch decode_host", ~6 min): the decode-step kernels' tests,
# then where a V2-Lite decode token's time goes at 0.5K and 32K context, with and without those kernels, and the
# host overhead alone (the tiny preset's ops at toy widths, 27 layers).
# Each step is time-boxed and logged under $OUT; a short summary prints last.
set -uo pipefail
source "$(dirname "$0")/device_steps.sh"
STEPS="${STEPS:-kernel_tests kernels variants pipeline}"
{ date -u; nproc; lscpu | grep -E "Model name|Flags" | cut -c1-200; } > "$OUT/machine.txt" 2>&1
step kernel_tests 150 python3 -m pytest -q -p no:cacheprovider tests/unit/test_cpu_kernels.py
step kernels 150 python3 bench/kernels.py --threads 16 --sections experts,dense --repeats 5
step variants 120 python3 bench/kernel_variants.py --threads 16 --variant default --variant KRASIS_CHUNKS_PER_THREAD=4 \
  --formats q4,q8 --repeats 5
step pipeline 200 python3 bench/pipeline_overhead.py --gpu none --cpu-workers 1 --streams 1,4,16 --max-tokens 64 \
  --rounds 3 --warmup 1
step decode_tests 150 python3 -m pytest -q -p no:cacheprovider tests/unit/test_decode_ops.py
step decode 240 python3 bench/decode_profile.py --threads 16 --contexts 512,32768 --tokens 16 --json "$OUT/decode.json"
step decode_torch 150 python3 bench/decode_profile.py --threads 16 --contexts 512,32768 --tokens 16 --torch-formulas \
  --bandwidth-gib 0 --json "$OUT/decode_torch.json"
step decode_host 60 python3 bench/decode_profile.py --preset tiny --layers 27 --threads 16 --contexts 512 --tokens 32 \
  --bandwidth-gib 0
cat "$OUT/machine.txt" "$OUT/summary.txt"
for name in $STEPS; do echo "== $name"; tail -45 "$OUT/$name.txt"; done
