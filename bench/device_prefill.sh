#!/usr/bin/env bash
# One call on the lent GPU machine for GPU prefill work: the GPU tests, the expert kernels, `krasis-ctl bench` on all
# of DeepSeek-V2-Lite (bench27: BUDGET GiB, default 4; prefill27: its prompts only; bench27_4gib), the attention
# backends at MLA shapes and what a new shape costs cuDNN (cudnn_shapes), a profile of a few resident layers at 8K
# and 32K, streamed-vs-resident prefill on a V2-Lite cut, and the timeline of streamed prompts on the bench model
# (timeline). PREFILL27_BUDGET and PREFILL27_PROMPTS set prefill27's budget and prompts, TESTS_K picks GPU tests
# by keyword, PROFILE_ARGS adds profile32 options (--by-shape), KTOKENS the kernels' token counts, SWEEP their tile
# sweeps (empty: none). Each step is time-boxed (*_S: seconds) and logged under $OUT; a short summary prints last.
# STEPS picks them:
# STEPS="tests bench27 bench27_4gib" BUDGET=5 bash bench/device_prefill.sh
set -uo pipefail
source "$(dirname "$0")/device_steps.sh"
STEPS="${STEPS:-tests kernels kernels_next profile prefill}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/machine.txt" 2>&1
step tests ${TESTS_S:-300} python3 -m pytest tests/gpu -q -p no:cacheprovider ${TESTS_K:+-k "$TESTS_K"}
step kernels ${KERNELS_S:-240} python3 bench/moe_kernels.py --shape v2-lite --tokens ${KTOKENS:-2048 8192} --sweep ${SWEEP-q4}
step attention 120 python3 bench/attention_backends.py
step cudnn_shapes 90 python3 bench/cudnn_shapes.py
step kernels_next 60 python3 bench/moe_kernels.py --shape qwen3-next --tokens 8192
step bench27 330 python3 -c "from krasis.ctl.main import cli; cli()" bench --preset deepseek-v2-lite --device cuda --quant q4 --vram-budget ${BUDGET:-4} \
  --threads 16 --prompt-tokens 2K,8K,32K --decode-context 0.5K,32K --decode-tokens 16 --json "$OUT/bench-v2lite-q4.json"
step prefill27 ${PREFILL27_S:-300} python3 -c "from krasis.ctl.main import cli; cli()" bench --preset deepseek-v2-lite --device cuda --quant q4 \
  --vram-budget ${PREFILL27_BUDGET:-${BUDGET:-4}} --threads 16 --prompt-tokens ${PREFILL27_PROMPTS:-8K,32K} --decode-context 0.5K \
  --decode-tokens 8 --json "$OUT/prefill-v2lite-q4.json"
step bench27_4gib 200 python3 -c "from krasis.ctl.main import cli; cli()" bench --preset deepseek-v2-lite --device cuda --quant q4 \
  --vram-budget 4 --threads 16 --prompt-tokens 2K,8K,32K --decode-context 0.5K --decode-tokens 16 --json "$OUT/bench-v2lite-q4-4gib.json"
step timeline ${TIMELINE_S:-200} python3 bench/stream_timeline.py --budget ${BUDGET:-4} ${TIMELINE_ARGS:---tokens 512 8192 32768}
step timeline_thawed ${TIMELINE_S:-200} python3 bench/stream_timeline.py --budget ${BUDGET:-4} --thaw ${TIMELINE_ARGS:---tokens 512 8192 32768}
step profile 120 python3 bench/prefill_profile.py --layers 4 --tokens 8192 --chunk 8192
step profile32 150 python3 bench/prefill_profile.py --layers 4 --tokens 32768 --chunk 8192 ${PROFILE_ARGS:-}
step prefill 180 python3 bench/gpu_prefill.py --layers 12 --quant q4 --budget 4 --tokens 8192 --chunk 8192
cat "$OUT/machine.txt" "$OUT/summary.txt"
[ -f "$OUT/tests.txt" ] && tail -15 "$OUT/tests.txt"
[ -f "$OUT/kernels.txt" ] && cat "$OUT/kernels.txt"; [ -f "$OUT/attention.txt" ] && grep -v Warn "$OUT/attention.txt"
[ -f "$OUT/cudnn_shapes.txt" ] && cat "$OUT/cudnn_shapes.txt"
[ -f "$OUT/kernels_next.txt" ] && cat "$OUT/kernels_next.txt"
for f in profile profile32; do [ -f "$OUT/$f.txt" ] && head -1 "$OUT/$f.txt" && grep -A12 "GPU idle" "$OUT/$f.txt"; done
[ -f "$OUT/prefill.txt" ] && tail -12 "$OUT/prefill.txt"
for f in timeline timeline_thawed; do [ -f "$OUT/$f.txt" ] && echo "== $f" && grep -v "it/s\]" "$OUT/$f.txt" | grep -A3 -B1 "tokens: TTFT\|summary"; done
[ -f "$OUT/timeline.txt" ] && grep -A45 "host profile.*tottime" "$OUT/timeline.txt"
for f in bench27 prefill27 bench27_4gib; do [ -f "$OUT/$f.txt" ] && grep -v "it/s\]" "$OUT/$f.txt" | tail -24; done
