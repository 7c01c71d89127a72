#!/usr/bin/env bash
# One call on the lent GPU machine: GPU tests, then the CPU benchmarks on its 16-core CPU.
# Each step is time-boxed and logged under $OUT; a short summary prints last.
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 KRASIS_HOME=/tmp/krasis-home
OUT="${OUT:-/tmp/krasis-out}"
mkdir -p "$OUT"
{ date -u; nproc; lscpu | grep -E "Model name|NUMA node\(s\)|L3"; free -g | head -2;
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; git rev-parse --short HEAD; } > "$OUT/machine.txt" 2>&1
step() {  # step NAME SECONDS COMMAND...
  local name=$1 seconds=$2; shift 2
  local start=$SECONDS
  timeout "$seconds" "$@" > "$OUT/$name.txt" 2>&1
  echo "$name: rc=$? in $((SECONDS - start)) s" >> "$OUT/summary.txt"
}
step gpu_tests 110 python3 -m pytest tests/gpu -q -p no:cacheprovider
step kernels 150 python3 bench/kernels.py --threads 16 --min-seconds 0.3
step decode_cpu 120 python3 bench/decode_cpu.py --threads 16
step shared_cache_rss 150 python3 bench/shared_cache_rss.py --layers 4 --workers 4 --workdir /tmp/rss
cat "$OUT/machine.txt" "$OUT/summary.txt"
tail -3 "$OUT/gpu_tests.txt"; tail -25 "$OUT/kernels.txt"; tail -15 "$OUT/decode_cpu.txt"; tail -8 "$OUT/shared_cache_rss.txt"
