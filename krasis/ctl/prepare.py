"""`krasis-ctl prepare`: build a model's quantized weight cache ahead of its first start."""

import time

import click

from krasis.ctl.errors import user_errors


@click.command()
@click.option("--model", "model_dir", required=True, type=click.Path(), help="Hugging Face model directory (bf16/fp16/fp32 or FP8 block-scaled).")
@click.option("--quant", required=True, help="Routed and shared experts: q4 or q8, optionally grouped (q4:g64, q8:channel).")
@click.option("--dense", default="bf16", show_default=True, help="Attention, dense MLPs and lm_head: bf16, q8 or q4 (grouped as --quant).")
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Cache root [default: $KRASIS_CACHE_DIR, else ~/.cache/krasis/quant].")
@click.option("--verify", is_flag=True, help="Re-hash every file of an existing cache, not only those changed since verified.")
def prepare(model_dir, quant, dense, cache_dir, verify):
    """Build (or find) a model's quantized cache; print its path, size and build rate."""
    with user_errors():
        from krasis.common.quant.cache import HEADER_FILE, ensure_cache, open_cache  # torch stays out of `--help`
        from krasis.common.quant.plan import QuantPlan

        if quant.strip().lower() in ("bf16", "none"):
            raise click.BadParameter("the cache holds quantized experts: give q4 or q8", param_hint="--quant")
        plan = QuantPlan.parse(quant, dense)
        started = time.time()
        path = ensure_cache(model_dir, plan, cache_dir)
        header = open_cache(path, model_dir, verify=True if verify else None).header
        built_now = (path / HEADER_FILE).stat().st_mtime >= started
        build = header["build"]
        click.echo(str(path))
        click.echo(f"size: {build['cache_bytes'] / 1e9:.3f} GB in {len(header['files'])} files "
                   f"(experts {header['plan']['experts']}, dense {header['plan']['dense']})")
        click.echo(f"{'built' if built_now else 'reused, built'} {build['finished']}: "
                   f"{build['source_bytes'] / 1e9:.3f} GB of checkpoint in {build['seconds']:.1f} s, "
                   f"{build['source_gb_per_s']:.2f} GB/s on {build['workers']} cores")
