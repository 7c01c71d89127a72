"""Per-step decode times of `krasis-ctl bench --json` results: median, slowest, and the rate with and without the
slowest step, per decode context, to tell a steady decode rate from one spoiled by a stall.

    python bench/decode_steps.py run1.json run2.json
"""

import json
import statistics
import sys


def main(paths: list[str]):
    for path in paths:
        timings = json.load(open(path))["timings"]
        for context, timing in sorted(timings.items(), key=lambda item: int(item[0])):
            steps = timing.get("decode_step_s") or []
            if not steps:
                continue
            slowest = max(steps)
            print(f"{path}: context {context}: {len(steps)} steps, {len(steps) / sum(steps):.1f} tok/s; median "
                  f"{statistics.median(steps) * 1e3:.1f} ms, slowest {slowest * 1e3:.1f} ms, without it "
                  f"{(len(steps) - 1) / (sum(steps) - slowest):.1f} tok/s")


if __name__ == "__main__":
    main(sys.argv[1:])
