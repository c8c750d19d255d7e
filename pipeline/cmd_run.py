"""`symzoo` commands: run."""

from pipeline.cli import app, console, fail  # noqa: F401
