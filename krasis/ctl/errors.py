"""Turning expected failures (bad model directory, bad options) into one-line CLI errors."""

import contextlib

import click


@contextlib.contextmanager
def user_errors():
    """ValueError and OSError subclasses carry user-facing messages: print them in one line, exit 1."""
    try:
        yield
    except click.ClickException:
        raise
    except (ValueError, OSError) as exc:
        raise click.ClickException(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
