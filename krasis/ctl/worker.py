"""`krasis-ctl worker`: run a CPU decode pool on this host for a gateway on another (see cpu_worker.remote_host)."""

import logging
import os
import select
import signal
import threading

import click

from krasis.ctl.errors import user_errors


@click.command()
@click.option("--gateway", required=True, metavar="tcp://HOST:PORT",
              help="The gateway's --remote-workers endpoint.")  # fmt: skip
@click.option("--model", "model_dir", type=click.Path(), help="This host's copy of the gateway's model directory "
              "(default: the embedded tiny model).")  # fmt: skip
@click.option("--cache-dir", type=click.Path(file_okay=False),
              help="Quantized cache root [default: $KRASIS_CACHE_DIR].")
@click.option("--listen", default="tcp://0.0.0.0:0", show_default=True,
              help="Where this pool's inbox binds (port 0: any free port); the gateway connects to it.")
@click.option("--advertise-host", help="Address the gateway dials for the inbox [default: this host's address on "
              "the route to the gateway].")  # fmt: skip
@click.option("--cpu-workers", default="auto", show_default=True,
              help="CPU decode workers here: auto (one per NUMA node), ccd (one per L3 domain) or a count.")
@click.option("--oversubscribe", is_flag=True, help="Allow more CPU workers than physical cores (trials, tests).")
@click.option("--gateway-timeout", type=click.FloatRange(min=1.0), default=10.0, show_default=True,
              help="Seconds without a message from the gateway before this pool leaves and joins again.")
def worker(gateway, model_dir, cache_dir, listen, advertise_host, cpu_workers, oversubscribe, gateway_timeout):
    """Join the gateway at GATEWAY with a CPU decode pool on this host; serve until SIGTERM or Ctrl-C.

    The gateway decides dtype and quantization; the pool re-joins whenever the connection is lost.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with user_errors():
        from krasis.common.default_model import default_model_dir
        from krasis.common.process_title import set_process_title
        from krasis.common.shm_segments import cleanup_stale
        from krasis.common.topology import describe, plan_workers, read_topology
        from krasis.cpu_worker.remote_host import EXCHANGE_PREFIX, KV_POOL_PREFIX, JoinRefused, RemoteDecodeHost
        from krasis.cpu_worker.remote_host import RemoteWorkerOptions

        for name, value in (("--gateway", gateway), ("--listen", listen)):
            if not value.startswith("tcp://"):
                raise click.UsageError(f"{name} {value!r}: use tcp://HOST:PORT")
        set_process_title("krasis::remote-decode")
        topology = read_topology()
        try:
            placements = plan_workers(topology, cpu_workers, oversubscribe)
        except ValueError as exc:
            raise click.UsageError(f"--cpu-workers: {exc}") from None
        click.echo(describe(placements, topology))
        for prefix in (KV_POOL_PREFIX, EXCHANGE_PREFIX):  # left by a worker that was SIGKILLed
            cleanup_stale(prefix)
        options = RemoteWorkerOptions(gateway, str(model_dir or default_model_dir()), cache_dir, listen,
                                      advertise_host, tuple(placements), gateway_timeout_s=gateway_timeout)  # fmt: skip
        host = RemoteDecodeHost(options)
        click.echo(f"krasis worker: joining {gateway} with {len(placements)} CPU decode worker(s)")
        try:
            host.run(_stop_on_signals())
        except JoinRefused as exc:
            raise click.ClickException(f"the gateway refused this pool: {exc}") from None
        click.echo("krasis worker: stopped")


def _stop_on_signals() -> threading.Event:
    """An Event set on SIGTERM or SIGINT; the handlers only wake a thread (setting an Event in a handler can
    deadlock on the Event's own lock, see krasis.common.process.StopSignals)."""
    stop = threading.Event()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)

    def watch():
        select.select([wake_r], [], [])
        stop.set()

    threading.Thread(target=watch, name="krasis-stop", daemon=True).start()
    return stop
