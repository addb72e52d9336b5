"""The hubcore command line."""

from hubcore.cli.main import main

__all__ = ["main"]
