"""Export stored weights for other tools: safetensors state dicts, and the NFN / DWSNets layout.

NFN (Zhou et al.) and DWSNets (Navon et al.) take a population as `(weights, biases)`: per layer,
in forward order, weights[i] [N, out, in, *filter] and biases[i] [N, out].
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import polars as pl
import torch
from safetensors.torch import save_file

from zoos.store import Store, StoreError


def export_safetensors(
    store: Store, out_dir: str, filter: pl.Expr | None = None, epoch: int | str = "last"  # noqa: A002
) -> list[str]:
    """Write one `<model_id>.safetensors` state dict per selected model; return the paths written."""
    tensors, ids = store.to_torch(filter=filter, epoch=epoch)
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for i, mid in enumerate(ids):
        path = os.path.join(out_dir, f"{mid}.safetensors")
        state = {k: v[i].contiguous().clone() for k, v in tensors.items()}
        save_file(state, path, metadata={"model_id": mid, "epoch": str(epoch)})
        paths.append(path)
    return paths


def nfn_layout(
    tensors: Mapping[str, torch.Tensor], keys: Sequence[str] | None = None, strict: bool = True
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """`(weights, biases)` of stacked layers: each `X.weight` [N, out, in, ...] paired with `X.bias` [N, out].

    Layers follow the order of `keys` (default: the mapping's order, which for a state dict is
    registration order, i.e. forward order for sequential nets). A layer without a bias gets zeros.
    Other entries (norm scales, buffers) cannot be expressed in this layout: with `strict` they are
    refused by name, otherwise skipped.
    """
    keys = list(tensors) if keys is None else list(keys)
    weights, biases, used = [], [], set()
    for k in keys:
        if not k.endswith("weight") or tensors[k].dim() < 3:
            continue
        w = tensors[k]
        prefix = k[: -len("weight")]
        b = tensors.get(prefix + "bias")
        if b is None:
            b = torch.zeros(w.shape[:2], dtype=w.dtype, device=w.device)
        elif tuple(b.shape) != tuple(w.shape[:2]):
            raise StoreError(f"bias {prefix + 'bias'!r} has shape {tuple(b.shape)}, expected {tuple(w.shape[:2])}")
        else:
            used.add(prefix + "bias")
        weights.append(w)
        biases.append(b)
        used.add(k)
    rest = [k for k in keys if k not in used]
    if strict and rest:
        raise StoreError(
            f"entries {rest} are not (weight, bias) layers; the NFN/DWSNets layout cannot hold them "
            "(pass strict=False to skip them)"
        )
    if not weights:
        raise StoreError("no layer weights ([N, out, in, ...] tensors named '*weight') to export")
    return tuple(weights), tuple(biases)


def export_nfn(
    store: Store, filter: pl.Expr | None = None, epoch: int | str = "last", strict: bool = False  # noqa: A002
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...], list[str]]:
    """`(weights, biases, model_ids)` of the selected models in the NFN / DWSNets layout."""
    tensors, ids = store.to_torch(filter=filter, epoch=epoch)
    weights, biases = nfn_layout(tensors, strict=strict)
    return weights, biases, ids
