#!/usr/bin/env bash
# One call on the lent GPU machine for its CPU: the CPU kernel tests (AVX-512/AMX paths this dev box lacks), the
# kernel benchmark against read bandwidth, and the pipeline's per-token overhead against in-process decode.
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
cat "$OUT/machine.txt" "$OUT/summary.txt"
tail -4 "$OUT/kernel_tests.txt"; tail -45 "$OUT/kernels.txt"; tail -25 "$OUT/variants.txt"; tail -25 "$OUT/pipeline.txt"
