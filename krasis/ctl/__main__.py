"""`python -m krasis.ctl` runs krasis-ctl."""

from krasis.ctl.main import cli

cli()
