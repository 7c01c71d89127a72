#!/usr/bin/env bash
# One call on the lent GPU machine for its CPU: the CPU kernel tests (AVX-512/AMX paths this dev box lacks), the
# kernel benchmark against read bandwidth, and the pipeline's per-token overhead against in-process decode.
# The decode steps (STEPS="decode_tests attention decode decode_torch decode_host", ~7 min): the decode-step kernels'
# tests, decode attention against the torch GEMMs (bench/decode_attention.py; attention_cached: KV that stays in the
# L3, to tell memory stalls from arithmetic), where a V2-Lite decode token's time
# goes at 0.5K and 32K context, with and without those kernels, and the host overhead alone (the tiny preset's ops at
# toy widths, 27 layers). VARIANTS, FORMATS, ATTENTION_ARGS and DECODE_ARGS pass arguments through; *_S: seconds.
# Each step is time-boxed and logged under $OUT; a short summary prints last.
set -uo pipefail
source "$(dirname "$0")/device_steps.sh"
STEPS="${STEPS:-kernel_tests kernels variants pipeline}"
{ date -u; nproc; lscpu | grep -E "Model name|Flags" | cut -c1-200; } > "$OUT/machine.txt" 2>&1
step kernel_tests 150 python3 -m pytest -q -p no:cacheprovider tests/unit/test_cpu_kernels.py
step kernels 150 python3 bench/kernels.py --threads 16 --sections experts,dense --repeats 5
step variants ${VARIANTS_S:-120} python3 bench/kernel_variants.py --threads 16 ${VARIANTS:---variant default} \
  --formats ${FORMATS:-q4,q8} --repeats 5
step pipeline 200 python3 bench/pipeline_overhead.py --gpu none --cpu-workers 1 --streams 1,4,16 --max-tokens 64 \
  --rounds 3 --warmup 1
step decode_tests 150 python3 -m pytest -q -p no:cacheprovider tests/unit/test_decode_ops.py tests/models/test_decode_batching.py
step attention ${ATTENTION_S:-120} python3 bench/decode_attention.py --threads 16 ${ATTENTION_ARGS:-}
step attention_cached ${ATTENTION_S:-120} python3 bench/decode_attention.py --threads 16 --ring-mib 48 ${ATTENTION_ARGS:-}
step decode 240 python3 bench/decode_profile.py --threads 16 --contexts 512,32768 --tokens 16 ${DECODE_ARGS:-} \
  --json "$OUT/decode.json"
step decode_torch 150 python3 bench/decode_profile.py --threads 16 --contexts 512,32768 --tokens 16 --torch-formulas \
  --bandwidth-gib 0 --json "$OUT/decode_torch.json"
step decode_host 60 python3 bench/decode_profile.py --preset tiny --layers 27 --threads 16 --contexts 512 --tokens 32 \
  --bandwidth-gib 0
cat "$OUT/machine.txt" "$OUT/summary.txt"
for name in $STEPS; do echo "== $name"; tail -45 "$OUT/$name.txt"; done
