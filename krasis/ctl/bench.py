"""`krasis-ctl bench`: a preset's published config with random weights, measured end to end against the limits
measured in the same run (see docs/BENCHMARKS.md)."""

import click

from krasis.bench.presets import PRESETS
from krasis.ctl.errors import user_errors


def token_counts(ctx, param, text: str) -> tuple[int, ...]:
    """ "2K,8K,32K" or "512,32768" -> token counts (K = 1024)."""
    counts = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            count = float(part[:-1]) * 1024 if part[-1] in "kK" else float(part)
        except ValueError:
            raise click.BadParameter(f"{part!r} is not a token count like 512, 2K or 0.5K") from None
        if count < 1 or count != int(count):
            raise click.BadParameter(f"{part!r} is not a positive whole number of tokens")
        counts.append(int(count))
    if not counts:
        raise click.BadParameter("give at least one token count")
    return tuple(counts)


@click.command()
@click.option("--preset", required=True, help=f"Published model config to build: {', '.join(PRESETS)}.")
@click.option("--layers", type=click.IntRange(min=1), help="Keep the first N decoder layers [default: all].")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True, help="Prefill device (decode is on the CPU).")
@click.option("--quant", type=click.Choice(["q4", "q8"]), default="q4", show_default=True, help="Routed and shared experts.")
@click.option("--dense", "dense_quant", type=click.Choice(["bf16", "q8", "q4"]), default="bf16", show_default=True, help="Attention, dense MLPs, lm_head.")
@click.option("--dtype", type=click.Choice(["bf16", "fp32"]), default="bf16", show_default=True, help="Activations and kept weights.")
@click.option("--prompt-tokens", default="2K,8K,32K", show_default=True, callback=token_counts, help="Prefill prompt lengths.")
@click.option("--decode-context", "decode_contexts", default="0.5K,32K", show_default=True, callback=token_counts, help="Contexts to decode at.")
@click.option("--decode-tokens", type=click.IntRange(min=1), default=64, show_default=True, help="Tokens decoded at each context.")
@click.option("--chunk-tokens", type=click.IntRange(min=1), default=16384, show_default=True,
              help="The largest prefill chunk (the VRAM plan halves it until it fits).")
@click.option("--vram-budget", "vram_budget_gib", type=click.FloatRange(min=0, min_open=True), help="GiB for the streaming prefill [default: free VRAM].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights and prompts.")
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Quantized cache root [default: $KRASIS_CACHE_DIR].")
@click.option("--bandwidth-gib", type=click.FloatRange(min=0, min_open=True), default=2.0, show_default=True, help="Buffer of the read-bandwidth probe.")
@click.option("--threads", type=click.IntRange(min=1), help="torch CPU threads [default: torch's].")
@click.option("--compare-transformers", is_flag=True, help="Also time Hugging Face transformers, bf16, all on the device.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, writable=True), help="Also write every figure as JSON here.")
def bench(threads, json_path, **options):
    """Prefill, TTFT and decode of a preset, each next to its hardware limit and the ratio to it."""
    with user_errors():
        from krasis.common.env import use_expandable_cuda_segments

        use_expandable_cuda_segments()
        import torch  # torch stays out of `--help`

        from krasis.bench.report import table, to_json
        from krasis.bench.run import BenchOptions, run_bench

        if threads:
            torch.set_num_threads(threads)
        result, figures = run_bench(BenchOptions(**options))
        click.echo(table(result, figures))
        if json_path:
            with open(json_path, "w") as f:
                f.write(to_json(result, figures) + "\n")
