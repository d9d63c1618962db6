"""The `tokenworks` command: one module per command group, dispatched from `main`."""

from tokenworks.cli.main import main

__all__ = ["main"]
