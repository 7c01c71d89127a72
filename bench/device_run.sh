#!/usr/bin/env bash
# One call on the lent GPU machine: GPU tests, then CPU benchmarks on its 16-core CPU
# (bench/kernels.py runs separately: python3 bench/kernels.py --threads 16).
# Each step is time-boxed and logged under $OUT; a short summary prints last.
set -uo pipefail
source "$(dirname "$0")/device_steps.sh"
STEPS="${STEPS:-gpu_tests decode_cpu shared_cache_rss}"
{ date -u; nproc; lscpu | grep -E "Model name|NUMA node\(s\)|L3"; free -g | head -2;
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; git rev-parse --short HEAD; } > "$OUT/machine.txt" 2>&1
step gpu_tests 60 python3 -m pytest tests/gpu -q -p no:cacheprovider
step decode_cpu 80 python3 bench/decode_cpu.py --threads 16 --decode-tokens 32
step shared_cache_rss 90 python3 bench/shared_cache_rss.py --layers 2 --workers 4 --workdir /tmp/rss
cat "$OUT/machine.txt" "$OUT/summary.txt"
tail -3 "$OUT/gpu_tests.txt"; tail -15 "$OUT/decode_cpu.txt"; tail -8 "$OUT/shared_cache_rss.txt"
