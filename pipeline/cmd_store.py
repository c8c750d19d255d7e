"""`symzoo` commands: store."""

from pipeline.cli import app, console, fail  # noqa: F401
