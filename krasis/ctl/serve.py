"""`krasis-ctl serve`: the OpenAI HTTP gateway over the worker pipeline (--in-process: one engine thread)."""

import asyncio
import ctypes
import logging
import signal
from dataclasses import dataclass
from pathlib import Path

import click

from krasis.ctl.errors import user_errors
from krasis.ctl.loading import WeightOptions

DEFAULT_MAX_CONTEXT = 8192  # a KV pool of max_concurrency x the model's full context is rarely affordable
KV_PAGE_SIZE = 16
SHUTDOWN_TIMEOUT_S = 3.0  # after in-flight streams were ended, for connections to close
PR_SET_NAME = 15


@click.command()
@click.option("--model", "model_dir", type=click.Path(), help="Hugging Face model directory (default: the embedded tiny model).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="0 picks a free port.")
@click.option("--api-key", help="Require `Authorization: Bearer KEY` on /v1/* (health and metrics stay open).")
@click.option("--quant", default="none", show_default=True, help="Experts: none, q8 or q4 (q4:g64, q8:channel...).")
@click.option("--dense-quant", default="bf16", show_default=True, help="Attention, dense MLPs, lm_head: bf16, q8 or q4.")
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Quantized cache root [default: $KRASIS_CACHE_DIR].")
@click.option("--dtype", type=click.Choice(["bf16", "fp32"]), default="bf16", show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--max-context", type=click.IntRange(min=2),
              help=f"Prompt + generated tokens per sequence [default: the model's, at most {DEFAULT_MAX_CONTEXT}].")
@click.option("--max-concurrency", type=click.IntRange(min=1), default=8, show_default=True,
              help="Sequences decoding together; the KV pool holds this many full contexts.")
@click.option("--max-queue", type=click.IntRange(min=0),
              help="Sequences that may wait for a slot before requests get 429 [default: 4 x --max-concurrency].")
@click.option("--served-model-name", help="The model id clients send [default: the model directory's name].")
@click.option("--cpu-workers", default="auto", show_default=True,
              help="CPU decode workers: auto (one per NUMA node), ccd (one per L3 domain) or a count.")
@click.option("--oversubscribe", is_flag=True,
              help="Allow more CPU workers than physical cores (they share cores: for trials and tests, not speed).")
@click.option("--remote-workers", metavar="tcp://HOST:PORT",
              help="Start no decode pool here: listen for one on another host (`krasis-ctl worker`).")
@click.option("--gpu", default="auto", show_default=True,
              help="Prefill worker device: auto (cuda:0 when there is a GPU), none (the CPU) or a CUDA index.")
@click.option("--vram-budget", type=click.FloatRange(min=0, min_open=True),
              help="GiB of VRAM GPU prefill may use; experts that don't fit stream [default: free VRAM minus 1 GiB].")
@click.option("--in-process", is_flag=True, help="Run the engine on a thread of the gateway (no worker processes).")
def serve(model_dir, host, port, api_key, quant, dense_quant, cache_dir, dtype, device, max_context, max_concurrency,
          max_queue, served_model_name, cpu_workers, oversubscribe, remote_workers, gpu, vram_budget, in_process):
    """Serve the model over the OpenAI HTTP API until SIGTERM or Ctrl-C."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with user_errors():
        _set_process_title("krasis::gateway")
        weights = WeightOptions(model_dir, dtype, device, quant, dense_quant, cache_dir, vram_budget)
        max_queue = 4 * max_concurrency if max_queue is None else max_queue
        if in_process:
            engine, tokenizer, name = _load(weights, max_context, max_concurrency, served_model_name)
            _run(_serve(engine, tokenizer, name, host, port, api_key, max_concurrency, max_queue))
            return
        pool = _DecodePoolOptions(cpu_workers, oversubscribe, _remote_endpoint(remote_workers))
        client, tokenizer, config = _pipeline(weights, pool, gpu, max_context, max_concurrency, max_queue,
                                              served_model_name, api_key)  # fmt: skip
        _run(_serve_client(client, tokenizer, config, host, port, max_concurrency, max_queue, _pool_summary(client)))


@dataclass(frozen=True)
class _DecodePoolOptions:
    cpu_workers: str
    oversubscribe: bool
    remote_listen: str | None


def _remote_endpoint(endpoint: str | None) -> str | None:
    if endpoint is not None and not endpoint.startswith("tcp://"):
        raise click.UsageError(f"--remote-workers {endpoint!r}: use tcp://HOST:PORT (e.g. tcp://0.0.0.0:5555)")
    return endpoint


def _pipeline(weights: WeightOptions, pool: _DecodePoolOptions, gpu, max_context, max_concurrency, max_queue,
              served_model_name, api_key):  # fmt: skip
    """The pipeline client for this model and host; prints the topology plan. Workers start with the server."""
    from krasis.common import default_model
    from krasis.common.default_model import default_model_dir
    from krasis.common.model_fingerprint import model_fingerprint
    from krasis.common.model_loader import empty_model, resolve_dtype
    from krasis.common.tokenizer import Tokenizer
    from krasis.common.topology import describe, plan_workers, read_topology
    from krasis.gateway.app import GatewayConfig
    from krasis.gateway.pipeline_client import PipelineConfig, PipelineEngineClient

    if gpu not in ("auto", "none") and not gpu.isdigit():
        raise click.UsageError(f"--gpu {gpu!r}: use auto, none or a CUDA device index")
    directory = weights.model_dir or default_model_dir()
    model = empty_model(directory)  # meta device: shapes only, the workers load the weights
    max_context = _max_context(model, max_context)
    topology = read_topology()
    try:
        placements = plan_workers(topology, pool.cpu_workers, pool.oversubscribe)
    except ValueError as exc:
        raise click.UsageError(f"--cpu-workers: {exc}") from None
    if pool.remote_listen is None:
        click.echo(describe(placements, topology))
    else:
        click.echo(f"CPU decode pool: none here; one joins from another host on {pool.remote_listen}")
    cfg = model.config
    config = PipelineConfig(
        weights=weights, gpu=gpu, placements=tuple(placements), kv_widths=tuple(model.kv_widths),
        state_widths=tuple(model.state_widths),
        kv_dtype=str(resolve_dtype(weights.dtype)).removeprefix("torch."), hidden_size=cfg.hidden_size,
        top_k=cfg.num_experts_per_tok, max_context=max_context, max_batch_tokens=min(max_context, 2048),
        kv_pages=max_concurrency * -(-max_context // KV_PAGE_SIZE), page_size=KV_PAGE_SIZE,
        remote_listen=pool.remote_listen, model_fingerprint=model_fingerprint(directory),
    )  # fmt: skip
    client = PipelineEngineClient(config, max_running=max_concurrency, max_waiting=max_queue)
    name = served_model_name or (Path(weights.model_dir).resolve().name if weights.model_dir else default_model.NAME)
    gateway_config = GatewayConfig(name, max_context, cfg.vocab_size, api_key)
    return client, Tokenizer.from_dir(directory), gateway_config


def _max_context(model, max_context):
    model_limit = model.config.max_position_embeddings
    if max_context is not None and max_context > model_limit:
        raise click.UsageError(f"--max-context {max_context} exceeds the model's context of {model_limit} tokens")
    return max_context or min(model_limit, DEFAULT_MAX_CONTEXT)


def _pool_summary(client) -> str:
    c = client.config
    where = f"{len(c.placements)} CPU decode worker(s)"
    if c.remote_listen:
        where = f"a CPU decode pool joining on {c.remote_listen}"
    return f"{c.kv_pages} shared pages of {c.page_size} tokens, {where}"


def _load(weights: WeightOptions, max_context, max_concurrency, served_model_name):
    from krasis.common import default_model
    from krasis.common.engine import EngineConfig, EngineCore
    from krasis.ctl.loading import load_for_generation  # torch imports stay out of `--help`

    model, tokenizer = load_for_generation(weights)
    max_context = _max_context(model, max_context)
    pages = max_concurrency * -(-max_context // KV_PAGE_SIZE)
    config = EngineConfig(max_context=max_context, kv_pages=pages, page_size=KV_PAGE_SIZE)
    engine = EngineCore(model, config, tokenizer.eos_token_ids, model.config.vocab_size)
    name = served_model_name or (Path(weights.model_dir).resolve().name if weights.model_dir else default_model.NAME)
    return engine, tokenizer, name


async def _serve(engine, tokenizer, name, host, port, api_key, max_concurrency, max_queue):
    from krasis.gateway.app import GatewayConfig
    from krasis.gateway.engine_client import InProcessEngineClient

    client = InProcessEngineClient(engine, max_running=max_concurrency, max_waiting=max_queue)
    config = GatewayConfig(name, engine.config.max_context, engine.vocab_size, api_key)
    await _serve_client(client, tokenizer, config, host, port, max_concurrency, max_queue, _kv_summary(engine))


async def _serve_client(client, tokenizer, config, host, port, max_concurrency, max_queue, kv_summary: str):
    from aiohttp import web

    from krasis.gateway.app import GATEWAY, create_app

    app = create_app(client, tokenizer, config)
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=SHUTDOWN_TIMEOUT_S, access_log=None)
    await client.start()
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        bound_port = runner.addresses[0][1]
        click.echo(f"krasis gateway: serving {config.model_name} on http://{_url_host(host)}:{bound_port}/v1 "
                   f"(max-context {config.max_context}, max-concurrency {max_concurrency}, queue {max_queue}, "
                   f"KV pool {kv_summary})", nl=True)
        await _wait_for_signal()
        click.echo("krasis gateway: shutting down")
        app[GATEWAY].shutting_down = True
    finally:
        await client.close()  # ends in-flight streams with an error event, so cleanup need not wait
        await runner.cleanup()
    click.echo("krasis gateway: stopped")


async def _wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def _run(main) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


def _kv_summary(engine) -> str:
    kv = engine.kv
    layer_bytes = sum(layer.numel() * layer.element_size() for layer in kv.layers)
    return f"{kv.num_pages} pages of {kv.page_size} tokens, {layer_bytes / 2**20:.1f} MiB"


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _set_process_title(title: str) -> None:
    """`krasis::gateway` in ps/top: setproctitle when installed, else the thread name via prctl."""
    try:
        import setproctitle

        setproctitle.setproctitle(title)
        return
    except ImportError:
        pass
    try:
        ctypes.CDLL(None).prctl(PR_SET_NAME, title.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):
        pass
