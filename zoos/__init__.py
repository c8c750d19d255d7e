"""Architectures, zoo specs, the population trainer, the Arrow weight store and its polars query API."""

from __future__ import annotations


def open(path: str, **kwargs):  # noqa: A001 - `zoos.open(path)` is the documented entry point
    """Open a zoo store (a local path or a pyarrow filesystem URI) for polars queries and weight loading."""
    from zoos.store import Store

    return Store(path, **kwargs)
