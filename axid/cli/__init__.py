"""The `axid` command line."""

from axid.cli._app import app, main

__all__ = ["app", "main"]
