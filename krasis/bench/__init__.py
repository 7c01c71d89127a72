"""`krasis-ctl bench`: random-weight models with the published configs, measured against the hardware limits."""


class BenchError(ValueError):
    """A benchmark that cannot run as asked (unknown preset, unsupported architecture, bad option); one line."""
