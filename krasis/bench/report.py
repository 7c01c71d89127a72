"""Each measured figure next to the limit it is judged against, as a table for people and JSON for tools."""

import json
from dataclasses import asdict, dataclass

GB = 1e9


@dataclass(frozen=True)
class Figure:
    """`value` against `limit` in the same unit; ratio = value / limit, for a time limit / value (1.0: at the limit)."""

    name: str
    unit: str
    value: float
    limit: float
    bound_by: str  # what sets the limit

    @property
    def ratio(self) -> float:
        return self.limit / self.value if self.unit == "s" else self.value / self.limit


def prefill_figures(tokens: int, ttft_s: float, bounds_tok_s: dict[str, float], first_ttft_s: float) -> list[Figure]:
    """Prefill tok/s and TTFT of one prompt, and the TTFT of the first prompt of that length (its one-time costs);
    the limit is the tightest bound (compute, PCIe)."""
    bound_by = min(bounds_tok_s, key=bounds_tok_s.get)
    limit = bounds_tok_s[bound_by]
    detail = ", ".join(f"{name} {rate:,.0f} tok/s" for name, rate in bounds_tok_s.items())
    return [
        Figure(f"prefill {tokens} tok/s", "tok/s", tokens / ttft_s, limit, f"{bound_by} ({detail})"),
        Figure(f"TTFT {tokens}", "s", ttft_s, tokens / limit, bound_by),
        Figure(f"TTFT {tokens}, first of length", "s", first_ttft_s, tokens / limit, f"{bound_by}; new shapes"),
    ]


def decode_figure(context: int, tok_s: float, bandwidth_gbs: float, bytes_per_token: float) -> Figure:
    bound = f"read bandwidth {bandwidth_gbs:.1f} GB/s / {bytes_per_token / 1e6:,.1f} MB per token"
    return Figure(f"decode at {context} tok/s", "tok/s", tok_s, bandwidth_gbs * GB / bytes_per_token, bound)


def memory_figures(peaks: dict[str, float], ram_gb: float, vram_gb: float | None, vram_limit: str) -> list[Figure]:
    figures = [Figure("peak RSS", "GB", peaks["rss_gb"], ram_gb, "RAM")]
    for key in ("vram_allocated_gb", "vram_reserved_gb"):
        if key in peaks:
            name = f"peak VRAM {key.split('_')[1]}"
            figures.append(Figure(name, "GB", peaks[key], vram_gb, vram_limit))
    return figures


def to_json(result: dict, figures: list[Figure]) -> str:
    rows = [{**asdict(f), "ratio": f.ratio} for f in figures]
    return json.dumps({**result, "figures": rows}, indent=1)


def table(result: dict, figures: list[Figure]) -> str:
    """The human report: what ran, the measured limits, then one row per figure."""
    quant = result["quant"]
    lines = [f"{result['preset']} ({result['model_type']}, {result['layers']} layers), experts {quant['experts']}, "
             f"dense {quant['dense']}, {result['dtype']}; prefill on {result['device']}, "
             f"decode on cpu ({result['threads']} threads)",
             f"prefill plan: {result['prefill_plan']}"]
    lines += [f"limit: {name} {value}" for name, value in result["limits_text"].items()]
    lines.append(f"{'figure':<26}{'measured':>14}{'limit':>14}{'ratio':>8}  bound by")
    for f in figures:
        measured, limit = _fmt(f.value, f.unit), _fmt(f.limit, f.unit)
        lines.append(f"{f.name:<26}{measured:>14}{limit:>14}{f.ratio:>8.1%}  {f.bound_by}")
    if "transformers" in result:
        lines.append(_transformers_line(result["transformers"], result["device"]))
    return "\n".join(lines)


def _transformers_line(side: dict, device: str) -> str:
    if "skipped" in side:
        return f"transformers: skipped: {side['skipped']}"
    rates = [f"prefill {n}: {rate:,.0f} tok/s" for n, rate in side["prefill_tok_s"].items()]
    rates += [f"generate at {n}: {rate:,.1f} tok/s" for n, rate in side["generate_tok_s"].items()]
    rates += [f"out of memory at {n}" for n in side.get("out_of_memory", [])]
    return f"transformers {side['transformers']} (bf16, all on {device}): " + "; ".join(rates)


def _fmt(value: float, unit: str) -> str:
    if unit == "s":
        return f"{value:.3f} s"
    if unit == "GB":
        return f"{value:.2f} GB"
    return f"{value:,.1f}" if value < 100 else f"{value:,.0f}"
