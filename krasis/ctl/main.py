"""krasis-ctl: the command-line entry point; each command lives in its own module."""

import click

from krasis.ctl.bench import bench
from krasis.ctl.generate import generate
from krasis.ctl.prepare import prepare
from krasis.ctl.serve import serve
from krasis.ctl.worker import worker


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="krasis")
def cli():
    """krasis: serve large Mixture-of-Experts models (GPU prefill, CPU decode)."""


cli.add_command(bench)
cli.add_command(generate)
cli.add_command(prepare)
cli.add_command(serve)
cli.add_command(worker)
