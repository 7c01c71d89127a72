#!/usr/bin/env bash
# `krasis-ctl bench` on DeepSeek-V2-Lite for this tree and for a baseline tree in BASE (e.g. `git archive REV | tar -x
# -C .base`, which travels to the lent machine untracked), one after the other on the same machine, so that a change
# is timed against its baseline on the same card. BUDGET GiB (default 4), PROMPTS, DECODE contexts; figures print last.
set -uo pipefail
source "$(dirname "$0")/device_steps.sh"
BASE="${BASE:-.base}"
ARGS=(bench --preset deepseek-v2-lite --device cuda --quant q4 --vram-budget "${BUDGET:-4}" --threads 16
      --prompt-tokens "${PROMPTS:-2K,8K,32K}" --decode-context "${DECODE:-0.5K}" --decode-tokens 16)
nvidia-smi --query-gpu=name --format=csv,noheader > "$OUT/machine.txt" 2>&1
STEPS="tree base"
step tree 300 python3 -c "from krasis.ctl.main import cli; cli()" "${ARGS[@]}" --json "$OUT/bench-tree.json"
(cd "$BASE" && PYTHONPATH="$PWD:${PYTHONPATH#*:}" step base 300 python3 -c "from krasis.ctl.main import cli; cli()" \
  "${ARGS[@]}" --json "$OUT/bench-base.json")
cat "$OUT/machine.txt" "$OUT/summary.txt"
for f in tree base; do echo "== $f"; grep -v "it/s\]" "$OUT/$f.txt" | grep -A14 "^figure"; done
